"""Wire-independent inference request and response types.

The HTTP and gRPC codecs turn their messages into these and back; everything between the front ends and the
backends (validation, queues, batching, instances) only sees these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from server.protocol.shared_memory import TensorPlacement


@dataclass(slots=True)
class RequestedOutput:
    name: str
    # Protocol parameters such as ``binary_data`` or ``classification``; kept for the encoder.
    parameters: dict[str, Any] = field(default_factory=dict)
    # Set when the client asked for the output in a shared memory region: the encoder writes it there.
    shared_memory: TensorPlacement | None = None


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # The datatype each input arrived with, so a BYTES vs FP32 mix-up is reported against the wire type.
    input_datatypes: dict[str, str] = field(default_factory=dict)
    # Empty means "all outputs".
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    # ``time.monotonic_ns()`` by which the request must be answered (its timeout), or None for no bound.
    deadline_ns: int | None = None
    # The request's OpenTelemetry span when it is traced; the scheduler then records ``marks_ns`` for it:
    # (arrival, batch start, inputs merged, executed, outputs split, batch size).
    trace: Any = None
    # The caller's W3C ``traceparent`` header, read by the front ends only while tracing is on.
    trace_parent: str | None = None
    marks_ns: tuple[int, int, int, int, int, int] | None = None

    @property
    def priority(self) -> int:
        value = self.parameters.get("priority", 0)
        # The front ends refuse a priority that is not a non-negative integer (server/protocol/parameters.py).
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def timeout_us(self) -> int:
        value = self.parameters.get("timeout", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def batch_size(self) -> int:
        """The leading dimension; only meaningful for batching models (validated before use)."""
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    # Set on the last response of a request; a streaming model sends several responses before it.
    final: bool = True
