"""Request limits against the real server: body and message size, header size, number of inputs, tensor element
count, JSON nesting, and CORS staying off unless an origin is allowed. Each refusal names the limit, and the
server keeps answering well-behaved requests afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2_grpc

from server.protocol.generated import grpc_service_pb2 as pb
from server.protocol.limits import MAX_JSON_DEPTH
from tests.conftest import ServerProcess

ORIGIN = "http://dashboard.example"
ROW = [0.5] * 16


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    return start_server(
        bundled_repository,
        "--http-max-body-bytes=8192",
        "--grpc-max-message-bytes=8192",
        "--max-header-bytes=4096",
        "--max-inputs=4",
        "--max-tensor-elements=1000",
        f"--http-cors-origin={ORIGIN}",
    )


@pytest.fixture(scope="module")
def stub(limited: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(limited.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _body(inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    default = [{"name": n, "shape": [1, 16], "datatype": "FP32", "data": ROW} for n in ("INPUT0", "INPUT1")]
    return {"inputs": default if inputs is None else inputs}


def _check_still_serving(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/models/simple/infer", json=_body())
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1.0] * 16


def _grpc_request(inputs: int = 2, dims: tuple[int, ...] = (1, 16), payload: int = 64) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple")
    for position in range(inputs):
        tensor = request.inputs.add(name=f"INPUT{position}", datatype="FP32", shape=list(dims))
        tensor.contents.fp32_contents.extend([0.5] * (payload // 4))
    return request


def test_http_body_over_the_limit_is_413(limited: ServerProcess) -> None:
    big = _body([{"name": "INPUT0", "shape": [1, 4000], "datatype": "FP32", "data": [0.5] * 4000}])
    response = httpx.post(f"{limited.url}/v2/models/simple/infer", content=orjson.dumps(big))
    assert response.status_code == 413
    assert "at most 8192 are accepted (--http-max-body-bytes)" in response.json()["error"]
    # A chunked body (no Content-Length) is counted as it arrives, on FastAPI's routes too.
    chunks = (b" " * 1024 for _ in range(16))
    response = httpx.post(f"{limited.url}/v2/repository/index", content=chunks)
    assert response.status_code == 413
    _check_still_serving(limited)


def test_grpc_message_over_the_limit_is_resource_exhausted(
    limited: ServerProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_grpc_request(payload=16_384), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _check_still_serving(limited)


def test_headers_over_the_limit_are_refused(
    limited: ServerProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    response = httpx.get(f"{limited.url}/v2/health/live", headers={"x-padding": "p" * 5000})
    assert response.status_code == 431
    assert "--max-header-bytes" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.ServerLive(pb.ServerLiveRequest(), metadata=[("x-padding", "p" * 8000)], timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_too_many_inputs_are_refused(limited: ServerProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    inputs = [{"name": f"IN{i}", "shape": [1], "datatype": "FP32", "data": [0.0]} for i in range(5)]
    response = httpx.post(f"{limited.url}/v2/models/simple/infer", json=_body(inputs))
    assert response.status_code == 400
    assert "5 inputs; at most 4 are accepted (--max-inputs)" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_grpc_request(inputs=5, dims=(1,), payload=4), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-inputs" in refused.value.details()


def test_too_many_elements_are_refused_from_the_shape(
    limited: ServerProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    # The shape alone is refused: no data is read or allocated for it.
    inputs = [{"name": "INPUT0", "shape": [1000, 1000], "datatype": "FP32", "data": [0.0]}]
    response = httpx.post(f"{limited.url}/v2/models/simple/infer", json=_body(inputs))
    assert response.status_code == 400
    assert "input 'INPUT0'" in response.json()["error"] and "--max-tensor-elements" in response.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_grpc_request(dims=(2**40,), payload=4), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-tensor-elements" in refused.value.details()
    _check_still_serving(limited)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 2000])
def test_deep_json_is_refused(limited: ServerProcess, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    body = b'{"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": ' + nested + b"}]}"
    response = httpx.post(f"{limited.url}/v2/models/simple/infer", content=body)
    assert response.status_code == 400
    response = httpx.post(f"{limited.url}/v2/repository/index", content=b'{"a": ' + nested + b"}")
    assert response.status_code == 400
    _check_still_serving(limited)


def test_cors_answers_only_the_allowed_origin(limited: ServerProcess) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = httpx.options(f"{limited.url}/v2/models/simple/infer", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    response = httpx.post(f"{limited.url}/v2/models/simple/infer", json=_body(), headers={"Origin": ORIGIN})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.post(f"{limited.url}/v2/models/simple/infer", json=_body(), headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(server: ServerProcess) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = httpx.options(f"{server.url}/v2/models/simple/infer", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    response = httpx.post(f"{server.url}/v2/models/simple/infer", json=_body(), headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_default_limits_admit_a_normal_request(server: ServerProcess) -> None:
    big = np.zeros((1, 16), dtype=np.float32)
    response = httpx.post(
        f"{server.url}/v2/models/simple/infer",
        json=_body(
            [
                {"name": n, "shape": [1, 16], "datatype": "FP32", "data": big.ravel().tolist()}
                for n in ("INPUT0", "INPUT1")
            ]
        ),
    )
    assert response.status_code == 200
