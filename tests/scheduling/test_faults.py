"""Faulty instances against the real server: an instance that raises, hangs past the request timeout or kills its
worker process fails only the requests it was running, with an error that says so; the instance is restarted and
the model stays READY. Requests on the model's other instances are answered correctly meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from tritonclient.utils import InferenceServerException

from server.devices import CPU
from server.errors import BackendError
from server.scheduling.instances import InstancePlacement, ModelInstance
from tests.conftest import ServerProcess

# Each request's first value picks what the instance does: a positive value is a sleep in milliseconds (the
# thread model) and, for the worker-process model, -1 raises, -2 kills the worker and -3 hangs.
WORKER_MODEL = """
import os
import time

import numpy as np


class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        x = request.get_input("INPUT")
        mode = float(x.flat[0])
        if mode == -1:
            raise RuntimeError("the model refuses -1")
        if mode == -2:
            os._exit(7)
        if mode == -3:
            time.sleep(60)
        return [{"OUTPUT": x * 2, "PID": np.array([os.getpid()], dtype=np.int64)}]
"""
HANG_MS = 20_000
TIMEOUT_S = 6.0  # generous: a worker process restarting on a loaded machine must fit in it


def _write(repository: Path, name: str, config: dict[str, Any], files: dict[str, str] | None = None) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.yaml").write_text(yaml.safe_dump(config))
    for filename, text in (files or {}).items():
        (version / filename).write_text(text)


@pytest.fixture(scope="module")
def faulty_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("faults")
    _write(
        repository,
        "threaded",
        {
            "backend": "tests.slow_backend:SleepBackend",
            "max_batch_size": 0,
            "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]}],
            "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
            "parameters": {"sleep_from_input": "true"},
        },
    )
    _write(
        repository,
        "worker",
        {
            "backend": "python",
            "max_batch_size": 0,
            "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
            "output": [
                {"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]},
                {"name": "PID", "data_type": "TYPE_INT64", "dims": [1]},
            ],
            "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        },
        {"model.py": WORKER_MODEL},
    )
    return start_server(repository, f"--request-timeout-secs={TIMEOUT_S}")


def _body(first: float) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT", "shape": [4], "datatype": "FP32", "data": [first, 1.0, 2.0, 3.0]}]}


def _ready(server: ServerProcess, model: str) -> bool:
    return httpx.get(f"{server.url}/v2/models/{model}/ready").status_code == 200


async def test_a_hung_thread_instance_fails_its_request_and_is_replaced(faulty_server: ServerProcess) -> None:
    url = f"{faulty_server.url}/v2/models/threaded/infer"
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        hung = asyncio.create_task(client.post(url, json=_body(HANG_MS)))
        await asyncio.sleep(0.2)
        # Meanwhile the model's other instance answers well-behaved clients correctly.
        for _ in range(5):
            good = await client.post(url, json=_body(1.0))
            assert good.status_code == 200, good.text
            assert good.json()["outputs"][0]["data"] == [2.0, 2.0, 4.0, 6.0]
        response = await hung
        waited = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert f"did not finish within its timeout of {TIMEOUT_S:g}s" in response.json()["error"]
    assert TIMEOUT_S <= waited < TIMEOUT_S + 5
    assert _ready(faulty_server, "threaded")
    # Both instances answer at once again: the hung call was abandoned, not waited for.
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        answers = await asyncio.gather(*(client.post(url, json=_body(200.0)) for _ in range(2)))
        assert all(a.status_code == 200 for a in answers)
        assert time.monotonic() - started < TIMEOUT_S
    log = faulty_server.log()
    assert "instance threaded_0_0 did not answer in time" in log or "instance threaded_0_1 did not answer" in log
    assert "restarted" in log


def test_the_request_timeout_parameter_shortens_the_bound(faulty_server: ServerProcess) -> None:
    started = time.monotonic()
    body = {**_body(1000.0), "parameters": {"timeout": 200_000}}
    response = httpx.post(f"{faulty_server.url}/v2/models/threaded/infer", json=body, timeout=30)
    assert response.status_code == 504
    assert "timeout of 0.2s" in response.json()["error"]
    assert time.monotonic() - started < TIMEOUT_S


def test_a_hung_worker_fails_its_request_and_is_restarted(faulty_server: ServerProcess) -> None:
    client = triton_grpc.InferenceServerClient(faulty_server.grpc_url)

    def infer(first: float) -> Any:
        tensor = triton_grpc.InferInput("INPUT", [4], "FP32")
        tensor.set_data_from_numpy(np.array([first, 1, 2, 3], dtype=np.float32))
        return client.infer("worker", [tensor])

    before = int(infer(1.0).as_numpy("PID")[0])
    with pytest.raises(InferenceServerException) as hung:
        infer(-3.0)
    assert hung.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "did not finish within its timeout" in hung.value.message()
    assert client.is_model_ready("worker")
    after = infer(5.0)
    np.testing.assert_array_equal(after.as_numpy("OUTPUT"), [10, 2, 4, 6])
    assert int(after.as_numpy("PID")[0]) != before


@pytest.mark.parametrize(("first", "status", "fragment"), [(-1.0, 500, "the model refuses -1"), (-2.0, 500, "crashed")])
async def test_a_raising_or_dying_worker_fails_only_its_request(
    faulty_server: ServerProcess, first: float, status: int, fragment: str
) -> None:
    url = f"{faulty_server.url}/v2/models/worker/infer"
    async with httpx.AsyncClient(timeout=60) as client:
        failed = await client.post(url, json=_body(first))
        assert failed.status_code == status and fragment in failed.json()["error"]
        assert _ready(faulty_server, "worker")
        again = await client.post(url, json=_body(3.0))
        assert again.status_code == 200, again.text
        assert again.json()["outputs"][0]["data"] == [6.0, 2.0, 4.0, 6.0]


class _Blocking:
    """A backend stand-in whose ``execute`` blocks until released, as a hung runtime call would."""

    def __init__(self, built: list[_Blocking]) -> None:
        self.release = threading.Event()
        built.append(self)

    def execute(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        if float(inputs["INPUT"].flat[0]) < 0:
            self.release.wait(30)
        return {"OUTPUT": inputs["INPUT"] * 2}

    def unload(self) -> None:
        pass


async def test_an_abandoned_thread_instance_gets_a_fresh_backend() -> None:
    built: list[_Blocking] = []
    instance = ModelInstance(InstancePlacement("probe", CPU), _Blocking(built), lambda: _Blocking(built))  # type: ignore[arg-type,return-value]
    hang = {"INPUT": np.array([-1.0], dtype=np.float32)}
    with pytest.raises(BackendError, match="did not finish the batch within 0.2s"):
        await instance.execute(hang, ["OUTPUT"], timeout_s=0.2)
    answer = await asyncio.wait_for(instance.execute({"INPUT": np.ones(1, np.float32)}, ["OUTPUT"], 5.0), 5)
    assert answer["OUTPUT"].tolist() == [2.0]
    assert len(built) == 2 and instance.backend is built[1]
    built[0].release.set()  # the abandoned call may finish later; nobody waits for it
    instance.unload()
