"""The tensor codec and the HTTP body format, without a server."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from server.errors import InvalidInput
from server.protocol.http_codec import decode_request, encode_response, parse_header_length
from server.protocol.parameters import check_output_parameters, check_request_parameters
from server.protocol.shared_memory import SharedMemoryRegistry
from server.protocol.tensor_codec import (
    check_shape,
    deserialize_bytes_tensor,
    deserialize_raw,
    from_list,
    serialize_bytes_tensor,
    serialize_raw,
)
from server.protocol.types import InferRequest, InferResponse, RequestedOutput

# Nothing registered: these tests send every tensor in the body.
NO_REGIONS = SharedMemoryRegistry()
FIXED = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@pytest.mark.parametrize("datatype", FIXED)
def test_raw_round_trip_every_fixed_datatype(datatype: str) -> None:
    from server.protocol.datatypes import WIRE_TO_NUMPY

    rng = np.random.default_rng(0)
    array = (rng.random((2, 3)) * 100).astype(WIRE_TO_NUMPY[datatype])
    raw = serialize_raw(array)
    back = deserialize_raw(datatype, [2, 3], raw, "x")
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


@pytest.mark.parametrize("datatype", FIXED)
def test_list_round_trip_every_fixed_datatype(datatype: str) -> None:
    from server.protocol.datatypes import WIRE_TO_NUMPY

    array = np.array([[1, 0, 1], [0, 1, 1]]).astype(WIRE_TO_NUMPY[datatype])
    back = from_list(datatype, [2, 3], array.reshape(-1).tolist(), "x")
    np.testing.assert_array_equal(back, array)
    nested = from_list(datatype, [2, 3], array.tolist(), "x")
    np.testing.assert_array_equal(nested, array)


def test_bytes_wire_form_is_length_prefixed() -> None:
    array = np.array([b"ab", b"", "\u00e9".encode()], dtype=np.object_)
    raw = serialize_bytes_tensor(array)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "\u00e9".encode()
    back = deserialize_bytes_tensor(raw, [3], "s")
    assert back.tolist() == [b"ab", b"", "\u00e9".encode()]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: deserialize_raw("FP32", [2, 2], b"\0" * 12, "img"), "input 'img': FP32 shape [2, 2] needs 16 bytes"),
        (lambda: deserialize_bytes_tensor(struct.pack("<I", 9) + b"abc", [1], "txt"), "input 'txt': BYTES element"),
        (lambda: deserialize_bytes_tensor(struct.pack("<I", 1) + b"a", [2], "txt"), "needs 2 BYTES elements"),
        (lambda: from_list("INT8", [1], [300], "small"), "input 'small': data does not fit INT8"),
        (lambda: from_list("INT32", [1], [1.5], "ids"), "input 'ids': INT32 data must be integers"),
        (lambda: from_list("FP32", [2], [1.0, "x"], "f"), "input 'f': FP32 data must be numbers"),
        (lambda: from_list("BOOL", [1], [1], "flag"), "input 'flag': BOOL data must be true/false"),
        (lambda: from_list("FP32", [3], [1.0], "f"), "input 'f': shape [3] needs 3 elements, got 1"),
        (lambda: from_list("FP32", [2, 2], [[1.0, 2.0], [3.0]], "f"), "input 'f': data is nested unevenly"),
        (lambda: from_list("FP32", [2, 2], [1.0, [2.0, 3.0, 4.0]], "f"), "input 'f': data is nested unevenly"),
        (lambda: from_list("FP32", [2], [[1.0], 2.0], "f"), "input 'f': data is nested unevenly"),
        (lambda: from_list("FP16", [1], [1e10], "h"), "input 'h': data does not fit FP16"),
        (lambda: from_list("FP32", [300], [1.0] * 299 + [1e39], "big"), "input 'big': data does not fit FP32"),
        (lambda: from_list("FP64", [1], [10**400], "d"), "input 'd': data does not fit FP64"),
        (lambda: check_shape([1] * 65, "x"), "input 'x': shape has 65 dimensions; at most 64"),
        (lambda: check_shape([2**62, 2**62, 0], "x"), "input 'x': shape [4611686018427387904"),
        (lambda: check_shape([2**64, 1], "x"), "is too large for any tensor"),
    ],
)
def test_codec_errors_name_the_tensor(call, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        call()
    assert message in str(info.value)


@pytest.mark.parametrize("count", [4, 300])  # the small-array path and numpy's
def test_float_data_at_the_edge_of_its_range(count: int) -> None:
    largest = float(np.finfo(np.float32).max)
    assert from_list("FP32", [count], [largest] * count, "f")[0] == np.float32(largest)
    with pytest.raises(InvalidInput, match="data does not fit FP32"):
        from_list("FP32", [count], [-1e39] * count, "f")
    assert from_list("FP16", [count], [-65504.0] * count, "h")[0] == np.float16(-65504.0)
    with pytest.raises(InvalidInput, match="data does not fit FP16"):
        from_list("FP16", [count], [70000.0] * count, "h")
    # gRPC's typed contents can carry infinities and NaN: they are data, not an overflow.
    special = from_list("FP32", [count], [float("inf"), float("nan")] * (count // 2), "f")
    assert np.isinf(special[0]) and np.isnan(special[1])
    assert from_list("FP64", [count], [1e300] * count, "d")[0] == 1e300


def _binary_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    encoded = orjson.dumps(header)
    return encoded + b"".join(chunks), len(encoded)


def test_decode_mixed_json_and_binary_inputs() -> None:
    a = np.arange(4, dtype=np.float32)
    body, length = _binary_body(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": "A", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
                {"name": "B", "shape": [2], "datatype": "INT64", "data": [5, 6]},
                {"name": "S", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
            ],
            "outputs": [{"name": "OUT", "parameters": {"binary_data": False}}],
        },
        a.tobytes(),
    )
    request = decode_request(body, length, "m", "", NO_REGIONS)
    assert request.id == "r1"
    np.testing.assert_array_equal(request.inputs["A"], a)
    np.testing.assert_array_equal(request.inputs["B"], np.array([5, 6], dtype=np.int64))
    assert request.inputs["S"].tolist() == [b"hi"]
    assert request.outputs[0].name == "OUT"
    assert request.parameters["binary_data_output"] is True


@pytest.mark.parametrize(
    ("header", "extra", "message"),
    [
        ({"inputs": []}, b"", "non-empty 'inputs'"),
        (
            {"inputs": [{"name": "A", "shape": [1], "datatype": "FP33", "data": [1]}]},
            b"",
            "input 'A': unknown datatype",
        ),
        ({"inputs": [{"name": "A", "shape": [1], "datatype": "FP32"}]}, b"", "input 'A' has neither"),
        ({"inputs": [{"name": "A", "shape": [-1], "datatype": "FP32", "data": []}]}, b"", "negative dimension"),
        (
            {"inputs": [{"name": "A", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
            b"\0" * 4,
            "input 'A': binary_data_size 8 runs past",
        ),
        (
            {"inputs": [{"name": "A", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
            b"\0" * 8,
            "4 bytes of binary data are not claimed",
        ),
    ],
)
def test_decode_errors(header: dict, extra: bytes, message: str) -> None:
    body, length = _binary_body(header, extra)
    with pytest.raises(InvalidInput, match=message):
        decode_request(body, length, "m", "", NO_REGIONS)


def test_nested_data_in_any_rectangular_form_is_row_major() -> None:
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    for data in ([[0, 1, 2], [3, 4, 5]], [[[0, 1], [2, 3], [4, 5]]], [0, 1, 2, 3, 4, 5]):
        np.testing.assert_array_equal(from_list("FP32", [2, 3], data, "x"), expected)


def test_grpc_infinities_are_kept() -> None:
    assert from_list("FP32", [1], [float("inf")], "x").tolist() == [float("inf")]


@pytest.mark.parametrize("value", ["²", " 12", "-1", "", "1e3"])
def test_header_length_must_be_ascii_digits(value: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length must be a non-negative integer"):
        parse_header_length(value)


def test_header_length_parses() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length("120") == 120


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"priority": "1"}, "'priority' must be a non-negative integer"),
        ({"priority": True}, "'priority' must be a non-negative integer"),
        ({"timeout": -5}, "'timeout' must be a non-negative integer"),
        ({"timeout": 2.0}, "'timeout' must be a non-negative integer"),
        ({"binary_data_output": 1}, "'binary_data_output' must be true or false"),
    ],
)
def test_request_parameters_of_the_wrong_type_are_refused(parameters: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_request_parameters(parameters)


def test_parameters_of_the_right_type_and_unknown_ones_pass() -> None:
    check_request_parameters({"priority": 2, "timeout": 0, "binary_data_output": False, "tag": [1, "x"]})
    check_output_parameters({"binary_data": True, "classification": 3}, "out")
    with pytest.raises(InvalidInput, match="output 'out': parameter 'binary_data' must be true or false"):
        check_output_parameters({"binary_data": "true"}, "out")


def test_decode_rejects_broken_json_and_bad_header_length() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        decode_request(b"{nope", None, "m", "", NO_REGIONS)
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length is 99"):
        decode_request(b"{}", 99, "m", "", NO_REGIONS)


def test_encode_binary_and_json_outputs() -> None:
    request = InferRequest(model_name="m", outputs=[RequestedOutput("A", {"binary_data": True}), RequestedOutput("B")])
    a = np.arange(3, dtype=np.float32)
    b = np.array([[1, 2]], dtype=np.int32)
    body, length = encode_response(InferResponse("m", "1", "id7", {"A": a, "B": b}), request)
    assert length is not None
    header = orjson.loads(body[:length])
    assert header["id"] == "id7" and header["model_version"] == "1"
    out_a, out_b = header["outputs"]
    assert out_a["parameters"]["binary_data_size"] == 12
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype=np.float32), a)
    assert out_b == {"name": "B", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}


def test_non_utf8_bytes_output_goes_binary() -> None:
    request = InferRequest(model_name="m")
    blob = np.array([b"\xff\xfe"], dtype=np.object_)
    body, length = encode_response(InferResponse("m", "1", "", {"S": blob}), request)
    assert length is not None
    assert body[length:] == struct.pack("<I", 2) + b"\xff\xfe"
