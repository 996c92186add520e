"""Graceful shutdown of the real server process: SIGTERM/SIGINT drain the requests in flight, then it exits."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import ServerProcess
from tests.scheduling.test_batching_e2e import body, sleepy_config, wait_for_pending, write_model


def sleepy_repository(root: Path, sleep_ms: int) -> Path:
    """One model running one request at a time on one instance, so later requests queue in its batcher."""
    repository = root / "models"
    write_model(repository, "sleepy", sleepy_config(sleep_ms, max_batch_size=1, max_queue_delay_microseconds=0))
    return repository


def grpc_infer_request(value: float) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="sleepy")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, dtype=np.float32).tobytes())
    return request


async def wait_exit(server: ServerProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while server.process.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"server still running {timeout_s}s after the signal:\n{server.log()}")
        await asyncio.sleep(0.05)
    return server.process.returncode


async def test_sigterm_finishes_requests_in_flight_and_queued_then_exits_0(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(sleepy_repository(tmp_path, 700), "--shutdown-timeout", "30")
    values = [1.0, 2.0, 3.0, 4.0]
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        grpc.aio.insecure_channel(server.grpc_url) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        http_calls = [
            asyncio.create_task(client.post("/v2/models/sleepy/infer", json=body(np.full((1, 4), v, np.float32))))
            for v in values[:3]
        ]
        grpc_call = stub.ModelInfer(grpc_infer_request(values[3]))
        # One request executing, three waiting in the batcher's queue.
        await wait_for_pending(client, "sleepy", 3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        # During the drain: not ready on either protocol, still live, new inferences refused on both.
        await asyncio.sleep(0.2)
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/models/sleepy/ready")).status_code != 200
        assert not (await stub.ServerReady(service_pb2.ServerReadyRequest())).ready
        refused = await client.post("/v2/models/sleepy/infer", json=body(np.ones((1, 4), np.float32)))
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["error"]
        with pytest.raises(grpc.aio.AioRpcError) as refused_grpc:
            await stub.ModelInfer(grpc_infer_request(9.0))
        assert refused_grpc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.poll() is None, "the server left before its requests were answered"

        # Every request admitted before the signal is answered, and answered correctly.
        for value, call in zip(values[:3], http_calls, strict=True):
            response = await call
            assert response.status_code == 200, response.text
            assert response.json()["outputs"][0]["data"] == [2 * value] * 4
        grpc_response = await grpc_call
        assert np.frombuffer(grpc_response.raw_output_contents[0], np.float32).tolist() == [2 * values[3]] * 4

    assert await wait_exit(server, 20) == 0
    # Four requests of 0.7 s one after another: the drain waited for them rather than cutting them off.
    assert time.monotonic() - signalled >= 1.5
    log = server.log()
    assert "model 'sleepy' unloaded" in log
    assert "shutdown complete" in log


async def test_sigint_on_an_idle_server_exits_0_at_once(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(sleepy_repository(tmp_path, 10))
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()
    server.process.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert await wait_exit(server, 15) == 0
    assert time.monotonic() - started < 10
    assert "model 'sleepy' unloaded" in server.log()


async def test_shutdown_timeout_bounds_a_drain_that_takes_too_long(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = start_server(sleepy_repository(tmp_path, 8000), "--shutdown-timeout", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v2/models/sleepy/infer", json=body(np.ones((1, 4), np.float32))))
        queued = asyncio.create_task(client.post("/v2/models/sleepy/infer", json=body(np.ones((1, 4), np.float32))))
        await wait_for_pending(client, "sleepy", 1)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Well before the 8 s batch could end: the timeout, not the model, decided when the process left.
        assert await wait_exit(server, 7) == 1
        assert time.monotonic() - signalled < 7
        for call in (running, queued):
            try:
                response = await call
            except httpx.HTTPError:
                continue  # the connection closed unanswered
            assert response.status_code != 200
    assert "shutdown cut short" in server.log()


async def test_a_second_signal_cuts_the_drain_short(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = start_server(sleepy_repository(tmp_path, 8000), "--shutdown-timeout", "60")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        calls = [
            asyncio.create_task(client.post("/v2/models/sleepy/infer", json=body(np.ones((1, 4), np.float32))))
            for _ in range(2)
        ]
        await wait_for_pending(client, "sleepy", 1)  # one executing, one queued behind it
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert server.process.poll() is None, "the first signal alone must wait for the request"
        server.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        assert await wait_exit(server, 7) == 1
        assert time.monotonic() - signalled < 7
        for call in calls:
            with pytest.raises(httpx.HTTPError):
                (await call).raise_for_status()
    assert "no longer waiting for requests in flight" in server.log()


def test_shutdown_timeout_must_not_be_negative(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(tmp_path), "--shutdown-timeout", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--shutdown-timeout" in result.stderr
