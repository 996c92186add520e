"""Scales UINT8 pixels to FP32 features in [0, 1]: PIXELS [batch, 256] -> FEATURES [batch, 256]."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
            features = pixels.astype(np.float32) / np.float32(255.0)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("FEATURES", features)]))
        return responses
