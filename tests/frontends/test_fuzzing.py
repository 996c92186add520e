"""Fuzzed input against the real server, with bounded examples so it runs in CI in well under a minute.

Hypothesis builds inference requests with wrong-typed fields, huge or negative dims, truncated binary tensors,
invalid UTF-8 and deep JSON, over HTTP and gRPC (random bytes as protobuf too); schemathesis drives every route of
the server's own OpenAPI description. Every answer must be a client error (or success), never a 5xx, INTERNAL,
UNKNOWN or a hang, and a well-behaved client running alongside must get the right answer every time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.protocol.generated import grpc_service_pb2 as pb
from tests.conftest import ServerProcess

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
DATATYPES = ["BOOL", "INT8", "INT32", "INT64", "UINT8", "UINT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "NOPE", ""]
# Codes a client mistake may get; INTERNAL and UNKNOWN would be server faults.
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
A = np.arange(16, dtype=np.float32)


class WellBehavedClient:
    """Sends correct requests in a loop while the fuzzers run, and records any answer that is not right."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered = 0
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": A.tolist()},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
            ]
        }
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/v2/models/simple/infer", json=body)
                    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
                    if outputs["OUTPUT0"] != (A + 1).tolist() or outputs["OUTPUT1"] != (A - 1).tolist():
                        self.wrong.append(response.text)
                except Exception as exc:  # any failure of a good request is a finding
                    self.wrong.append(repr(exc))
                self.answered += 1

    def __enter__(self) -> WellBehavedClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def fuzz_server(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> Iterator[ServerProcess]:
    server = start_server(bundled_repository, "--max-header-bytes=16384")
    with WellBehavedClient(server.url) as bystander:
        yield server
    assert bystander.answered > 0
    assert not bystander.wrong, bystander.wrong[:3]
    assert server.process.poll() is None, "the server died while fuzzed"


@pytest.fixture(scope="module")
def http(fuzz_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.grpc_url) as opened:
        yield opened


def _assert_client_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
dims = st.integers(min_value=-(2**63), max_value=2**64) | st.sampled_from([0, 1, 16, -1, 2**31, 2**62])
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["INPUT0", "INPUT1", "X", ""]) | json_values,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "shape": st.lists(dims, max_size=5) | json_values,
    },
    optional={"data": json_values | st.lists(st.floats(), max_size=20), "parameters": json_values},
)
bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values},
)


@FUZZ
@given(body=bodies)
def test_fuzzed_json_requests_are_client_errors(http: httpx.Client, body: dict[str, Any]) -> None:
    _assert_client_error(http.post("/v2/models/simple/infer", content=json.dumps(body).encode()))


@FUZZ
@given(
    header=bodies,
    binary=st.binary(max_size=256),
    declared=st.integers(min_value=-10, max_value=600) | st.just(None),
    sizes=st.lists(st.integers(min_value=-5, max_value=300), min_size=1, max_size=2),
)
def test_fuzzed_binary_requests_are_client_errors(
    http: httpx.Client, header: dict[str, Any], binary: bytes, declared: int | None, sizes: list[int]
) -> None:
    """Binary tensors whose sizes do not add up: truncated, overlong, or with a wrong header length."""
    if isinstance(header.get("inputs"), list):
        for tensor, size in zip(header["inputs"], sizes, strict=False):
            if not isinstance(tensor, dict):
                continue
            tensor.pop("data", None)
            tensor["parameters"] = {"binary_data_size": size}
    encoded = json.dumps(header).encode()
    length = len(encoded) if declared is None else declared
    response = http.post(
        "/v2/models/simple/infer",
        content=encoded + binary,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    _assert_client_error(response)


@FUZZ
@given(body=st.binary(max_size=300), path=st.sampled_from(["/v2/models/simple/infer", "/v2/repository/index"]))
def test_invalid_utf8_and_garbage_bodies_are_client_errors(http: httpx.Client, body: bytes, path: str) -> None:
    _assert_client_error(http.post(path, content=b'{"inputs": "' + body + b'"}'))
    _assert_client_error(http.post(path, content=body))


@FUZZ
@given(depth=st.integers(min_value=1, max_value=5000), opener=st.sampled_from([b"[", b'{"a":']))
def test_deep_json_is_a_client_error(http: httpx.Client, depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    _assert_client_error(http.post("/v2/models/simple/infer", content=opener * depth + b"1" + closer * depth))


def _raw_call(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    return channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out


@FUZZ
@given(
    data=st.binary(max_size=200),
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "RepositoryModelLoad", "SystemSharedMemoryRegister"]),
)
def test_malformed_protobuf_is_invalid_argument(channel: grpc.Channel, data: bytes, method: str) -> None:
    try:
        _raw_call(channel, method)(data, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())


grpc_contents = st.fixed_dictionaries(
    {},
    optional={
        "fp32_contents": st.lists(st.floats(width=32), max_size=20),
        "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
        "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
        "bytes_contents": st.lists(st.binary(max_size=8), max_size=5),
        "bool_contents": st.lists(st.booleans(), max_size=5),
    },
)
grpc_tensors = st.builds(
    lambda name, datatype, shape, contents: pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    ),
    st.sampled_from(["INPUT0", "INPUT1", "X", ""]),
    st.sampled_from(DATATYPES),
    st.lists(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, 16]), max_size=4),
    grpc_contents,
)


@FUZZ
@given(
    tensors=st.lists(grpc_tensors, max_size=3),
    raw=st.lists(st.binary(max_size=80), max_size=3),
    model=st.sampled_from(["simple", "", "nope", "simple\x00"]),
    parameter=st.sampled_from([None, ("priority", -1), ("timeout", 10**18), ("binary_data_output", "x")]),
)
def test_wrong_typed_grpc_requests_are_client_errors(
    channel: grpc.Channel,
    tensors: list[pb.ModelInferRequest.InferInputTensor],
    raw: list[bytes],
    model: str,
    parameter: tuple[str, Any] | None,
) -> None:
    request = pb.ModelInferRequest(model_name=model, inputs=tensors, raw_input_contents=raw)
    if parameter is not None:
        name, value = parameter
        target = request.parameters[name]
        if isinstance(value, str):
            target.string_param = value
        else:
            target.int64_param = value
    try:
        _raw_call(channel, "ModelInfer")(request.SerializeToString(), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())


def test_openapi_routes_never_answer_5xx(fuzz_server: ServerProcess) -> None:
    """Every operation of the server's own OpenAPI description, with schemathesis-generated paths and bodies."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20

    for operation in operations:

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def call(case: Any) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)

        call()
