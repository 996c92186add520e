"""classify_image as code: each step is a call to another served model (Triton's BLS), through its own batcher.

PIXELS [batch, 256] UINT8 -> CLASS [batch, 1] INT32 and SCORE [batch, 1] FP32, as the classify_image ensemble.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils


def call(model_name: str, inputs: list, output_names: list[str]) -> list:
    """Run one served model and return its outputs in the order asked; a failure raises TritonModelException."""
    response = pb_utils.InferenceRequest(
        model_name=model_name, requested_output_names=output_names, inputs=inputs
    ).exec()
    return [pb_utils.get_output_tensor_by_name(response, name) for name in output_names]


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
            (features,) = call("preprocess_pixels", [pixels], ["FEATURES"])
            (probabilities,) = call(
                "mlp_classifier", [pb_utils.Tensor("features", features.as_numpy())], ["probabilities"]
            )
            top = call(
                "pick_top_class",
                [pb_utils.Tensor("PROBABILITIES", probabilities.as_numpy())],
                ["CLASS", "SCORE"],
            )
            responses.append(pb_utils.InferenceResponse(top))
        return responses
