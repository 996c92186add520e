"""What image-generation models record for Prometheus: denoising steps, how long each takes, images made, and how
far the batches running now have got.

One image can take seconds to minutes, so a request's latency alone says little while it runs; the step counter
and the progress gauge show work moving (or stuck), and the step-time histogram is the figure to size hardware by.
A backend records from its executor thread once per denoising step (the pipeline's step callback) and scrapes read,
so every update and read takes the lock. Stats live in one process-wide registry keyed by model and version,
because the backend that records them sits below the scheduler that owns a version's other statistics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.extensions.generation_metrics import _Histogram

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DenoisingStats:
    """One model version's denoising figures, across all its instances."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.step_seconds = _Histogram(STEP_BUCKETS)
        self.images = 0
        # Steps run so far and steps planned, over the batches running now (progress = done / planned).
        self.steps_done = 0
        self.steps_planned = 0
        self.running_images = 0

    def start_batch(self, images: int, steps: int) -> None:
        with self._lock:
            self.running_images += images
            self.steps_planned += steps

    def record_step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds.observe(seconds)
            self.steps_done += 1

    def finish_batch(self, images: int, steps: int, steps_run: int, succeeded: bool) -> None:
        """A batch ended: its images count once it succeeded, and its share of the progress gauge goes."""
        with self._lock:
            self.running_images -= images
            self.steps_planned -= steps
            self.steps_done -= steps_run
            if succeeded:
                self.images += images


class DenoisingRegistry:
    """The stats of every loaded image-generation model version, by ``(model, version)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], DenoisingStats] = {}
        self._users: dict[tuple[str, str], int] = {}

    def acquire(self, model: str, version: str) -> DenoisingStats:
        """The version's stats, created by its first instance; each instance calls ``release`` when it unloads."""
        key = (model, version)
        with self._lock:
            self._users[key] = self._users.get(key, 0) + 1
            return self._stats.setdefault(key, DenoisingStats())

    def release(self, model: str, version: str) -> None:
        key = (model, version)
        with self._lock:
            self._users[key] = self._users.get(key, 1) - 1
            if self._users[key] <= 0:
                self._users.pop(key, None)
                self._stats.pop(key, None)

    def all(self) -> list[tuple[str, str, DenoisingStats]]:
        with self._lock:
            return [(name, version, stats) for (name, version), stats in sorted(self._stats.items())]


DENOISING = DenoisingRegistry()


class DenoisingCollector(Collector):
    """The ``modeldock_diffusion_*`` families, for a server's metrics registry."""

    def __init__(self, registry: DenoisingRegistry = DENOISING) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        models = self.registry.all()
        if not models:
            return
        labels = ["model", "version"]
        step = HistogramMetricFamily(
            "modeldock_diffusion_step_seconds",
            "Wall time of one denoising step (all images of its batch)",
            labels=labels,
        )
        steps = CounterMetricFamily("modeldock_diffusion_steps", "Denoising steps run", labels=labels)
        images = CounterMetricFamily("modeldock_diffusion_images", "Images generated", labels=labels)
        running = GaugeMetricFamily("modeldock_diffusion_running_images", "Images being generated now", labels=labels)
        progress = GaugeMetricFamily(
            "modeldock_diffusion_progress_ratio",
            "Share of the denoising steps of the batches running now that are done (0 to 1; 0 when idle)",
            labels=labels,
        )
        for name, version, stats in models:
            with stats._lock:
                step.add_metric([name, version], stats.step_seconds.buckets(), stats.step_seconds.total)
                steps.add_metric([name, version], float(sum(stats.step_seconds.counts)))
                images.add_metric([name, version], float(stats.images))
                running.add_metric([name, version], float(stats.running_images))
                planned = stats.steps_planned
                progress.add_metric([name, version], stats.steps_done / planned if planned else 0.0)
        yield step
        yield steps
        yield images
        yield running
        yield progress
