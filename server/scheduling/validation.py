"""Checks a decoded request against the model's config before it is queued.

Catching bad names, datatypes and shapes here, per request, is what keeps one client's mistake from failing a
whole batch of other clients' requests inside the backend.
"""

from __future__ import annotations

import math

from server.config import ModelConfig, TensorConfig
from server.errors import InvalidInput
from server.extensions.classification import class_count
from server.protocol.datatypes import element_size
from server.protocol.shared_memory import BYTE_SIZE
from server.protocol.types import InferRequest


def _dims_match(expected: list[int], actual: tuple[int, ...]) -> bool:
    return len(expected) == len(actual) and all(e == -1 or e == a for e, a in zip(expected, actual, strict=True))


def expected_shape(config: ModelConfig, tensor: TensorConfig) -> list[int]:
    """The full shape a client sends, batch dimension included (as -1) for batching models."""
    return ([-1] if config.batching else []) + list(tensor.dims)


def validate_request(config: ModelConfig, request: InferRequest) -> None:
    known = {t.name for t in config.input}
    if not known.issuperset(request.inputs):
        _refuse_unexpected_inputs(config, request, known)
    batch_size: int | None = None
    for tensor in config.input:
        array = request.inputs.get(tensor.name)
        if array is None:
            if tensor.optional:
                continue
            raise InvalidInput(f"missing input '{tensor.name}' for model '{config.name}'")
        sent_type = request.input_datatypes.get(tensor.name)
        if sent_type is not None and sent_type != tensor.wire_datatype:
            raise InvalidInput(
                f"input '{tensor.name}': datatype {sent_type} does not match the model's {tensor.wire_datatype}"
            )
        shape = tuple(array.shape)
        if config.batching:
            if not shape:
                raise InvalidInput(f"input '{tensor.name}': a batching model needs a leading batch dimension")
            if not 1 <= shape[0] <= config.max_batch_size:
                raise InvalidInput(
                    f"input '{tensor.name}': batch size {shape[0]} is outside 1..{config.max_batch_size} "
                    f"(max_batch_size of model '{config.name}')"
                )
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidInput(
                    f"input '{tensor.name}': batch size {shape[0]} differs from other inputs' {batch_size}"
                )
            inner = shape[1:]
        else:
            inner = shape
        if not _dims_match(tensor.dims, inner):
            raise InvalidInput(
                f"input '{tensor.name}': shape {list(shape)} does not match the model's "
                f"{expected_shape(config, tensor)}"
            )
    outputs = {t.name for t in config.output}
    for requested in request.outputs:
        if requested.name not in outputs:
            raise InvalidInput(
                f"unknown output '{requested.name}' requested from model '{config.name}'; it has {sorted(outputs)}"
            )
        if requested.shared_memory is not None and not class_count(config, requested.name, requested.parameters):
            _check_region_fits(config, requested.name, requested.shared_memory.byte_size, batch_size or 1)


def _refuse_unexpected_inputs(config: ModelConfig, request: InferRequest, known: set[str]) -> None:
    unexpected = sorted(set(request.inputs) - known)
    sequence = config.sequence_batching
    server_filled = sorted(set(unexpected) & set(sequence.server_inputs)) if sequence is not None else []
    if server_filled:
        raise InvalidInput(
            f"input '{server_filled[0]}' of model '{config.name}' is a sequence control or state input that the "
            "server fills in; clients do not send it"
        )
    raise InvalidInput(f"unexpected input '{unexpected[0]}' for model '{config.name}'; it expects {sorted(known)}")


def _check_region_fits(config: ModelConfig, name: str, byte_size: int, batch_size: int) -> None:
    """Refuse a shared memory region too small for an output whose size the config fixes before the model runs,
    rather than run the batch and fail only when writing the result. Variable-size outputs are checked then."""
    tensor = config.output_by_name(name)
    if tensor is None or tensor.wire_datatype == "BYTES" or any(d < 0 for d in tensor.dims):
        return
    shape = ([batch_size] if config.batching else []) + list(tensor.dims)
    needed = math.prod(shape) * element_size(tensor.wire_datatype)
    if byte_size < needed:
        raise InvalidInput(
            f"output '{name}': {BYTE_SIZE} is {byte_size} but {tensor.wire_datatype} shape {shape} needs {needed} bytes"
        )
