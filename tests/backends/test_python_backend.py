"""The Python backend end to end: user code in worker processes, crashes, user errors and load errors."""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

WORKER_MODEL = """
import os

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        self.kind = args["model_instance_kind"]
        self.version = int(args["model_version"])

    def execute(self, requests):
        (request,) = requests
        x = request.get_input("X")
        mode = int(request.get_input("MODE").max())
        if mode == 1:
            os._exit(3)
        if mode == 2:
            raise ValueError("MODE 2 is not allowed here")
        if mode == 3:
            import ctypes

            ctypes.string_at(0)  # segmentation fault
        pid = np.full((x.shape[0], 1), os.getpid(), dtype=np.int64)
        return [{"Y": x * 2.0 + self.version, "PID": pid}]
"""

WORKER_CONFIG = """
backend: python
max_batch_size: 8
input:
  - {name: X, data_type: TYPE_FP32, dims: [4]}
  - {name: MODE, data_type: TYPE_INT32, dims: [1]}
output:
  - {name: Y, data_type: TYPE_FP32, dims: [4]}
  - {name: PID, data_type: TYPE_INT64, dims: [1]}
"""

AUTO_MODEL = """
import numpy as np


class Model:
    @staticmethod
    def auto_complete_config(config):
        config["input"] = [{"name": "A", "data_type": "TYPE_INT64", "dims": [-1]}]
        config["output"] = [{"name": "TOTAL", "data_type": "TYPE_INT64", "dims": [1]}]
        return config

    def execute(self, requests):
        a = requests[0].inputs["A"]
        return {"TOTAL": a.sum(axis=1, keepdims=True)}
"""


def _write_model(repo: Path, name: str, config: str | None, files: dict[str, str]) -> None:
    version = repo / name / "1"
    version.mkdir(parents=True)
    if config is not None:
        (repo / name / "config.yaml").write_text(textwrap.dedent(config))
    for filename, text in files.items():
        (version / filename).write_text(text)


@pytest.fixture(scope="module")
def python_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repo = tmp_path_factory.mktemp("python-backend")
    _write_model(repo, "worker", WORKER_CONFIG, {"model.py": WORKER_MODEL})
    _write_model(repo, "auto", "backend: python\nmax_batch_size: 4\n", {"model.py": AUTO_MODEL})
    _write_model(repo, "syntax_error", "backend: python\n", {"model.py": "def broken(:\n"})
    _write_model(repo, "no_io", "backend: python\n", {"model.py": "class TritonPythonModel:\n    pass\n"})
    _write_model(
        repo,
        "init_fails",
        WORKER_CONFIG,
        {
            "model.py": "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no GPU')\n"
            "    def execute(self, requests):\n        return []\n"
        },
    )
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repo / "simple")
    return start_server(repo)


def _worker_inputs(x: np.ndarray, mode: int) -> list[httpclient.InferInput]:
    x_in = httpclient.InferInput("X", list(x.shape), "FP32")
    x_in.set_data_from_numpy(x)
    mode_in = httpclient.InferInput("MODE", [x.shape[0], 1], "INT32")
    mode_in.set_data_from_numpy(np.full((x.shape[0], 1), mode, dtype=np.int32))
    return [x_in, mode_in]


def _index(server: ServerProcess) -> dict[str, dict[str, str]]:
    rows = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
    return {row["name"]: row for row in rows}


