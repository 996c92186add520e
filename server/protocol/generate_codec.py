"""Triton's generate extension: a flat JSON object in, a flat JSON object (or one SSE event per response) out.

Keys of the request that name a model input become that input (one element, of the input's datatype); every other
key but ``id`` becomes a request parameter, and a ``parameters`` object is merged into those, so both Triton's
vLLM-style body (``{"text_input": ..., "parameters": {"temperature": 0}}``) and the TensorRT-LLM style with sampling
fields at the top level (``{"text_input": ..., "max_tokens": 16}``) work. The request then runs as any inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from server.errors import InvalidInput
from server.protocol.datatypes import numpy_dtype
from server.protocol.types import InferRequest, InferResponse


def _element(name: str, value: Any, datatype: str) -> np.ndarray:
    if isinstance(value, (list, dict)) and datatype != "BYTES":
        raise InvalidInput(
            f"input '{name}': the generate extension takes one value per input, got {type(value).__name__}"
        )
    if datatype == "BYTES":
        if isinstance(value, str):
            value = value.encode()
        elif not isinstance(value, bytes):
            value = orjson.dumps(value)
        return np.array([value], dtype=object)
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise InvalidInput(f"input '{name}': expected true or false, got {value!r}")
        return np.array([value], dtype=bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"input '{name}': expected a number for datatype {datatype}, got {value!r}")
    try:
        return np.array([value], dtype=numpy_dtype(datatype, name))
    except OverflowError:
        raise InvalidInput(f"input '{name}': {value} is out of range for datatype {datatype}") from None


def decode_generate_request(
    body: Mapping[str, Any], model: str, version: str, inputs: Mapping[str, str], stream: bool
) -> InferRequest:
    """An ``InferRequest`` from a generate body; ``inputs`` maps the model's input names to their datatypes."""
    parameters: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for key, value in body.items():
        if key == "id":
            continue
        if key == "parameters":
            if not isinstance(value, dict):
                raise InvalidInput("field 'parameters' must be a JSON object")
            parameters.update(value)
        elif key in inputs:
            tensors[key] = _element(key, value, inputs[key])
            datatypes[key] = inputs[key]
        else:
            parameters[key] = value
    if "stream" in inputs:
        tensors["stream"] = np.array([stream], dtype=bool)
        datatypes["stream"] = "BOOL"
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("field 'id' must be a string")
    return InferRequest(
        model_name=model,
        model_version=version,
        id=request_id,
        inputs=tensors,
        input_datatypes=datatypes,
        parameters=parameters,
    )


def encode_generate_response(response: InferResponse) -> dict[str, Any]:
    """The flat response: model name and version, the id, and each output as a value (a list when it has several)."""
    data: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        data["id"] = response.id
    for name, array in response.outputs.items():
        values = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        data[name] = values[0] if len(values) == 1 else values
    return data
