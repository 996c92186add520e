"""The KServe v2 HTTP/REST body format, with Triton's binary tensor data extension.

A body is a JSON document, optionally followed by raw tensor bytes; ``Inference-Header-Content-Length`` says where
the JSON ends. Each binary input carries ``parameters.binary_data_size``; binary outputs are asked for per output
(``parameters.binary_data``) or for all outputs (request parameter ``binary_data_output``). A tensor whose
parameters name a ``shared_memory_region`` travels in that registered region instead of the body.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from server.errors import InvalidInput
from server.protocol.datatypes import WIRE_DATATYPES, wire_datatype
from server.protocol.limits import LIMITS
from server.protocol.load_parameters import FILE_PREFIX, parse_config_override
from server.protocol.parameters import check_output_parameters, check_request_parameters
from server.protocol.shared_memory import SharedMemoryRegistry
from server.protocol.tensor_codec import (
    check_shape,
    deserialize_raw,
    from_list,
    is_utf8,
    serialize_raw,
    shared_memory_input,
    shared_memory_output,
    to_list,
    write_shared_memory_output,
)
from server.protocol.types import InferRequest, InferResponse, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"


def _load_json(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    """An optional JSON object: absent or null is empty, anything but an object is the client's mistake."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be an object")
    return value


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header; only ASCII digits, as ``int`` would also take "²" or " 1"."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got '{value}'")
    return int(value)


def decode_request(
    body: bytes, header_length: int | None, model_name: str, model_version: str, shared_memory: SharedMemoryRegistry
) -> InferRequest:
    if header_length is None:
        header, binary = _load_json(body), memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body holds only {len(body)} bytes")
        view = memoryview(body)
        header, binary = _load_json(view[:header_length]), view[header_length:]
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request must have a non-empty 'inputs' list")
    LIMITS.check_input_count(len(inputs))

    request = InferRequest(model_name=model_name, model_version=model_version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {request_id!r}")
    request.id = request_id
    parameters = _object(header.get("parameters"), "request 'parameters'")
    check_request_parameters(parameters)
    request.parameters = dict(parameters)

    offset = 0
    for position, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"inputs[{position}] must be an object with a 'name'")
        name = item["name"]
        if name in request.inputs:
            raise InvalidInput(f"input '{name}' appears more than once")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in WIRE_DATATYPES:
            raise InvalidInput(f"input '{name}': unknown datatype {datatype!r}")
        shape = check_shape(item.get("shape"), name)
        item_params = _object(item.get("parameters"), f"input '{name}': 'parameters'")
        size = item_params.get("binary_data_size")
        array = shared_memory_input(shared_memory, item_params, datatype, shape, name)
        if array is not None:
            if size is not None or "data" in item:
                raise InvalidInput(f"input '{name}' is in shared memory and must not also carry data")
        elif size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
            if "data" in item:
                raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size; send one or the other")
            if offset + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the end of the binary data")
            array = deserialize_raw(datatype, shape, binary[offset : offset + size], name)
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"input '{name}' has neither 'data' nor 'binary_data_size'")
            array = from_list(datatype, shape, item["data"], name)
        request.inputs[name] = array
        request.input_datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    outputs = header.get("outputs")
    if outputs is None:
        outputs = []
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    seen: set[str] = set()
    for position, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{position}] must be an object with a 'name'")
        if item["name"] in seen:
            raise InvalidInput(f"output '{item['name']}' is requested more than once")
        seen.add(item["name"])
        out_params = _object(item.get("parameters"), f"output '{item['name']}': 'parameters'")
        check_output_parameters(out_params, item["name"])
        placement = shared_memory_output(shared_memory, out_params, item["name"])
        request.outputs.append(RequestedOutput(item["name"], dict(out_params), placement))
    return request


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    per_output = {o.name: o.parameters.get("binary_data") for o in request.outputs}
    placements = {o.name: o.shared_memory for o in request.outputs if o.shared_memory is not None}

    header_outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": wire_datatype(array), "shape": list(array.shape)}
        header_outputs.append(entry)
        placement = placements.get(name)
        if placement is not None:
            entry["parameters"] = write_shared_memory_output(placement, array, name)
            continue
        wanted = per_output.get(name)
        binary = binary_default if wanted is None else bool(wanted)
        if not binary and entry["datatype"] == "BYTES" and not is_utf8(array):
            binary = True
        if binary:
            raw = serialize_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif entry["datatype"] in ("BYTES", "FP16", "BOOL"):
            entry["data"] = to_list(array)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)

    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = header_outputs
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return encoded, None
    return b"".join([encoded, *chunks]), len(encoded)


def decode_index_request(body: dict[str, Any]) -> bool:
    """A repository index request's ``ready`` flag: list only the models that are ready."""
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"'ready' must be true or false, got {ready!r}")
    return ready


def decode_load_request(body: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """A load request's config override (``parameters.config``) and model files (``file:<path>``, base64)."""
    parameters = _object(body.get("parameters"), "'parameters'")
    override = parse_config_override(parameters["config"]) if "config" in parameters else None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if not key.startswith(FILE_PREFIX):
            continue
        try:
            files[key] = base64.b64decode(value, validate=True)
        except (TypeError, ValueError):
            raise InvalidInput(f"load parameter '{key}' must be the file's content in base64") from None
    return override, files
