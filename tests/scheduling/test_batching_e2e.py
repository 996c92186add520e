"""Dynamic batching and instance scheduling through the real server over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import ServerProcess

SCALE = 3.0


def write_model(repository: Path, name: str, config: dict[str, Any], model: onnx.ModelProto | None = None) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.yaml").write_text(yaml.safe_dump(config))
    if model is not None:
        (version / "model.onnx").write_bytes(model.SerializeToString())


def scale_model() -> onnx.ModelProto:
    """OUTPUT = 3 * INPUT over [batch, n] with n variable, so requests of different widths cannot share a batch."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT", "scale"], ["OUTPUT"])],
        "scale",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [SCALE])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ragged_sum_model() -> onnx.ModelProto:
    """SUM[i] = sum of request i's INPUT, from the 1-D concatenation of a ragged batch and the INDEX batch input
    (accumulated element counts with a leading zero): cumsum, then differences at the request boundaries."""
    nodes = [
        helper.make_node("CumSum", ["INPUT", "axis0"], ["running"]),
        helper.make_node("Concat", ["zero", "running"], ["padded"], axis=0),
        helper.make_node("Slice", ["INDEX", "one", "big"], ["ends"]),
        helper.make_node("Slice", ["INDEX", "zero_i", "minus_one"], ["starts"]),
        helper.make_node("Gather", ["padded", "ends"], ["at_end"]),
        helper.make_node("Gather", ["padded", "starts"], ["at_start"]),
        helper.make_node("Sub", ["at_end", "at_start"], ["sums"]),
        helper.make_node("Unsqueeze", ["sums", "one"], ["SUM"]),
    ]
    constants = [
        helper.make_tensor("axis0", TensorProto.INT64, [], [0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero_i", TensorProto.INT64, [1], [0]),
        helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("big", TensorProto.INT64, [1], [2**62]),
    ]
    graph = helper.make_graph(
        nodes,
        "ragged_sum",
        [
            helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["elements"]),
            helper.make_tensor_value_info("INDEX", TensorProto.INT64, ["requests_plus_one"]),
        ],
        [helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["requests", 1])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def sleepy_config(sleep_ms: int, max_batch_size: int, instances: int = 1, **batching: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "tests.slow_backend:SleepBackend",
        "max_batch_size": max_batch_size,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]}],
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "parameters": {"sleep_ms": str(sleep_ms)},
    }
    if batching:
        config["dynamic_batching"] = batching
    return config


@pytest.fixture(scope="module")
def batching_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("batching") / "models"
    write_model(
        repository,
        "scale",
        {
            "backend": "onnxruntime",
            "max_batch_size": 16,
            "dynamic_batching": {"max_queue_delay_microseconds": 5000},
            "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
            "parameters": {"intra_op_thread_count": "1"},
        },
        scale_model(),
    )
    write_model(
        repository,
        "ragged_sum",
        {
            "backend": "onnxruntime",
            "max_batch_size": 32,
            "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [-1], "allow_ragged_batch": True}],
            "output": [{"name": "SUM", "data_type": "TYPE_FP32", "dims": [1]}],
            "batch_input": [
                {
                    "kind": "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO",
                    "target_name": ["INDEX"],
                    "data_type": "TYPE_INT64",
                    "source_input": ["INPUT"],
                }
            ],
            "dynamic_batching": {"max_queue_delay_microseconds": 20_000},
        },
        ragged_sum_model(),
    )
    write_model(repository, "sleepy_parallel", sleepy_config(500, max_batch_size=0, instances=2))
    write_model(
        repository, "sleepy_queue", sleepy_config(500, max_batch_size=1, default_queue_policy={"max_queue_size": 1})
    )
    for name in ("sleepy_grpc_cancel", "sleepy_stream_close", "sleepy_http_close"):
        write_model(repository, name, sleepy_config(1000, max_batch_size=1, default_queue_policy={"max_queue_size": 1}))
    write_model(
        repository,
        "sleepy_timeout",
        sleepy_config(500, max_batch_size=1, default_queue_policy={"default_timeout_microseconds": 50_000}),
    )
    return start_server(repository)


