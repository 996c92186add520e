"""How queued requests reach instances: the request/response hand-off and the default (unbatched) scheduler.

A ``PendingRequest`` carries a stream of responses rather than a single future, so a model that answers one
request with many responses (token streaming, decoupled models) uses the same path as one that answers once.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from server.config import BatchInputKind, ModelConfig, TensorConfig
from server.errors import BackendError, ModelDockError, ModelNotReady
from server.extensions.statistics import FailureReason, ModelStats, RequestTiming
from server.protocol.datatypes import CONFIG_TO_WIRE, numpy_dtype
from server.protocol.types import InferRequest, InferResponse
from server.scheduling.deadlines import execute_timeout_s
from server.scheduling.instances import InstancePool, ModelInstance

_END = object()


class PendingRequest:
    """A validated request waiting for, or being served by, an instance.

    Its responses wait in a plain deque with at most one future for the one consumer: an ``asyncio.Queue`` per
    request costs several objects and loop look-ups that nothing here needs.
    """

    __slots__ = ("request", "arrival_ns", "rows", "_items", "_waiter", "_done")

    def __init__(self, request: InferRequest) -> None:
        self.request = request
        self.arrival_ns = time.monotonic_ns()
        # The request's batch size (its leading dimension), read by the batcher, the split and the statistics:
        # looked up once. Meaningful only for batching models.
        self.rows = request.batch_size
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def _put(self, item: object) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def send(self, response: InferResponse) -> None:
        if self._done:
            return
        self._put(response)
        if response.final:
            self._done = True
            self._put(_END)

    def cancel(self) -> None:
        """The client stopped waiting: whatever the request still produces is dropped."""
        self._done = True

    def fail(self, error: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self._put(error)
        self._put(_END)

    async def responses(self) -> AsyncIterator[InferResponse]:
        while True:
            item = await self._get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, InferResponse)
            yield item

    async def last_response(self) -> InferResponse | None:
        """The final response (None if there was none): what a unary call answers, without an async generator."""
        last: InferResponse | None = None
        while True:
            item = await self._get()
            if item is _END:
                return last
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, InferResponse)
            last = item


@dataclass(slots=True)
class BatchOutcome:
    """A batch's responses, or the error that fails all of it, with its (start, merged, executed, split) times."""

    responses: list[InferResponse]
    error: ModelDockError | None
    marks_ns: tuple[int, int, int, int] = (0, 0, 0, 0)


