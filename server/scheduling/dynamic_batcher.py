"""Dynamic batching with Triton's semantics, in front of a model with ``max_batch_size > 0``.

One dispatcher task per model version waits until an instance is idle and only then forms a batch. Batches are
therefore never built ahead while every instance is busy: requests keep accumulating, so batches grow with the
load instead of being frozen small. Requests wait in one queue per priority level (level 1 served first); a
batch takes them in priority order, but only those whose inputs have the same non-batch shapes as the oldest
one (inputs with ``allow_ragged_batch`` may differ), and never more rows than ``max_batch_size``. As in Triton, a
request whose timeout expires with ``timeout_action: DELAY`` waits behind the rest of its own level (still ahead of
lower levels) and keeps its place in that level's ``max_queue_size``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.config import ModelConfig, QueuePolicy, TimeoutAction
from server.errors import BackendError, QueueFull, RequestTimeout
from server.extensions.statistics import FailureReason, ModelStats
from server.protocol.types import InferRequest
from server.scheduling.instances import InstancePool, ModelInstance
from server.scheduling.scheduler import PendingRequest, Scheduler

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]


@dataclass(slots=True, eq=False)
class QueuedRequest:
    pending: PendingRequest
    level: int
    signature: Signature
    rows: int
    # Monotonic deadline in ns, or None to wait as long as it takes.
    deadline_ns: int | None
    timeout_us: int


class DynamicBatcher(Scheduler):
    def __init__(self, config: ModelConfig, version: str, pool: InstancePool, stats: ModelStats | None = None) -> None:
        super().__init__(config, version, pool, stats)
        if config.dynamic_batching is None or not config.batching:
            raise ValueError("DynamicBatcher needs max_batch_size > 0 and a dynamic_batching section")
        settings = config.dynamic_batching
        self._levels = settings.priority_levels or 1
        self._default_level = settings.default_priority_level or 1
        self._policies: list[QueuePolicy] = [
            settings.priority_queue_policy.get(level, settings.default_queue_policy)
            for level in range(1, self._levels + 1)
        ]
        # Two queues per level, in the order batches take from them: level 1, level 1's timed-out DELAY
        # requests, level 2, level 2's delayed requests, ...
        self._queues: list[deque[QueuedRequest]] = [deque() for _ in range(2 * self._levels)]
        self._queued = 0
        # Rows waiting in all queues: the collector is woken by an arrival only once they could fill a batch.
        self._queued_rows = 0
        self._with_deadline = 0
        preferred = sorted(size for size in settings.preferred_batch_size if size <= config.max_batch_size)
        self._target_rows = preferred[-1] if preferred else config.max_batch_size
        self._delay_ns = settings.max_queue_delay_microseconds * 1000
        self._ragged = {t.name for t in config.input if t.allow_ragged_batch}
        self._arrived = asyncio.Event()
        self._dispatcher_started = False
        # With preserve_ordering, the delivery of the batch started last: the next batch's responses wait for it.
        self._preserve_ordering = settings.preserve_ordering
        self._last_delivery: asyncio.Future[None] | None = None

    # -- accepting requests -------------------------------------------------------------------------------
    def enqueue(self, pending: PendingRequest) -> None:
        request = pending.request
        level = request.priority if 1 <= request.priority <= self._levels else self._default_level
        policy = self._policies[level - 1]
        queue, delayed = self._level_queues(level)
        if policy.max_queue_size and len(queue) + len(delayed) >= policy.max_queue_size:
            raise QueueFull(
                f"model '{self.config.name}' version {self.version}: queue is full ({policy.max_queue_size} "
                f"requests waiting at priority level {level}); retry later"
            )
        timeout_us = policy.default_timeout_microseconds
        if policy.allow_timeout_override and request.timeout_us > 0:
            # Triton lets a request shorten the configured timeout, never lengthen it.
            timeout_us = min(timeout_us, request.timeout_us) if timeout_us else request.timeout_us
        deadline = pending.arrival_ns + timeout_us * 1000 if timeout_us else None
        rows = pending.rows
        queue.append(QueuedRequest(pending, level, self._signature(request), rows, deadline, timeout_us))
        self._queued += 1
        self._queued_rows += rows
        if deadline is not None:
            self._with_deadline += 1
        if not self._dispatcher_started:
            self._dispatcher_started = True
            self._spawn(self._dispatch())
        # Waking the dispatcher for every arrival costs a wake-up and a queue scan per request. It needs waking only
        # when it waits for a first request, when a batch may now be full, or when a deadline may come sooner.
        if self._queued == 1 or self._queued_rows >= self._target_rows or deadline is not None:
            self._arrived.set()

    def _level_queues(self, level: int) -> tuple[deque[QueuedRequest], deque[QueuedRequest]]:
        """A priority level's queue and its queue of timed-out DELAY requests."""
        return self._queues[2 * level - 2], self._queues[2 * level - 1]

    def _signature(self, request: InferRequest) -> Signature:
        inputs = request.inputs
        items = inputs.items() if len(inputs) == 1 else sorted(inputs.items())
        ragged = self._ragged
        return tuple((name, array.dtype, () if name in ragged else array.shape[1:]) for name, array in items)

    def _withdraw(self, pending: PendingRequest) -> bool:
        for queue in self._queues:
            for entry in queue:
                if entry.pending is pending:
                    queue.remove(entry)
                    self._queued -= 1
                    self._queued_rows -= entry.rows
                    if entry.deadline_ns is not None:
                        self._with_deadline -= 1
                    self._arrived.set()  # the head may have changed: the dispatcher looks again
                    return True
        return False

    async def close(self) -> None:
        self._closed = True
        self._arrived.set()
        await super().close()

    # -- the dispatcher -----------------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        """Form and start batches until the scheduler closes and its queue is empty."""
        try:
            await self._dispatch_until_closed()
        except Exception:  # a bug here must fail the waiting requests, not leave them hanging
            log.exception("dynamic batcher of model '%s' failed", self.config.name)
            error = BackendError(f"model '{self.config.name}': the dynamic batcher failed; see the server log")
            for queue in self._queues:
                for entry in queue:
                    self.stats.dequeued()
                    self.stats.record_failure([entry.pending.arrival_ns], FailureReason.OTHER)
                    entry.pending.fail(error)
                queue.clear()
            self._queued = self._queued_rows = self._with_deadline = 0
            self._dispatcher_started = False

    async def _dispatch_until_closed(self) -> None:
        while True:
            if not self._queued:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            instance = await self._acquire_instance()
            if instance is None:
                continue
            try:
                batch = await self._collect()
            except BaseException:
                self.pool.release(instance)
                raise
            if not batch:
                self.pool.release(instance)
                continue
            self._spawn(self._run_on(instance, batch, self._next_delivery()))

    async def _acquire_instance(self) -> ModelInstance | None:
        """An idle instance, or None if the queue emptied (timeouts) while waiting for one."""
        idle = self.pool.try_acquire()
        if idle is not None:
            return idle
        # The batch started last may run on the event loop (a cheap model's, see ``InlineEstimate``) as soon as this
        # task yields, and free its instance: one turn of the loop is cheaper than a getter task and ``wait``.
        await asyncio.sleep(0)
        idle = self.pool.try_acquire()
        if idle is not None:
            return idle
        getter = asyncio.ensure_future(self.pool.acquire())
        while True:
            deadline = self._next_deadline_ns()
            timeout = None if deadline is None else max(0, deadline - time.monotonic_ns()) / 1e9
            await asyncio.wait({getter}, timeout=timeout)
            self._expire()
            if getter.done():
                return getter.result()
            if not self._queued:
                getter.cancel()
                await asyncio.wait({getter})
                if not getter.cancelled():
                    self.pool.release(getter.result())
                return None

    async def _collect(self) -> list[QueuedRequest]:
        """Wait (at most ``max_queue_delay`` from the oldest request's arrival) for a preferred batch size.

        As in Triton, a batch never grows past the largest preferred size (``max_batch_size`` when none is set),
        even when more requests have waited out the delay: the preferred sizes are the ones the model runs best at.
        """
        while True:
            self._expire()
            head = self._head()
            if head is None:
                return []
            now = time.monotonic_ns()
            ready_at = head.pending.arrival_ns + self._delay_ns
            if now >= ready_at or self._closed or self._compatible_rows(head) >= self._target_rows:
                return self._take(head)
            wake = ready_at
            deadline = self._next_deadline_ns()
            if deadline is not None:
                wake = min(wake, deadline)
            self._arrived.clear()
            # A timer that sets the event, rather than ``wait_for``'s task and TimeoutError on every batch; a
            # spurious wake-up only makes this loop look again.
            timer = asyncio.get_running_loop().call_later(max(0, wake - now) / 1e9, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                timer.cancel()

    def _next_delivery(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None] | None]:
        """The (previous, own) delivery futures of a batch about to start; (None, None) without preserve_ordering.

        Instances finish in any order; Triton's ``preserve_ordering`` promises responses in the order the requests
        were scheduled, so each batch hands its responses out only after the batch before it has.
        """
        if not self._preserve_ordering:
            return None, None
        previous = self._last_delivery
        own: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_delivery = own
        return previous, own

    async def _run_on(
        self,
        instance: ModelInstance,
        batch: list[QueuedRequest],
        delivery: tuple[asyncio.Future[None] | None, asyncio.Future[None] | None],
    ) -> None:
        previous, own = delivery
        pending = [entry.pending for entry in batch]
        try:
            try:
                outcome = await self._execute_on(instance, pending)
            finally:
                self.pool.release(instance)
            if previous is not None:
                await asyncio.shield(previous)
            self._deliver(pending, outcome)
        finally:
            if own is not None:
                own.set_result(None)

    # -- queue bookkeeping --------------------------------------------------------------------------------
    def _head(self) -> QueuedRequest | None:
        for queue in self._queues:
            if queue:
                return queue[0]
        return None

    def _compatible_rows(self, head: QueuedRequest) -> int:
        rows = 0
        for queue in self._queues:
            for entry in queue:
                if entry.signature == head.signature:
                    rows += entry.rows
                    if rows >= self._target_rows:
                        return rows
        return rows

    def _take(self, head: QueuedRequest) -> list[QueuedRequest]:
        """Remove a batch from the queues: the head, then compatible requests in priority order that fit."""
        limit = max(self._target_rows, head.rows)
        batch: list[QueuedRequest] = []
        rows = 0
        for queue in self._queues:
            skipped: list[QueuedRequest] = []
            while queue and rows < limit:
                entry = queue.popleft()
                if entry.signature == head.signature and rows + entry.rows <= limit:
                    batch.append(entry)
                    rows += entry.rows
                else:
                    skipped.append(entry)
            queue.extendleft(reversed(skipped))
            if rows >= limit:
                break
        self._queued -= len(batch)
        self._queued_rows -= rows
        self._with_deadline -= sum(1 for entry in batch if entry.deadline_ns is not None)
        return batch

    def _next_deadline_ns(self) -> int | None:
        if not self._with_deadline:
            return None
        return min(
            (e.deadline_ns for q in self._queues[::2] for e in q if e.deadline_ns is not None),
            default=None,
        )

    def _expire(self) -> None:
        """Reject (REJECT) or move behind the rest of their level (DELAY) the requests past their queue timeout."""
        if not self._with_deadline:
            return
        now = time.monotonic_ns()
        for level in range(1, self._levels + 1):
            queue, delayed = self._level_queues(level)
            if not any(e.deadline_ns is not None and e.deadline_ns <= now for e in queue):
                continue
            keep: list[QueuedRequest] = []
            for entry in queue:
                if entry.deadline_ns is None or entry.deadline_ns > now:
                    keep.append(entry)
                    continue
                self._with_deadline -= 1
                entry.deadline_ns = None
                if self._policies[entry.level - 1].timeout_action == TimeoutAction.DELAY:
                    delayed.append(entry)
                    continue
                self._queued -= 1
                self._queued_rows -= entry.rows
                self.stats.dequeued()
                self.stats.record_failure([entry.pending.arrival_ns], FailureReason.REJECTED, now)
                entry.pending.fail(
                    RequestTimeout(
                        f"request to model '{self.config.name}' timed out after waiting {entry.timeout_us} us in "
                        "the queue"
                    )
                )
            queue.clear()
            queue.extend(keep)