def body(data: np.ndarray, **parameters: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "inputs": [{"name": "INPUT", "shape": list(data.shape), "datatype": "FP32", "data": data.ravel().tolist()}]
    }
    if parameters:
        request["parameters"] = parameters
    return request


async def test_200_concurrent_mixed_shape_requests_get_their_own_answers(batching_server: ServerProcess) -> None:
    inputs = [np.arange(1 + i % 7, dtype=np.float32)[None, :] + 1000 * i for i in range(200)]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=60, limits=limits) as client:
        replies = await asyncio.gather(
            *(client.post("/v2/models/scale/infer", json={**body(x), "id": str(i)}) for i, x in enumerate(inputs))
        )
        for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
            assert reply.status_code == 200, reply.text
            payload = reply.json()
            assert payload["id"] == str(i)
            output = payload["outputs"][0]
            assert output["shape"] == list(x.shape)
            np.testing.assert_allclose(np.array(output["data"], dtype=np.float32), (SCALE * x).ravel())
        stats = (await client.get("/v2/models/scale/stats")).json()["model_stats"][0]
    assert stats["inference_count"] == 200
    assert stats["execution_count"] < stats["inference_count"]
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 1


async def test_ragged_requests_share_a_batch(batching_server: ServerProcess) -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 1 + i % 6), dtype=np.float32) for i in range(48)]
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=60) as client:
        replies = await asyncio.gather(*(client.post("/v2/models/ragged_sum/infer", json=body(x)) for x in inputs))
        for x, reply in zip(inputs, replies, strict=True):
            assert reply.status_code == 200, reply.text
            [output] = reply.json()["outputs"]
            assert output["shape"] == [1, 1]
            assert output["data"][0] == pytest.approx(float(x.sum()), abs=1e-3)  # float32 running sums
        stats = (await client.get("/v2/models/ragged_sum/stats")).json()["model_stats"][0]
    assert stats["inference_count"] == 48
    # Only 8 requests share any one length, so a larger batch must have mixed lengths.
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 8


async def test_two_instances_serve_two_requests_in_the_time_of_one(batching_server: ServerProcess) -> None:
    data = np.ones((4,), dtype=np.float32)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as client:
        await client.post("/v2/models/sleepy_parallel/infer", json=body(data))
        begin = time.monotonic()
        replies = await asyncio.gather(
            *(client.post("/v2/models/sleepy_parallel/infer", json=body(data)) for _ in range(2))
        )
        elapsed = time.monotonic() - begin
    assert [r.status_code for r in replies] == [200, 200]
    assert elapsed < 0.85, f"two 500 ms requests on two instances took {elapsed:.2f}s"


async def test_full_queue_answers_503_at_once(batching_server: ServerProcess) -> None:
    data = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v2/models/sleepy_queue/infer", json=body(data)))
        await asyncio.sleep(0.15)
        queued = asyncio.create_task(client.post("/v2/models/sleepy_queue/infer", json=body(data)))
        await asyncio.sleep(0.1)
        begin = time.monotonic()
        rejected = await client.post("/v2/models/sleepy_queue/infer", json=body(data))
        assert time.monotonic() - begin < 0.3
        assert rejected.status_code == 503
        assert "queue is full" in rejected.json()["error"]
        # Another model is not held up by the full queue.
        other = await client.post("/v2/models/scale/infer", json=body(data))
        assert other.status_code == 200
        assert (await running).status_code == 200
        assert (await queued).status_code == 200


async def test_queue_timeout_answers_503(batching_server: ServerProcess) -> None:
    data = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v2/models/sleepy_timeout/infer", json=body(data)))
        await asyncio.sleep(0.15)
        timed_out = await client.post("/v2/models/sleepy_timeout/infer", json=body(data))
        assert timed_out.status_code == 503
        assert "timed out" in timed_out.json()["error"]
        assert (await running).status_code == 200


