"""Bounds on what one request may ask of the server, checked before the work it asks for is done.

The front ends read ``LIMITS`` for body and header sizes; the codecs read it for the number of inputs and each
tensor's element count, checked from the shape before any data is read. The server sets them once at start-up
(``modeldock serve --http-max-body-bytes ...``); the defaults are generous enough for real models and small enough
that one request cannot take the process's memory. JSON nesting is bounded by the parser: orjson refuses documents
nested deeper than ``MAX_JSON_DEPTH`` levels, and that refusal is a 400 like any other malformed body.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from server.errors import InvalidInput

# orjson's own recursion limit, which the HTTP codec relies on; tests pin it.
MAX_JSON_DEPTH = 1024


@dataclass
class RequestLimits:
    # The largest HTTP request body, compressed as sent (413 beyond it); gRPC has --grpc-max-message-bytes.
    http_max_body_bytes: int = 256 * 1024 * 1024
    # The most bytes of header names and values in one HTTP request or gRPC call (431 / RESOURCE_EXHAUSTED).
    max_header_bytes: int = 64 * 1024
    # The most input tensors in one inference request.
    max_inputs: int = 1024
    # The most elements in one input tensor, whatever its datatype.
    max_tensor_elements: int = 1 << 31

    def check_input_count(self, count: int) -> None:
        if count > self.max_inputs:
            raise InvalidInput(f"request has {count} inputs; at most {self.max_inputs} are accepted (--max-inputs)")

    def check_elements(self, name: str, shape: list[int], count: int) -> None:
        if count > self.max_tensor_elements:
            raise InvalidInput(
                f"input '{name}': shape {shape} holds {count} elements; at most {self.max_tensor_elements} are "
                "accepted (--max-tensor-elements)"
            )


LIMITS = RequestLimits()


def configure(limits: RequestLimits) -> None:
    """Replace the process's limits (at start-up, before any request)."""
    for item in fields(RequestLimits):
        setattr(LIMITS, item.name, getattr(limits, item.name))
