"""The Triton Python-backend ``model.py`` that ``bench_triton.py`` serves: ONNX Runtime on the whole batch.

Triton's Python backend stub starts its own interpreter without the caller's ``PYTHONPATH``, so this file puts the
benchmark venv's site-packages (``bench_triton.py`` writes it into ``SITE_PACKAGES`` below when it copies the file)
on ``sys.path`` before importing ONNX Runtime. Triton's dynamic batcher hands ``execute`` every request of a batch;
they run as one ONNX Runtime call, as ModelDock's backend does.
"""

import sys

SITE_PACKAGES = "@SITE_PACKAGES@"
if SITE_PACKAGES not in sys.path:
    sys.path.insert(0, SITE_PACKAGES)

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_thread_count", {}).get("string_value")
        if threads:
            options.intra_op_num_threads = int(threads)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        (output,) = self.session.run(["OUTPUT0"], {"INPUT0": batch})
        responses, start = [], 0
        for array in arrays:
            rows = array.shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", output[start : start + rows])]))
            start += rows
        return responses
