"""Model folders for the lifecycle tests, built in a test's own repository folder."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BUNDLED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
A = np.arange(16, dtype=np.float32)
B = np.full(16, 0.5, dtype=np.float32)


def add_simple(repository: Path, name: str = "simple", versions: tuple[int, ...] = (1,)) -> Path:
    """A copy of the bundled ``simple`` model (OUTPUT0 = INPUT0 + INPUT1) under ``name``, with these versions."""
    model_dir = repository / name
    model_dir.mkdir(parents=True)
    shutil.copy(BUNDLED_REPOSITORY / "simple" / "config.yaml", model_dir / "config.yaml")
    for version in versions:
        add_version(model_dir, version)
    return model_dir


def add_version(model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    target.mkdir()
    shutil.copy(BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx", target / "model.onnx")
    return target


def append_config(model_dir: Path, text: str) -> None:
    path = model_dir / "config.yaml"
    path.write_text(path.read_text() + text)


def simple_request() -> dict[str, object]:
    return {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": A.tolist()},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": B.tolist()},
        ]
    }


def infer_simple(client: httpx.Client | None, url: str, model: str = "simple", version: str = "") -> httpx.Response:
    path = f"{url}/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    if client is None:
        return httpx.post(path, json=simple_request(), timeout=30)
    return client.post(path, json=simple_request(), timeout=30)


def check_simple_output(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    np.testing.assert_allclose(np.array(outputs["OUTPUT0"]["data"], dtype=np.float32), A + B)


def index(url: str) -> dict[tuple[str, str], dict[str, str]]:
    rows = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10).json()
    return {(row["name"], row["version"]): row for row in rows}


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def model_ready(url: str, model: str) -> bool:
    return httpx.get(f"{url}/v2/models/{model}/ready", timeout=10).status_code == 200


SLOW_FEATURES = 512
SLOW_LAYERS = 48


def add_slow_identity(repository: Path, name: str = "slow") -> Path:
    """``y = x @ I @ I ...``: the output equals the input, but a batch of 64 takes tens of milliseconds.

    Long enough requests let a test catch some of them in flight when it unloads the model.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SLOW_FEATURES])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SLOW_FEATURES])
    eye = numpy_helper.from_array(np.eye(SLOW_FEATURES, dtype=np.float32), "eye")
    nodes = []
    previous = "x"
    for layer in range(SLOW_LAYERS):
        out = "y" if layer == SLOW_LAYERS - 1 else f"h{layer}"
        nodes.append(helper.make_node("MatMul", [previous, "eye"], [out]))
        previous = out
    graph = helper.make_graph(nodes, "slow", [x], [y], initializer=[eye])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (model_dir / "config.yaml").write_text(
        "backend: onnxruntime\nmax_batch_size: 64\n"
        "parameters:\n  intra_op_thread_count: 1\n"
        "instance_group:\n  - count: 1\n    kind: KIND_CPU\n"
    )
    return model_dir
