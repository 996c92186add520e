"""Client mistakes against the real server: each is refused by name (HTTP 400 with a KServe error body, gRPC
INVALID_ARGUMENT), never answered 500 / UNKNOWN / INTERNAL, and never disturbs the requests around it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server.frontends.http_server import create_app
from tests.conftest import ServerProcess

ROW = [0.5] * 16


def _simple_body(**extra: Any) -> dict[str, Any]:
    inputs = [{"name": name, "shape": [1, 16], "datatype": "FP32", "data": ROW} for name in ("INPUT0", "INPUT1")]
    return {"inputs": inputs, **extra}


def _with_input0(**fields: Any) -> dict[str, Any]:
    body = _simple_body()
    body["inputs"][0].update(fields)
    return body


def _infer(server: ServerProcess, content: bytes, headers: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/simple/infer", content=content, headers=headers)


def _binary(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = orjson.dumps(header)
    return encoded + data, {"Inference-Header-Content-Length": str(len(encoded))}


def _assert_refused(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for fragment in fragments:
        assert fragment in error


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (_with_input0(datatype=["FP32"]), ["input 'INPUT0'", "unknown datatype"]),
        (_with_input0(shape=[1] * 70, data=[0.5]), ["input 'INPUT0'", "70 dimensions"]),
        (_with_input0(shape=[2**62, 2**62, 0], data=[]), ["input 'INPUT0'", "too large"]),
        (_with_input0(data=[[0.5] * 8, [0.5] * 7, [[0.5]]]), ["input 'INPUT0'", "nested unevenly"]),
        (_with_input0(data=[0.5, [0.5] * 15]), ["input 'INPUT0'", "nested unevenly"]),
        (_with_input0(data=[1e300] * 16), ["input 'INPUT0'", "does not fit FP32"]),
        (_simple_body(parameters={"binary_data_output": "false"}), ["'binary_data_output'", "true or false"]),
        (_simple_body(outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": "no"}}]), ["output 'OUTPUT0'"]),
        (_simple_body(parameters={"priority": "high"}), ["'priority'", "non-negative integer"]),
        (_simple_body(parameters={"priority": 1.5}), ["'priority'"]),
        (_simple_body(parameters={"timeout": -1}), ["'timeout'", "non-negative integer"]),
        (_simple_body(id=7), ["'id'", "string"]),
    ],
    ids=[
        "datatype-not-a-string",
        "too-many-dimensions",
        "shape-overflows-int64",
        "ragged-nesting",
        "mixed-nesting",
        "fp32-out-of-range",
        "binary-data-output-string",
        "binary-data-string",
        "priority-string",
        "priority-float",
        "timeout-negative",
        "id-not-a-string",
    ],
)
def test_json_mistakes_are_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], fragments: list[str]
) -> None:
    _assert_refused(_infer(server, orjson.dumps(body)), *fragments)


@pytest.mark.parametrize(
    ("shape", "parameters", "data", "fragments"),
    [
        ([1] * 70, {"binary_data_size": 4}, b"\0" * 4, ["input 'INPUT0'", "70 dimensions"]),
        ([2**62, 2**62, 0], {"binary_data_size": 0}, b"", ["input 'INPUT0'", "too large"]),
        ([1, 16], {"binary_data_size": True}, b"\0", ["input 'INPUT0'", "binary_data_size"]),
    ],
    ids=["too-many-dimensions", "shape-overflows-int64", "size-is-a-bool"],
)
def test_binary_mistakes_are_400_naming_the_tensor(
    server: ServerProcess, shape: list[int], parameters: dict[str, Any], data: bytes, fragments: list[str]
) -> None:
    header = {"inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32", "parameters": parameters}]}
    _assert_refused(_infer(server, *_binary(header, data)), *fragments)


def test_binary_input_with_json_data_too_is_refused(server: ServerProcess) -> None:
    body = _simple_body()
    body["inputs"][0]["parameters"] = {"binary_data_size": 64}
    _assert_refused(_infer(server, *_binary(body, b"\0" * 64)), "input 'INPUT0'", "both 'data' and binary_data_size")


def test_header_length_with_non_ascii_digits_is_400(server: ServerProcess) -> None:
    # "²" passes str.isdigit() but not int(); the header arrives as latin-1 text.
    response = _infer(server, b"{}", {"Inference-Header-Content-Length": b"\xb2"})
    _assert_refused(response, "Inference-Header-Content-Length must be a non-negative integer")


@pytest.mark.parametrize("ready", ["no", [1], 1])
def test_repository_index_ready_must_be_a_bool(server: ServerProcess, ready: object) -> None:
    response = httpx.post(f"{server.url}/v2/repository/index", json={"ready": ready})
    _assert_refused(response, "'ready' must be true or false")


@pytest.mark.parametrize("version", ["\u00b2", "\u0663"])
def test_versions_in_non_ascii_digits_are_400(server: ServerProcess, version: str) -> None:
    # Both pass str.isdigit(); "²" is not int()-able and "٣" would quietly read as version 3.
    base = f"{server.url}/v2/models/simple/versions/{version}"
    _assert_refused(httpx.post(f"{base}/infer", content=orjson.dumps(_simple_body())), "positive integer")
    for route in ("", "/config", "/stats"):
        response = httpx.get(base + route)
        assert response.status_code == 400 and "positive integer" in response.json()["error"], route
    assert httpx.get(f"{base}/ready").status_code == 400  # not ready: the protocol's answer has no body


def test_text_that_is_not_utf8_is_400_and_the_next_request_is_served(server: ServerProcess) -> None:
    url = f"{server.url}/v2/models/text_preprocessor/infer"
    broken = b"caf\xe9"
    header = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}
    content, headers = _binary(header, len(broken).to_bytes(4, "little") + broken)
    response = httpx.post(url, content=content, headers=headers, timeout=30)
    _assert_refused(response, "input 'TEXT'", "not UTF-8")
    good = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["Caf\u00e9  OK"]}]}
    outputs = {o["name"]: o["data"] for o in httpx.post(url, json=good, timeout=30).json()["outputs"]}
    assert outputs == {"NORMALIZED": ["caf\u00e9 ok"], "TOKEN_COUNT": [2]}


class _BrokenCore:
    """Just enough of ``InferenceServer`` for ``create_app``, failing the way a server bug would."""

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "modeldock", "version": "0", "extensions": []}

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        raise ValueError(f"cannot read {name!r}")


async def test_server_bugs_outside_infer_answer_in_protocol_shape() -> None:
    # The transport raises whatever the application raises, as a server would before dropping the connection.
    transport = httpx.ASGITransport(app=create_app(_BrokenCore()))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://modeldock") as client:
        response = await client.get("/v2/models/m/config")
        assert response.status_code == 500
        assert response.json() == {"error": "internal error: ValueError: cannot read 'm'"}
        assert (await client.get("/v2")).json()["name"] == "modeldock"


# -- gRPC -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _simple_request(request_id: str = "") -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="simple", id=request_id)
    for name in ("INPUT0", "INPUT1"):
        message.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        message.raw_input_contents.append(np.full(16, 0.5, np.float32).tobytes())
    return message


def _too_many_dimensions(message: service_pb2.ModelInferRequest) -> None:
    del message.inputs[0].shape[:]
    message.inputs[0].shape.extend([1] * 70)
    message.raw_input_contents[0] = b"\0" * 4


def _string_priority(message: service_pb2.ModelInferRequest) -> None:
    message.parameters["priority"].string_param = "high"


def _string_binary_data(message: service_pb2.ModelInferRequest) -> None:
    message.outputs.add(name="OUTPUT0").parameters["binary_data"].string_param = "yes"


def _negative_timeout(message: service_pb2.ModelInferRequest) -> None:
    message.parameters["timeout"].int64_param = -1


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_too_many_dimensions, "input 'INPUT0'"),
        (_string_priority, "'priority'"),
        (_negative_timeout, "'timeout'"),
        (_string_binary_data, "output 'OUTPUT0'"),
    ],
    ids=["too-many-dimensions", "priority-string", "timeout-negative", "binary-data-string"],
)
def test_grpc_mistakes_are_invalid_argument(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    change: Callable[[service_pb2.ModelInferRequest], None],
    fragment: str,
) -> None:
    message = _simple_request()
    change(message)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(message)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_grpc_version_in_non_ascii_digits_is_invalid_argument(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = _simple_request()
    request.model_version = "\u00b2"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "positive integer" in refused.value.details()
    assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="simple", version="\u00b2")).ready


def test_unparsable_grpc_message_is_invalid_argument(channel: grpc.Channel) -> None:
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda data: data,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        infer(b"\xff\xff\xff\xff not a protobuf message")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInfer" in info.value.details() and "not a valid protobuf message" in info.value.details()


def test_bad_stream_requests_get_errors_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    """Unparsable bytes and a broken request in the middle of good ones: each bad one gets its error on the
    stream, every good one its answer, and the stream ends only when the client closes it."""
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda data: data,
        response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
    )
    broken = _simple_request("broken")
    _too_many_dimensions(broken)
    sent = [
        _simple_request("good-1").SerializeToString(),
        b"\xff\xff not a protobuf message",
        broken.SerializeToString(),
        _simple_request("good-2").SerializeToString(),
    ]
    responses = list(stream(iter(sent), timeout=30))
    assert len(responses) == 4
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    assert "not a valid protobuf message" in errors.pop("")
    assert "input 'INPUT0'" in errors.pop("broken")
    assert not errors
    answered = {r.infer_response.id: r.infer_response for r in responses if not r.error_message}
    assert sorted(answered) == ["good-1", "good-2"]
    for answer in answered.values():
        np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32), np.full(16, 1.0))
