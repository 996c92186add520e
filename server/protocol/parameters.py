"""The request and output parameters the server acts on, type-checked once for both front ends.

A parameter of the wrong type is the client's mistake and is refused by name; read leniently, ``"false"`` would
turn binary output on and ``"high"`` would quietly become the default priority. Parameters the server does not
act on pass through unchecked, as in Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.errors import InvalidInput

# Triton's names: queue priority level and queue timeout in microseconds, both unsigned.
_NON_NEGATIVE_INTEGERS = ("priority", "timeout")
# The HTTP binary tensor extension (all outputs binary), and Triton's sequence flags.
_REQUEST_FLAGS = ("binary_data_output", "sequence_start", "sequence_end")
# The HTTP binary tensor extension: one output binary.
_OUTPUT_FLAGS = ("binary_data",)


def check_request_parameters(parameters: Mapping[str, Any]) -> None:
    if not parameters:
        return
    for key in _NON_NEGATIVE_INTEGERS:
        if key in parameters:
            value = parameters[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"request parameter '{key}' must be a non-negative integer, got {value!r}")
    _check_flags(parameters, _REQUEST_FLAGS, "request parameter")
    if "sequence_id" in parameters:
        check_sequence_id(parameters["sequence_id"])


def check_sequence_id(value: Any) -> None:
    """Triton's correlation id: an unsigned 64-bit integer or a string (0 and "" mean "no sequence")."""
    if isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise InvalidInput(
            f"request parameter 'sequence_id' must be an unsigned 64-bit integer or a string, got {value!r}"
        )


def check_output_parameters(parameters: Mapping[str, Any], name: str) -> None:
    if parameters:
        _check_flags(parameters, _OUTPUT_FLAGS, "output '{name}': parameter", name)


def _check_flags(parameters: Mapping[str, Any], keys: tuple[str, ...], owner: str, name: str = "") -> None:
    """``owner`` names the parameters' owner in the error; its ``{name}`` is filled in only then."""
    for key in keys:
        if key in parameters and not isinstance(parameters[key], bool):
            raise InvalidInput(f"{owner.format(name=name)} '{key}' must be true or false, got {parameters[key]!r}")
