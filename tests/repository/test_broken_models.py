"""Broken configs and broken models end to end: each is UNAVAILABLE with a reason naming the file and the field,
the server starts and keeps serving every other model, and ``modeldock validate`` reports the same problems."""

from __future__ import annotations

import shutil
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save_file

from tests.lifecycle_models import (
    BUNDLED_REPOSITORY,
    add_simple,
    append_config,
    check_simple_output,
    index,
    infer_simple,
)
from tests.repository.test_validate import validate

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.3")
SIMPLE_CONFIG = (BUNDLED_REPOSITORY / "simple" / "config.yaml").read_text()

PYTHON_CONFIG = """
backend: python
max_batch_size: 8
input:
  - {name: X, data_type: TYPE_FP32, dims: [4]}
output:
  - {name: Y, data_type: TYPE_FP32, dims: [4]}
"""

# The first element of X picks how execute misbehaves.
MISBEHAVING_MODEL = """
import os

import numpy as np


class TritonPythonModel:
    def execute(self, requests):
        x = requests[0].inputs["X"]
        mode = int(x.flat[0])
        if mode == 1:
            return [{}]
        if mode == 2:
            return [{"Y": x.astype(np.int64)}]
        if mode == 3:
            return [{"Y": x[:1]}]
        if mode == 4:
            return [{"Y": x[:, :2]}]
        if mode == 5:
            os._exit(5)
        return [{"Y": x}]
"""

HUNG_INITIALIZE = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return [{"Y": requests[0].inputs["X"]}]
"""

HUNG_IMPORT = """
import time

