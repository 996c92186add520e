"""What the generation engine records for Prometheus: latency to the first token and between tokens, token
counts, how full the engine is, and how long its steps take.

Step times are split by kind because they answer different questions: decode-only steps are the floor every
running stream pays per token, and steps that also prefill prompts are the stalls new arrivals cause. The
forward pass is timed apart from the whole step so that host-side work (scheduling, sampling, detokenizing)
shows as the difference.

The engine thread records and scrapes read, so every update and read takes the lock. The metric names follow
vLLM's (under ``modeldock_llm_``), so dashboards built for vLLM need only the prefix changed.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0)
ITERATION_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STEP_KINDS = ("decode", "mixed")


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append((bound, float(cumulative)))
        return out


class GenerationStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.time_to_first_token = _Histogram(TTFT_BUCKETS)
        self.time_per_output_token = _Histogram(TPOT_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = 0
        self.aborted = 0
        self.preempted = 0
        # Requests refused because the engine could not take them in time (429 / UNAVAILABLE).
        self.rejected = 0
        # Prefix caching, in tokens as vLLM counts them: prompt tokens looked up, and those found cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Speculative decoding: draft tokens proposed and those the model confirmed (vLLM's spec_decode counters).
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.step_seconds = {kind: _Histogram(STEP_BUCKETS) for kind in STEP_KINDS}
        self.forward_seconds = {kind: _Histogram(STEP_BUCKETS) for kind in STEP_KINDS}
        self.iteration_tokens = _Histogram(ITERATION_TOKEN_BUCKETS)

    def record_first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += 1

    def record_output_token(self, seconds: float) -> None:
        with self._lock:
            self.time_per_output_token.observe(seconds)
            self.generation_tokens += 1

    def record_step(self, kind: str, step_seconds: float, forward_seconds: float, tokens: int) -> None:
        """One engine step: ``kind`` is "decode" (every row decodes one token) or "mixed" (some rows prefill)."""
        with self._lock:
            self.step_seconds[kind].observe(step_seconds)
            self.forward_seconds[kind].observe(forward_seconds)
            self.iteration_tokens.observe(tokens)

    def record_finished(self) -> None:
        with self._lock:
            self.finished += 1

    def record_aborted(self, count: int) -> None:
        with self._lock:
            self.aborted += count

    def record_rejected(self, count: int = 1) -> None:
        with self._lock:
            self.rejected += count

    def record_preempted(self) -> None:
        with self._lock:
            self.preempted += 1

    def record_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        with self._lock:
            self.prefix_cache_queries += queried_tokens
            self.prefix_cache_hits += hit_tokens

    def record_speculation(self, drafts: int, accepted: int) -> None:
        with self._lock:
            self.spec_draft_tokens += drafts
            self.spec_accepted_tokens += accepted

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were cached (0 before any lookup)."""
        with self._lock:
            return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def to_json(self) -> dict[str, int | float]:
        """The engine's counters and gauges for the statistics JSON (``/v2/models/{model}/stats``), so a client
        without a Prometheus scraper can read the prefix cache's hit rate, the queue and the cache's use."""
        with self._lock:
            queries = self.prefix_cache_queries
            return {
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "finished": self.finished,
                "aborted": self.aborted,
                "preempted": self.preempted,
                "rejected": self.rejected,
                "prefix_cache_queries": queries,
                "prefix_cache_hits": self.prefix_cache_hits,
                "prefix_cache_hit_rate": self.prefix_cache_hits / queries if queries else 0.0,
                "spec_draft_tokens": self.spec_draft_tokens,
                "spec_accepted_tokens": self.spec_accepted_tokens,
                "running": self.running,
                "waiting": self.waiting,
                "kv_cache_usage": self.kv_cache_usage,
            }

    def update_queue(self, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
        with self._lock:
            self.running, self.waiting = running, waiting
            if kv_cache_usage is not None:
                self.kv_cache_usage = kv_cache_usage


def generation_families(models: list[tuple[str, str, GenerationStats]]) -> Iterator[Metric]:
    """The engine metric families for every generating model version, as ``(name, version, stats)``."""
    labels = ["model", "version"]
    ttft = HistogramMetricFamily(
        "modeldock_llm_time_to_first_token_seconds", "Time from arrival to the first output token", labels=labels
    )
    tpot = HistogramMetricFamily(
        "modeldock_llm_time_per_output_token_seconds", "Time between consecutive output tokens", labels=labels
    )
    step = HistogramMetricFamily(
        "modeldock_llm_step_seconds",
        "Wall time of one engine step, host work included, by kind (decode: every row decodes; mixed: some prefill)",
        labels=[*labels, "kind"],
    )
    forward = HistogramMetricFamily(
        "modeldock_llm_step_forward_seconds",
        "Wall time of one step's forward pass on the model, by kind of step",
        labels=[*labels, "kind"],
    )
    iteration = HistogramMetricFamily(
        "modeldock_llm_iteration_tokens", "Tokens computed in one engine step (prompt and output)", labels=labels
    )
    counters = {
        "prompt_tokens": CounterMetricFamily("modeldock_llm_prompt_tokens", "Prompt tokens prefilled", labels=labels),
        "generation_tokens": CounterMetricFamily(
            "modeldock_llm_generation_tokens", "Output tokens generated", labels=labels
        ),
        "finished": CounterMetricFamily("modeldock_llm_requests_finished", "Sequences that finished", labels=labels),
        "aborted": CounterMetricFamily(
            "modeldock_llm_requests_aborted", "Sequences aborted because their client left", labels=labels
        ),
        "preempted": CounterMetricFamily(
            "modeldock_llm_preemptions", "Sequences preempted for lack of KV cache blocks", labels=labels
        ),
        "rejected": CounterMetricFamily(
            "modeldock_llm_requests_rejected",
            "Requests refused because the engine was overloaded (waiting queue full, or the wait over max_queue_delay_ms)",
            labels=labels,
        ),
        "prefix_cache_queries": CounterMetricFamily(
            "modeldock_llm_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (hit rate: prefix_cache_hits / prefix_cache_queries)",
            labels=labels,
        ),
        "prefix_cache_hits": CounterMetricFamily(
            "modeldock_llm_prefix_cache_hits", "Prompt tokens found in the prefix cache, not computed", labels=labels
        ),
        "spec_draft_tokens": CounterMetricFamily(
            "modeldock_llm_spec_decode_num_draft_tokens", "Draft tokens proposed by n-gram speculation", labels=labels
        ),
        "spec_accepted_tokens": CounterMetricFamily(
            "modeldock_llm_spec_decode_num_accepted_tokens", "Draft tokens the model confirmed", labels=labels
        ),
    }
    gauges = {
        "running": GaugeMetricFamily("modeldock_llm_requests_running", "Sequences in the running batch", labels=labels),
        "waiting": GaugeMetricFamily(
            "modeldock_llm_requests_waiting", "Sequences waiting to be admitted", labels=labels
        ),
        "kv_cache_usage": GaugeMetricFamily(
            "modeldock_llm_kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1)", labels=labels
        ),
    }
    for name, version, stats in models:
        with stats._lock:
            ttft.add_metric([name, version], stats.time_to_first_token.buckets(), stats.time_to_first_token.total)
            tpot.add_metric([name, version], stats.time_per_output_token.buckets(), stats.time_per_output_token.total)
            iteration.add_metric([name, version], stats.iteration_tokens.buckets(), stats.iteration_tokens.total)
            for kind in STEP_KINDS:
                step.add_metric(
                    [name, version, kind], stats.step_seconds[kind].buckets(), stats.step_seconds[kind].total
                )
                seconds = stats.forward_seconds[kind]
                forward.add_metric([name, version, kind], seconds.buckets(), seconds.total)
            for attribute, family in {**counters, **gauges}.items():
                family.add_metric([name, version], float(getattr(stats, attribute)))
    yield ttft
    yield tpot
    yield step
    yield forward
    yield iteration
    yield from counters.values()
    yield from gauges.values()
