"""What vLLM's scheduler reports after each step, recorded in the model's ``GenerationStats``: requests running and
waiting, KV cache usage and preemptions. vLLM hands these to its stat loggers; this one writes them where
ModelDock's metrics read them. Time to first token and token counts are recorded by the backend as outputs arrive.

Imports vLLM: only imported when an engine starts.
"""

from __future__ import annotations

from typing import Any, Protocol

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase

from server.extensions.generation_metrics import GenerationStats


class _HasStats(Protocol):
    stats: GenerationStats | None


class EngineStatsLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0, *, backend: _HasStats) -> None:
        self._backend = backend

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        stats = self._backend.stats  # set by the generation scheduler once the model is loaded
        if stats is None:
            return
        if scheduler_stats is not None:
            stats.update_queue(
                scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs, scheduler_stats.kv_cache_usage
            )
        if iteration_stats is not None:
            for _ in range(iteration_stats.num_preempted_reqs):
                stats.record_preempted()

    def log_engine_initialized(self) -> None:
        """vLLM logs its engine's settings here; ModelDock logs the start itself."""


def engine_stats_logger(backend: _HasStats) -> Any:
    """The stat-logger factory ``AsyncLLM`` calls with its config and an engine index."""

    def factory(vllm_config: VllmConfig, engine_index: int = 0) -> EngineStatsLogger:
        return EngineStatsLogger(vllm_config, engine_index, backend=backend)

    return factory