class Scheduler(ABC):
    """Owns a model version's queue and decides which requests run together on which instance."""

    def __init__(self, config: ModelConfig, version: str, pool: InstancePool, stats: ModelStats | None = None) -> None:
        self.config = config
        self.version = version
        self.pool = pool
        self.stats = stats if stats is not None else ModelStats(config.name, version)
        self._closed = False
        self._in_flight: set[asyncio.Task[None]] = set()

    @abstractmethod
    def enqueue(self, pending: PendingRequest) -> None:
        """Accept a request or raise (``QueueFull``) at once; never block the caller."""

    @abstractmethod
    def _withdraw(self, pending: PendingRequest) -> bool:
        """Take back a request that has not started executing; False if it already has (or has finished)."""

    def submit(self, request: InferRequest) -> PendingRequest:
        if self._closed:
            raise ModelNotReady(f"model '{self.config.name}' version {self.version} is unloading")
        pending = PendingRequest(request)
        try:
            self.enqueue(pending)
        except ModelDockError:
            self.stats.record_failure([pending.arrival_ns], FailureReason.REJECTED)
            raise
        self.stats.queued()
        return pending

    def cancel(self, pending: PendingRequest) -> None:
        """The client stopped waiting: its gRPC call was cancelled, or its stream or connection closed.

        As in Triton, a request that has not started is dropped at once (its place in the queue is free again)
        and counted as failed; one already executing finishes with its batch and only its responses are lost.
        """
        if pending.done:
            return
        pending.cancel()
        if self._withdraw(pending):
            self.stats.dequeued()
            self.stats.record_failure([pending.arrival_ns], FailureReason.CANCELED)

    async def close(self) -> None:
        """Stop taking requests and wait for those already accepted to finish."""
        self._closed = True
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        await self.pool.drain()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _execute_on(self, instance: ModelInstance, batch: list[PendingRequest]) -> BatchOutcome:
        """Run one batch; delivery is separate so a scheduler can free the instance before responses go out."""
        start = time.monotonic_ns()
        self.stats.dequeued(len(batch))
        try:
            inputs = merge_inputs(self.config, [p.request for p in batch])
            output_names = requested_output_names(self.config, [p.request for p in batch])
            merged = time.monotonic_ns()
            outputs = await instance.execute(inputs, output_names, execute_timeout_s(batch))
            executed = time.monotonic_ns()
            responses = split_outputs(self.config, self.version, batch, outputs)
            return BatchOutcome(responses, None, (start, merged, executed, time.monotonic_ns()))
        except ModelDockError as exc:
            return BatchOutcome([], exc)
        except Exception as exc:  # a backend bug fails this batch, not the server
            return BatchOutcome([], BackendError(f"model '{self.config.name}': {type(exc).__name__}: {exc}"))

    def _deliver(self, batch: list[PendingRequest], outcome: BatchOutcome) -> None:
        if outcome.error is not None:
            self._fail_batch(batch, outcome.error)
            return
        for pending, response in zip(batch, outcome.responses, strict=True):
            if pending.request.trace is not None:
                pending.request.marks_ns = (pending.arrival_ns, *outcome.marks_ns, len(batch))
            pending.send(response)
        timings = [RequestTiming(p.arrival_ns, p.rows if self.config.batching else 1) for p in batch]
        self.stats.record_batch(timings, *outcome.marks_ns)

    def _fail_batch(self, batch: list[PendingRequest], error: ModelDockError) -> None:
        for pending in batch:
            pending.fail(error)
        self.stats.record_failure([p.arrival_ns for p in batch], FailureReason.BACKEND)


class DirectScheduler(Scheduler):
    """Triton's default scheduler: every request runs on its own, on the next idle instance."""

    def __init__(self, config: ModelConfig, version: str, pool: InstancePool, stats: ModelStats | None = None) -> None:
        super().__init__(config, version, pool, stats)
        # Accepted requests still waiting for an instance; a cancelled one leaves this set and is skipped.
        self._waiting: set[PendingRequest] = set()

    def enqueue(self, pending: PendingRequest) -> None:
        self._waiting.add(pending)
        self._spawn(self._run(pending))

    def _withdraw(self, pending: PendingRequest) -> bool:
        if pending not in self._waiting:
            return False
        self._waiting.remove(pending)
        return True

    async def _run(self, pending: PendingRequest) -> None:
        """Run one request on the next idle instance, unless its client left while it waited for one."""
        instance = await self.pool.acquire()
        if not self._withdraw(pending):
            self.pool.release(instance)
            return
        try:
            outcome = await self._execute_on(instance, [pending])
        finally:
            self.pool.release(instance)
        self._deliver([pending], outcome)


def requested_output_names(config: ModelConfig, requests: list[InferRequest]) -> list[str]:
    if any(not r.outputs for r in requests):
        return [t.name for t in config.output]
    wanted = {o.name for r in requests for o in r.outputs}
    return [t.name for t in config.output if t.name in wanted]