def grpc_request(model: str) -> service_pb2.ModelInferRequest:
    data = np.ones((1, 4), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(data.tobytes())
    return request


async def wait_for_pending(client: httpx.AsyncClient, model: str, count: int) -> None:
    """Until the model's pending-request gauge reads ``count`` (it drops when a cancelled request is dropped)."""
    pattern = f'nv_inference_pending_request_count{{model="{model}",version="1"}} {float(count)}'
    for _ in range(100):
        if pattern in (await client.get("/metrics")).text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model}: pending requests never reached {count}")


async def check_cancelled_request_was_dropped(client: httpx.AsyncClient, model: str) -> None:
    """With one request running and the cancelled one gone from the queue, the queue (size 1) has room again."""
    data = np.ones((1, 4), dtype=np.float32)
    await wait_for_pending(client, model, 0)
    queued = await client.post(f"/v2/models/{model}/infer", json=body(data))
    assert queued.status_code == 200, queued.text
    stats = (await client.get(f"/v2/models/{model}/stats")).json()["model_stats"][0]
    # The running request and the one queued after the cancel ran; the cancelled one did not.
    assert stats["inference_count"] == 2
    assert stats["inference_stats"]["success"]["count"] == 2
    assert stats["inference_stats"]["fail"]["count"] == 1
    await wait_for_pending(client, model, 0)


async def abandon_grpc_call(server: ServerProcess, client: httpx.AsyncClient, model: str) -> None:
    async with grpc.aio.insecure_channel(server.grpc_url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_request(model))
        await wait_for_pending(client, model, 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


async def abandon_grpc_stream(server: ServerProcess, client: httpx.AsyncClient, model: str) -> None:
    async with grpc.aio.insecure_channel(server.grpc_url) as channel:
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        await stream.write(grpc_request(model))
        await wait_for_pending(client, model, 1)
        stream.cancel()


async def abandon_http_request(server: ServerProcess, client: httpx.AsyncClient, model: str) -> None:
    data = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as impatient:
        abandoned = asyncio.create_task(impatient.post(f"/v2/models/{model}/infer", json=body(data)))
        await wait_for_pending(client, model, 1)
        abandoned.cancel()  # httpx closes the connection of a request it gives up on
        with pytest.raises(asyncio.CancelledError):
            await abandoned


@pytest.mark.parametrize(
    ("model", "abandon"),
    [
        ("sleepy_grpc_cancel", abandon_grpc_call),
        ("sleepy_stream_close", abandon_grpc_stream),
        ("sleepy_http_close", abandon_http_request),
    ],
    ids=["cancelled-grpc-call", "closed-grpc-stream", "closed-http-connection"],
)
async def test_request_whose_client_left_leaves_the_queue(
    batching_server: ServerProcess,
    model: str,
    abandon: Callable[[ServerProcess, httpx.AsyncClient, str], Awaitable[None]],
) -> None:
    data = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as client:
        running = asyncio.create_task(client.post(f"/v2/models/{model}/infer", json=body(data)))
        await asyncio.sleep(0.1)
        await abandon(batching_server, client, model)
        followers = asyncio.create_task(check_cancelled_request_was_dropped(client, model))
        assert (await running).status_code == 200
        await followers


async def test_http_client_that_left_leaves_the_queue_under_uvicorn(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """The same as above for the other HTTP server: its infer route watches the connection through ASGI."""
    config = sleepy_config(1000, max_batch_size=1, default_queue_policy={"max_queue_size": 1})
    write_model(tmp_path, "sleepy_http_close", config)
    server = start_server(tmp_path, "--http-server", "uvicorn")
    data = np.ones((1, 4), dtype=np.float32)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v2/models/sleepy_http_close/infer", json=body(data)))
        await asyncio.sleep(0.1)
        await abandon_http_request(server, client, "sleepy_http_close")
        followers = asyncio.create_task(check_cancelled_request_was_dropped(client, "sleepy_http_close"))
        assert (await running).status_code == 200
        await followers
