"""ONNX Runtime on a GPU: a KIND_GPU instance runs on the CUDA execution provider and matches the CPU."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess


@pytest.mark.gpu
def test_gpu_instance_matches_cpu_outputs(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)")
    shutil.copytree(BUNDLED_REPOSITORY / "mlp_classifier", tmp_path / "mlp_gpu")
    (tmp_path / "mlp_gpu" / "config.yaml").write_text(
        "backend: onnxruntime\nmax_batch_size: 64\ninstance_group:\n  - {kind: KIND_GPU, gpus: [0]}\n"
    )
    server = start_server(tmp_path)
    model_path = tmp_path / "mlp_gpu" / "1" / "model.onnx"
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    features = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)
    tensor = httpclient.InferInput("features", [32, 256], "FP32")
    tensor.set_data_from_numpy(features)
    result = client.infer("mlp_gpu", [tensor])
    (expected,) = session.run(["probabilities"], {"features": features})
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-3, atol=1e-4)