def merge_inputs(config: ModelConfig, requests: list[InferRequest]) -> dict[str, np.ndarray]:
    """Concatenate along the batch dimension (one request: passed through untouched).

    As in Triton, an input with ``allow_ragged_batch`` reaches the backend as one 1-D concatenation of every
    request's elements, and ``batch_input`` tensors tell the model where each request's part ends.
    """
    ragged = {t.name for t in config.input if t.allow_ragged_batch}
    if len(requests) == 1 and not ragged and not config.batch_input:
        return _reshaped(config, dict(requests[0].inputs))
    merged: dict[str, np.ndarray] = {}
    for name in requests[0].inputs:
        arrays = [r.inputs[name] for r in requests]
        if name in ragged:
            merged[name] = np.concatenate([a.reshape(-1) for a in arrays])
        else:
            merged[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    for item in config.batch_input:
        counts = np.array([r.inputs[item.source_input[0]].size for r in requests], dtype=np.int64)
        if item.kind == BatchInputKind.BATCH_ACCUMULATED_ELEMENT_COUNT:
            counts = np.cumsum(counts)
        elif item.kind == BatchInputKind.BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO:
            counts = np.concatenate([[0], np.cumsum(counts)])
        merged[item.target_name[0]] = counts.astype(numpy_dtype(CONFIG_TO_WIRE[item.data_type]))
    return _reshaped(config, merged)


def _reshaped(config: ModelConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply ``reshape`` from the config, which changes what the model sees, not what the client sends."""
    for tensor in config.input:
        if tensor.reshape is not None and tensor.name in inputs:
            array = inputs[tensor.name]
            lead = list(array.shape[:1]) if config.batching else []
            inputs[tensor.name] = array.reshape(lead + list(tensor.reshape.shape))
    return inputs


def check_output(config: ModelConfig, tensor: TensorConfig, array: np.ndarray, batch_size: int) -> None:
    """Fail a batch whose output is not what the config declares, rather than send clients a tensor whose
    datatype or shape contradicts the model's metadata."""
    expected = tensor.wire_datatype
    if expected == "BYTES":
        matches = array.dtype.kind in ("O", "S", "U")
    else:
        matches = array.dtype == numpy_dtype(expected)
    if not matches:
        raise BackendError(
            f"model '{config.name}': output '{tensor.name}' has dtype {array.dtype}, but the config declares "
            f"{tensor.data_type}"
        )
    if config.batching:
        if array.ndim == 0 or array.shape[0] != batch_size:
            raise BackendError(
                f"model '{config.name}': output '{tensor.name}' has leading dimension "
                f"{array.shape[0] if array.ndim else 'none'} for a batch of {batch_size}"
            )
        inner = array.shape[1:]
    else:
        inner = array.shape
    dims = tensor.reshape.shape if tensor.reshape is not None else tensor.dims
    if len(dims) != len(inner) or any(d not in (-1, a) for d, a in zip(dims, inner, strict=True)):
        shape = ([-1] if config.batching else []) + list(dims)
        raise BackendError(
            f"model '{config.name}': output '{tensor.name}' has shape {list(array.shape)}, but the config declares "
            f"{shape}"
        )


def split_outputs(
    config: ModelConfig, version: str, batch: list[PendingRequest], outputs: dict[str, np.ndarray]
) -> list[InferResponse]:
    sizes = [p.rows for p in batch] if config.batching else [1]
    total = sum(sizes)
    # Checked once per batch, not once per request.
    checked: dict[str, tuple[np.ndarray, TensorConfig]] = {}
    responses: list[InferResponse] = []
    all_outputs = [t.name for t in config.output]
    start = 0
    for position, pending in enumerate(batch):
        request = pending.request
        wanted = [o.name for o in request.outputs] if request.outputs else all_outputs
        response = InferResponse(model_name=config.name, model_version=version, id=request.id)
        for name in wanted:
            entry = checked.get(name)
            if entry is None:
                if name not in outputs:
                    raise BackendError(f"model '{config.name}' did not produce output '{name}'")
                produced = outputs[name]
                produced = produced if isinstance(produced, np.ndarray) else np.asarray(produced)
                found = config.output_by_name(name)
                if found is None:  # requests are validated against the config, so only a bug gets here
                    raise BackendError(f"model '{config.name}' has no output '{name}' in its config")
                check_output(config, found, produced, total)
                entry = checked[name] = (produced, found)
            array, tensor = entry
            if config.batching:
                array = array[start : start + sizes[position]] if len(batch) > 1 else array
                if tensor.reshape is not None:
                    array = array.reshape([sizes[position], *tensor.dims])
            elif tensor.reshape is not None:
                array = array.reshape(tensor.dims)
            response.outputs[name] = array
        responses.append(response)
        start += sizes[position]
    return responses
