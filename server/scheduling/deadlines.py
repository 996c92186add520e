"""Request deadlines: how long an inference request may take, and how long a batch of them may run.

A request's deadline comes from the server-wide ``--request-timeout-secs`` and Triton's per-request ``timeout``
parameter; the core enforces it end to end, and the scheduler bounds each batch's execution by it, so an instance
that hangs is abandoned and replaced only once every request it holds is past its own deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from server.config import ModelConfig
from server.protocol.types import InferRequest

if TYPE_CHECKING:
    from server.scheduling.scheduler import PendingRequest


def request_deadline(request: InferRequest, server_timeout_s: float, config: ModelConfig) -> float | None:
    """Seconds ``request`` may take, and its ``deadline_ns`` set to match; None when nothing bounds it.

    Triton's ``timeout`` parameter (microseconds) can shorten the server-wide bound, never lengthen it. For a model
    with a dynamic batcher it keeps Triton's meaning instead: a queue timeout, governed by the queue policy's
    ``allow_timeout_override`` and ``timeout_action``.
    """
    timeout_s = server_timeout_s or None
    if request.timeout_us > 0 and not (config.batching and config.dynamic_batching is not None):
        own = request.timeout_us / 1e6
        timeout_s = own if timeout_s is None else min(timeout_s, own)
    if timeout_s is not None:
        request.deadline_ns = time.monotonic_ns() + int(timeout_s * 1e9)
    return timeout_s


def timed_out_message(request: InferRequest, timeout_s: float) -> str:
    return (
        f"request to model '{request.model_name}' did not finish within its timeout of {timeout_s:.6g}s "
        "(the request's 'timeout' parameter or --request-timeout-secs)"
    )


def execute_timeout_s(batch: list[PendingRequest]) -> float | None:
    """How long a batch may run: until the last of its requests' deadlines, so an instance abandoned for hanging
    only ever fails requests that were past their own timeout; None when any request has no deadline."""
    latest = 0
    for pending in batch:
        deadline = pending.request.deadline_ns
        if deadline is None:
            return None
        latest = max(latest, deadline)
    return max(latest - time.monotonic_ns(), 0) / 1e9