def test_user_code_runs_in_a_worker_process(python_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(python_server.url.removeprefix("http://"))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = client.infer("worker", _worker_inputs(x, 0))
    np.testing.assert_array_equal(result.as_numpy("Y"), x * 2.0 + 1)
    pids = result.as_numpy("PID")
    assert pids.shape == (3, 1)
    assert int(pids[0, 0]) != python_server.process.pid


@pytest.mark.parametrize(("mode", "exit_description"), [(1, "exit code 3"), (3, "signal SIGSEGV")])
def test_crash_fails_the_request_and_the_instance_restarts(
    python_server: ServerProcess, mode: int, exit_description: str
) -> None:
    client = httpclient.InferenceServerClient(python_server.url.removeprefix("http://"))
    x = np.ones((1, 4), dtype=np.float32)
    before = int(client.infer("worker", _worker_inputs(x, 0)).as_numpy("PID")[0, 0])
    with pytest.raises(InferenceServerException) as crash:
        client.infer("worker", _worker_inputs(x, mode))
    message = str(crash.value)
    assert "instance worker_0_0 crashed" in message and exit_description in message and "restarting" in message
    after = client.infer("worker", _worker_inputs(x, 0))
    np.testing.assert_array_equal(after.as_numpy("Y"), x * 2.0 + 1)
    assert int(after.as_numpy("PID")[0, 0]) != before


def test_user_exception_fails_only_that_request(python_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(python_server.url.removeprefix("http://"))
    x = np.ones((2, 4), dtype=np.float32)
    pid = int(client.infer("worker", _worker_inputs(x, 0)).as_numpy("PID")[0, 0])
    response = httpx.post(
        f"{python_server.url}/v2/models/worker/infer",
        json={
            "inputs": [
                {"name": "X", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()},
                {"name": "MODE", "datatype": "INT32", "shape": [2, 1], "data": [2, 2]},
            ]
        },
    )
    assert response.status_code == 500
    assert "ValueError: MODE 2 is not allowed here" in response.json()["error"]
    again = client.infer("worker", _worker_inputs(x, 0))
    assert int(again.as_numpy("PID")[0, 0]) == pid  # same worker: an exception is not a crash


def test_auto_complete_config_from_the_user_class(python_server: ServerProcess) -> None:
    metadata = httpx.get(f"{python_server.url}/v2/models/auto").json()
    assert metadata["inputs"] == [{"name": "A", "datatype": "INT64", "shape": [-1, -1]}]
    client = httpclient.InferenceServerClient(python_server.url.removeprefix("http://"))
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    a_in = httpclient.InferInput("A", [2, 3], "INT64")
    a_in.set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("auto", [a_in]).as_numpy("TOTAL"), [[6], [15]])


def test_bad_models_are_unavailable_with_a_reason_and_others_serve(python_server: ServerProcess) -> None:
    index = _index(python_server)
    assert index["syntax_error"]["state"] == "UNAVAILABLE"
    assert "model.py" in index["syntax_error"]["reason"] and "SyntaxError" in index["syntax_error"]["reason"]
    assert index["no_io"]["state"] == "UNAVAILABLE"
    assert "input" in index["no_io"]["reason"] and "auto_complete_config" in index["no_io"]["reason"]
    assert index["init_fails"]["state"] == "UNAVAILABLE"
    assert "initialize() failed: RuntimeError: no GPU" in index["init_fails"]["reason"]
    for name in ("worker", "auto", "simple"):
        assert index[name]["state"] == "READY", index[name]


def _load_text_preprocessor() -> type:
    path = BUNDLED_REPOSITORY / "text_preprocessor" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("bundled_text_preprocessor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel  # type: ignore[no-any-return]


def test_bundled_text_preprocessor_matches_running_it_directly(server: ServerProcess) -> None:
    texts = np.array([["  Hello,   WORLD! "], ["Ｆｕｌｌ-width ＴＥＸＴ"], [""]], dtype=np.object_)
    texts = np.vectorize(lambda s: s.encode("utf-8"), otypes=[np.object_])(texts)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    text_in = httpclient.InferInput("TEXT", [3, 1], "BYTES")
    text_in.set_data_from_numpy(texts)
    result = client.infer("text_preprocessor", [text_in])

    class Request:
        inputs = {"TEXT": texts}

        def get_input(self, name: str) -> np.ndarray:
            return self.inputs[name]

    model = _load_text_preprocessor()()
    model.initialize({"model_name": "text_preprocessor"})
    (expected,) = model.execute([Request()])
    np.testing.assert_array_equal(result.as_numpy("NORMALIZED"), expected["NORMALIZED"])
    np.testing.assert_array_equal(result.as_numpy("TOKEN_COUNT"), expected["TOKEN_COUNT"])
    assert result.as_numpy("NORMALIZED")[0, 0] == b"hello, world!"
    assert result.as_numpy("TOKEN_COUNT").ravel().tolist() == [4, 4, 0]


def test_shutdown_stops_the_workers_cleanly(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    _write_model(tmp_path, "worker", WORKER_CONFIG, {"model.py": WORKER_MODEL})
    server = start_server(tmp_path)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    pid = int(client.infer("worker", _worker_inputs(np.zeros((1, 4), dtype=np.float32), 0)).as_numpy("PID")[0, 0])
    assert Path(f"/proc/{pid}").exists()
    server.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert "terminating" not in server.log_path.read_text(errors="replace")