time.sleep(3600)
"""


def write_python_model(repository: Path, name: str, code: str, config: str = PYTHON_CONFIG) -> Path:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.yaml").write_text(textwrap.dedent(config))
    (version / "model.py").write_text(textwrap.dedent(code))
    return repository / name


def simple_with_config(repository: Path, name: str, config: str) -> Path:
    model_dir = add_simple(repository, name)
    (model_dir / "config.yaml").write_text(config)
    return model_dir


def add_broken_models(repository: Path) -> dict[str, tuple[str, ...]]:
    """Broken copies of ``simple``; maps each name to the file and words its reason must show."""
    binary = add_simple(repository, "binary_config")
    (binary / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    append_config(add_simple(repository, "preferred_too_big"), "dynamic_batching:\n  preferred_batch_size: [64]\n")
    simple_with_config(repository, "output_named_like_input", SIMPLE_CONFIG.replace("name: OUTPUT1", "name: INPUT1"))
    simple_with_config(repository, "zero_dim", SIMPLE_CONFIG.replace("dims: [16]", "dims: [0]", 1))
    simple_with_config(repository, "wrong_input_name", SIMPLE_CONFIG.replace("INPUT1", "INPUT9"))
    simple_with_config(repository, "wrong_data_type", SIMPLE_CONFIG.replace("TYPE_FP32", "TYPE_INT32", 1))
    simple_with_config(repository, "wrong_dims", SIMPLE_CONFIG.replace("dims: [16]", "dims: [4, 4]", 1))
    truncated = add_simple(repository, "truncated_onnx")
    onnx_bytes = (truncated / "1" / "model.onnx").read_bytes()
    (truncated / "1" / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    two_ones = add_simple(repository, "two_version_ones")
    shutil.copytree(two_ones / "1", two_ones / "01")
    return {
        "binary_config": ("binary_config/config.yaml", "not UTF-8"),
        "preferred_too_big": ("config.yaml", "field 'dynamic_batching.preferred_batch_size'", "max_batch_size (8)"),
        "output_named_like_input": ("config.yaml", "field 'output[1].name'", "'INPUT1' is also the name of an input"),
        "zero_dim": ("config.yaml", "field 'input[0].dims'", ">= 1"),
        "wrong_input_name": ("config.yaml", "field 'input[1].name'", "'INPUT9' is not an input of model.onnx"),
        "wrong_data_type": ("config.yaml", "field 'input[0].data_type'", "TYPE_INT32", "TYPE_FP32"),
        "wrong_dims": ("config.yaml", "field 'input[0].dims'", "[4, 4]", "[16]"),
        "truncated_onnx": ("truncated_onnx/1/model.onnx", "ONNX Runtime cannot load"),
        "two_version_ones": ("two_version_ones", "'01' and '1' are both version 1"),
    }


def test_broken_configs_and_models_are_unavailable_with_file_and_field(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "good")
    expected = add_broken_models(repository)
    server = start_server(repository, *POLL)

    rows = index(server.url)
    for name, words in expected.items():
        (row,) = [r for (n, _), r in rows.items() if n == name]
        assert row["state"] == "UNAVAILABLE", (name, row)
        for word in words:
            assert word in row["reason"], (name, word, row["reason"])
        response = infer_simple(None, server.url, name)
        assert response.status_code == 503 and name in response.json()["error"]
    check_simple_output(infer_simple(None, server.url, "good"))
    log = server.log()
    assert all(f"model '{name}' failed to load" in log for name in expected)


def test_validate_reports_what_a_load_reports(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    expected = add_broken_models(repository)
    add_simple(repository, "good")
    # An eager PyTorch model (model.py + model.safetensors) is valid; with weights that do not fit it is not.
    for name, weights in (("torch_eager", "fc"), ("torch_wrong_keys", "other")):
        version = repository / name / "1"
        version.mkdir(parents=True)
        (repository / name / "config.yaml").write_text(
            "backend: pytorch\nmax_batch_size: 4\ninput:\n  - {name: x, data_type: TYPE_FP32, dims: [4]}\n"
            "output:\n  - {name: y, data_type: TYPE_FP32, dims: [2]}\n"
        )
        (version / "model.py").write_text(
            "import torch\n\n\nclass Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.fc = torch.nn.Linear(4, 2)\n\n    def forward(self, x):\n        return self.fc(x)\n"
        )
        save_file(
            {f"{weights}.weight": torch.zeros(2, 4), f"{weights}.bias": torch.zeros(2)}, version / "model.safetensors"
        )
    write_python_model(repository, "python_import_fails", "raise RuntimeError('no such device')\n")

    result = validate(repository)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name, (file, *words) in [
        *expected.items(),
        ("torch_wrong_keys", ("torch_wrong_keys/1", "weights do not fit Model", "Missing key")),
        ("python_import_fails", ("python_import_fails/1", "RuntimeError: no such device")),
    ]:
        assert any(name in line and file in line and words[0] in line for line in lines), (name, result.stdout)
    assert f"{len(expected) + 2} problem(s) in {len(expected) + 4} model(s)" in result.stdout
    assert not any(line.startswith(("│ good ", "│ torch_eager ")) for line in lines), result.stdout


def test_hung_initialize_fails_the_load_after_its_timeout(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "simple")
    timeout = "parameters:\n  load_timeout_secs: 2\n"
    write_python_model(repository, "hung_initialize", HUNG_INITIALIZE, PYTHON_CONFIG + timeout)
    # No inputs or outputs in the config: the server imports model.py to ask it, and that import never ends.
    write_python_model(repository, "hung_import", HUNG_IMPORT, "backend: python\n" + timeout)
    started = time.monotonic()
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "*")
    assert time.monotonic() - started < 20

    rows = index(server.url)
    assert rows[("simple", "1")]["state"] == "READY"
    hung = rows[("hung_initialize", "")]
    assert hung["state"] == "UNAVAILABLE"
    assert "hung_initialize/1/model.py" in hung["reason"] and "load timeout (2s)" in hung["reason"]
    assert "load_timeout_secs" in hung["reason"]
    hung_import = rows[("hung_import", "")]
    assert hung_import["state"] == "UNAVAILABLE"
    assert "hung_import/1/model.py" in hung_import["reason"] and "did not finish within 2s" in hung_import["reason"]

    # A load request for it fails after the timeout too, and other models serve while it waits.
    outcome: list[httpx.Response] = []
    loading = threading.Thread(
        target=lambda: outcome.append(
            httpx.post(f"{server.url}/v2/repository/models/hung_initialize/load", json={}, timeout=60)
        )
    )
    loading.start()
    time.sleep(0.5)
    check_simple_output(infer_simple(None, server.url))
    loading.join()
    assert outcome[0].status_code == 400 and "load timeout (2s)" in outcome[0].json()["error"]
    check_simple_output(infer_simple(None, server.url))


def test_wrong_outputs_and_crashes_in_execute_fail_only_that_request(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    write_python_model(repository, "misbehaving", MISBEHAVING_MODEL)
    server = start_server(repository, *POLL)

    def infer(mode: int) -> httpx.Response:
        x = np.full((2, 4), mode, dtype=np.float32)
        body = {"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        return httpx.post(f"{server.url}/v2/models/misbehaving/infer", json=body, timeout=30)

    expected = {
        1: "did not produce output 'Y'",
        2: "output 'Y' has dtype int64, but the config declares TYPE_FP32",
        3: "output 'Y' has leading dimension 1 for a batch of 2",
        4: "output 'Y' has shape [2, 2], but the config declares [-1, 4]",
        5: "crashed: exit code 5",
    }
    for mode, words in expected.items():
        response = infer(mode)
        assert response.status_code == 500 and words in response.json()["error"], (mode, response.text)
        answer = infer(0)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["datatype"] == "FP32"
