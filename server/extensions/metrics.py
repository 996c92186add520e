"""Prometheus metrics with Triton's names, so dashboards and alerts written for Triton work unchanged.

The metrics are read from the same ``ModelStats`` objects that answer the statistics extension at scrape time,
so ``/metrics`` and ``/v2/models/stats`` can never disagree and the request path records everything once. A
per-server ``CollectorRegistry`` (not prometheus-client's global one) keeps several servers in one process apart.
Metric names carry no ``_total`` suffix, exactly as Triton exposes them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.extensions.generation_metrics import generation_families
from server.extensions.statistics import FailureReason, ModelStats, StatisticsRegistry

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# name, help, type, how to read the value from a ModelStats (a dict by failure reason gives one sample per reason,
# labelled ``reason`` as in Triton).
_FAMILIES: list[tuple[str, str, str, object]] = [
    ("nv_inference_request_success", "Number of successful inference requests", "counter", lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests", "counter", lambda s: s.failures),
    (
        "nv_inference_count",
        "Number of inferences performed (batch size counted)",
        "counter",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions (batches) performed",
        "counter",
        lambda s: s.execution_count,
    ),
    (
        # Successful requests only, as in Triton: the request time of failed ones is in the statistics' ``fail``.
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds",
        "counter",
        lambda s: s.success.ns // 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative time requests spent queued, in microseconds",
        "counter",
        lambda s: s.queue.ns // 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative time preparing batch inputs, in microseconds",
        "counter",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative time executing the model, in microseconds",
        "counter",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative time splitting batch outputs, in microseconds",
        "counter",
        lambda s: s.compute_output.ns // 1000,
    ),
    ("nv_cache_num_hits_per_model", "Number of response cache hits per model", "counter", lambda s: s.cache_hit.count),
    (
        "nv_cache_num_misses_per_model",
        "Number of response cache misses per model",
        "counter",
        lambda s: s.cache_miss.count,
    ),
    (
        "nv_cache_hit_duration_per_model",
        "Cumulative time looking up and copying out response cache hits, in microseconds",
        "counter",
        lambda s: s.cache_hit.ns // 1000,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Cumulative time looking up and inserting response cache misses, in microseconds",
        "counter",
        lambda s: s.cache_miss.ns // 1000,
    ),
    (
        "nv_inference_pending_request_count",
        "Number of requests accepted and waiting for execution",
        "gauge",
        lambda s: s.pending,
    ),
]


class _StatisticsCollector(Collector):
    def __init__(self, statistics: StatisticsRegistry) -> None:
        self.statistics = statistics

    def collect(self) -> Iterator[Metric]:
        all_stats = self.statistics.all()
        for name, documentation, kind, read in _FAMILIES:
            family = Metric(name, documentation, kind)
            for stats in all_stats:
                value = read(stats)  # type: ignore[operator]
                if isinstance(value, dict):
                    for reason in FailureReason:
                        family.add_sample(name, _failure_labels(stats, reason), float(value[reason]))
                else:
                    family.add_sample(name, _labels(stats), float(value))
            yield family
        histogram = HistogramMetricFamily(
            "modeldock_inference_batch_size", "Number of inferences in each executed batch", labels=["model", "version"]
        )
        for stats in all_stats:
            counts = {size: b.compute_infer.count for size, b in stats.batches.items()}
            buckets = [
                (str(bound), float(sum(c for s, c in counts.items() if s <= bound))) for bound in BATCH_SIZE_BUCKETS
            ]
            buckets.append(("+Inf", float(sum(counts.values()))))
            total_rows = float(sum(size * c for size, c in counts.items()))
            histogram.add_metric([stats.name, stats.version], buckets, total_rows)
        yield histogram
        generating = [(s.name, s.version, s.generation) for s in all_stats if s.generation is not None]
        if generating:
            yield from generation_families(generating)


def _labels(stats: ModelStats) -> dict[str, str]:
    return {"model": stats.name, "version": stats.version}


def _failure_labels(stats: ModelStats, reason: FailureReason) -> dict[str, str]:
    # Triton's order (its labels are sorted), so a failure line reads exactly as Triton writes it.
    return {"model": stats.name, "reason": reason.value, "version": stats.version}


# prometheus-client names a counter family ``<name>_total`` in its HELP/TYPE lines; Triton's counters have no
# suffix, so the header lines are renamed to match the samples.
_COUNTER_HEADER = re.compile(
    rb"^# (HELP|TYPE) (" + b"|".join(n.encode() for n, _, k, _ in _FAMILIES if k == "counter") + rb")_total ",
    re.MULTILINE,
)


class ServerMetrics:
    def __init__(self, statistics: StatisticsRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatisticsCollector(statistics))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format, as ``GET /metrics`` serves it."""
        return _COUNTER_HEADER.sub(rb"# \1 \2 ", generate_latest(self.registry))

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on its own port from a background thread, as Triton does on 8002."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not worth a log line
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
