"""The most likely class: PROBABILITIES [batch, 10] -> CLASS [batch, 1] INT32 and SCORE [batch, 1] FP32."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            probabilities = pb_utils.get_input_tensor_by_name(request, "PROBABILITIES").as_numpy()
            best = probabilities.argmax(axis=1)
            score = probabilities[np.arange(len(best)), best]
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("CLASS", best.astype(np.int32).reshape(-1, 1)),
                        pb_utils.Tensor("SCORE", score.astype(np.float32).reshape(-1, 1)),
                    ]
                )
            )
        return responses
