"""Per model-version inference statistics in Triton's shape (the ``statistics`` protocol extension).

The schedulers record every batch here, on the event loop, so no lock is needed. ``server.extensions.metrics`` reads the
same objects at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server.extensions.generation_metrics import GenerationStats


class FailureReason(str, Enum):
    """Why a request failed: the ``reason`` label of Triton's ``nv_inference_request_failure``."""

    REJECTED = "REJECTED"  # turned away by the scheduler: queue full, or its queue timeout expired
    CANCELED = "CANCELED"  # its client stopped waiting before it ran
    BACKEND = "BACKEND"  # the model's execution failed
    OTHER = "OTHER"  # anything else, such as inputs that do not match the model


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds spent, as Triton's ``StatisticDuration``."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True, frozen=True)
class RequestTiming:
    """What a batch record needs to know about one of its requests."""

    arrival_ns: int
    rows: int


class ModelStats:
    """Statistics of one model version, kept while the version is loaded (reloads of it included)."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = Duration()
        self.fail = Duration()
        # ``fail.count`` split by reason, for the metrics.
        self.failures: dict[FailureReason, int] = dict.fromkeys(FailureReason, 0)
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}
        self.pending = 0
        # Set for a version served by the generation engine: its token-level figures, for the metrics.
        self.generation: GenerationStats | None = None
        self.cache_hit = Duration()
        self.cache_miss = Duration()

    # -- recording ----------------------------------------------------------------------------------------
    def queued(self, count: int = 1) -> None:
        self.pending += count

    def dequeued(self, count: int = 1) -> None:
        self.pending -= count

    def record_batch(
        self, requests: Sequence[RequestTiming], start_ns: int, merged_ns: int, executed_ns: int, finished_ns: int
    ) -> None:
        """One successful execution: Triton charges the whole batch's compute time to each of its requests."""
        n = len(requests)
        rows = sum(r.rows for r in requests)
        input_ns, infer_ns, output_ns = merged_ns - start_ns, executed_ns - merged_ns, finished_ns - executed_ns
        queue_ns = sum(start_ns - r.arrival_ns for r in requests)
        request_ns = sum(finished_ns - r.arrival_ns for r in requests)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        self.execution_count += 1
        self.success.add(request_ns, n)
        self.queue.add(queue_ns, n)
        self.compute_input.add(input_ns * n, n)
        self.compute_infer.add(infer_ns * n, n)
        self.compute_output.add(output_ns * n, n)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_cache_hit(self, ns: int) -> None:
        """A request answered from the response cache: a success that ran nothing, so no inference or execution
        is counted (as in Triton)."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.cache_hit.add(ns)
        self.success.add(ns)

    def record_cache_miss(self, ns: int) -> None:
        """A cacheable request that ran; ``ns`` is the time spent looking it up and storing its response."""
        self.cache_miss.add(ns)

    def record_failure(self, arrivals_ns: Sequence[int], reason: FailureReason, end_ns: int | None = None) -> None:
        """Requests that failed, each with the time from its arrival to its failure."""
        end_ns = time.monotonic_ns() if end_ns is None else end_ns
        total = sum(end_ns - a for a in arrivals_ns)
        self.fail.add(total, len(arrivals_ns))
        self.failures[reason] += len(arrivals_ns)

    # -- reporting ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` JSON; the gRPC front end converts this dict to the protobuf. A version served
        by a generation engine adds ``generation`` (ModelDock's own field: its token counters, the prefix cache's
        hit rate, the queue), which Triton's protobuf has no place for."""
        result: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": self.compute_input.to_json(),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": self.compute_output.to_json(),
                "cache_hit": self.cache_hit.to_json(),
                "cache_miss": self.cache_miss.to_json(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": stats.compute_input.to_json(),
                    "compute_infer": stats.compute_infer.to_json(),
                    "compute_output": stats.compute_output.to_json(),
                }
                for size, stats in sorted(self.batches.items())
            ],
        }
        if self.generation is not None:
            result["generation"] = self.generation.to_json()
        return result


class StatisticsRegistry:
    """The ``ModelStats`` of every loaded model version.

    As in Triton, a version's counters keep accumulating across reloads of it, and start again from zero when it
    is loaded after having been unloaded (or dropped by its version policy).
    """

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}

    def for_version(self, name: str, version: str) -> ModelStats:
        key = (name, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(name, version)
        return stats

    def discard(self, name: str, version: str) -> None:
        """Forget a version that is no longer loaded; its metrics disappear from ``/metrics``."""
        self._stats.pop((name, version), None)

    def all(self) -> list[ModelStats]:
        # One copy of the items first: the --metrics-port thread reads while the event loop loads and unloads.
        return [stats for _, stats in sorted(self._stats.items(), key=lambda item: item[0])]
