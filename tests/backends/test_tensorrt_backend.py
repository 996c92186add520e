"""The TensorRT backend: clear load errors everywhere, and an engine served on a GPU matching ONNX Runtime."""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

ENGINE_CONFIG = """
backend: tensorrt
max_batch_size: 8
input:
  - {name: features, data_type: TYPE_FP32, dims: [256]}
output:
  - {name: logits, data_type: TYPE_FP32, dims: [10]}
"""


def _write(repo: Path, name: str, config: str, plan: bytes) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.yaml").write_text(textwrap.dedent(config))
    (version / "model.plan").write_bytes(plan)


def test_unloadable_engines_are_unavailable_with_a_reason_and_others_serve(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    _write(tmp_path, "engine", ENGINE_CONFIG, b"not a serialized TensorRT engine")
    _write(tmp_path, "engine_on_cpu", ENGINE_CONFIG + "instance_group:\n  - {kind: KIND_CPU}\n", b"unused")
    shutil.copytree(BUNDLED_REPOSITORY / "simple", tmp_path / "simple")
    server = start_server(tmp_path)
    rows = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index", json={}).json()}

    assert rows["engine"]["state"] == "UNAVAILABLE"
    if importlib.util.find_spec("tensorrt") is None:
        assert 'pip install "modeldock[tensorrt]"' in rows["engine"]["reason"]
    else:
        assert "model.plan" in rows["engine"]["reason"] or "GPU" in rows["engine"]["reason"]
    assert rows["engine_on_cpu"]["state"] == "UNAVAILABLE"
    assert "instance_group[0].kind" in rows["engine_on_cpu"]["reason"] and "KIND_GPU" in rows["engine_on_cpu"]["reason"]

    assert rows["simple"]["state"] == "READY"
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT1"), np.zeros((1, 16)))


def _build_engine(onnx_path: Path, max_batch: int) -> bytes:
    """Build a plan from the ONNX file with the TensorRT ONNX parser, with a dynamic batch profile 1..max_batch."""
    trt = pytest.importorskip("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # full FP32, so outputs compare closely with ONNX Runtime on the CPU
    profile = builder.create_optimization_profile()
    features = network.get_input(0)
    inner = tuple(features.shape)[1:]
    profile.set_shape(features.name, (1, *inner), (8, *inner), (max_batch, *inner))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT failed to build the engine"
    return bytes(plan)


@pytest.mark.gpu
def test_engine_from_the_bundled_mlp_matches_onnxruntime(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    onnx_path = BUNDLED_REPOSITORY / "mlp_classifier" / "1" / "model.onnx"
    # No inputs/outputs in the config: they are read from the engine.
    config = "backend: tensorrt\nmax_batch_size: 64\ninstance_group:\n  - {kind: KIND_GPU, gpus: [0], count: 2}\n"
    _write(tmp_path, "mlp_trt", config, _build_engine(onnx_path, 64))
    server = start_server(tmp_path)
    metadata = httpx.get(f"{server.url}/v2/models/mlp_trt").json()
    assert [t["name"] for t in metadata["inputs"]] == ["features"]
    assert {t["name"] for t in metadata["outputs"]} == {"logits", "probabilities"}

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    rng = np.random.default_rng(0)
    for batch in (1, 5, 64):  # different shapes within the optimisation profile
        features = rng.standard_normal((batch, 256)).astype(np.float32)
        tensor = httpclient.InferInput("features", [batch, 256], "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer("mlp_trt", [tensor])
        logits, probabilities = session.run(["logits", "probabilities"], {"features": features})
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-3, atol=1e-4)
