"""Small models for the ensemble, model-call and response cache tests, written into a test's own repository."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto, helper


def write_model(
    repository: Path, name: str, config: dict[str, Any], files: dict[str, str | bytes] | None = None
) -> Path:
    """A model folder with ``config.yaml`` and version 1 holding ``files`` (the folder stays empty without them)."""
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repository / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for filename, content in (files or {}).items():
        target = version / filename
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(textwrap.dedent(content))
    return repository / name


def tensor(name: str, data_type: str = "TYPE_FP32", dims: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims or [4]}


def python_model(
    repository: Path,
    name: str,
    source: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int = 8,
    queue_delay_us: int | None = None,
    **extra: Any,
) -> Path:
    config: dict[str, Any] = {"backend": "python", "max_batch_size": max_batch_size, "input": inputs}
    config["output"] = outputs
    config["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    if queue_delay_us is not None:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    config.update(extra)
    return write_model(repository, name, config, {"model.py": source})


# Y = 2 * X, taking ``sleep_s`` per batch so that requests arriving meanwhile queue and batch together.
DOUBLE_SOURCE = """
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import json

        parameters = json.loads(args["model_config"])["parameters"]
        self.sleep_s = float(parameters.get("sleep_s", {"string_value": "0"})["string_value"])

    def execute(self, requests):
        time.sleep(self.sleep_s)
        x = pb_utils.get_input_tensor_by_name(requests[0], "X").as_numpy()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 2)])]
"""


def add_double(repository: Path, name: str = "double", sleep_s: float = 0.0, queue_delay_us: int = 100_000) -> Path:
    return python_model(
        repository,
        name,
        DOUBLE_SOURCE,
        [tensor("X")],
        [tensor("Y")],
        queue_delay_us=queue_delay_us,
        parameters={"sleep_s": str(sleep_s)},
    )


def add_one_model() -> onnx.ModelProto:
    """ONNX: Z = Y + 1 over [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["Y", "one"], ["Z"])],
        "add_one",
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def add_add_one(repository: Path, name: str = "add_one", queue_delay_us: int = 20_000) -> Path:
    config = {
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [tensor("Y")],
        "output": [tensor("Z")],
        "dynamic_batching": {"max_queue_delay_microseconds": queue_delay_us},
    }
    return write_model(repository, name, config, {"model.onnx": add_one_model().SerializeToString()})
