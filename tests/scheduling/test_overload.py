"""A short run of ``bench/bench_overload.py``: at 10x the sustainable rate the server sheds quickly with 503,
answers every accepted request correctly, keeps its memory bounded and serves normally once the load drops."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_overload.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_overload", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_overload_sheds_fast_stays_correct_and_recovers() -> None:
    bench = _bench()
    result = bench.run_overload(batch_ms=40.0, max_queue_size=8, factor=10.0, overload_s=2.0, recovery_s=2.0)
    print(bench.report(result))
    capacity, overload, recovery = result.capacity, result.overload, result.recovery
    assert capacity.served_rate > 5
    for phase in (capacity, overload, recovery):
        assert phase.wrong == 0 and phase.other == 0, phase.name
    # Offered well above what is served, so most requests are shed, and shed at once rather than after queueing.
    assert overload.offered_rate > 4 * capacity.served_rate
    assert overload.shed_share > 0.5
    assert overload.shed_p50_s < 0.25 and overload.shed_p99_s < 2.0
    # The accepted ones wait at most a full queue (8 batches of 40 ms), not for the backlog of the overload.
    assert overload.served_rate > 0.5 * capacity.served_rate
    assert overload.served_p99_s < 5.0
    # Memory stays bounded: refused requests hold nothing.
    if result.baseline_rss_bytes and overload.peak_rss_bytes:
        assert overload.peak_rss_bytes - result.baseline_rss_bytes < 100 * 1024 * 1024
    # Recovery at once: half the capacity offered, (nearly) all of it served without queueing. The median, not
    # the tail: on a loaded CI machine a single stall of the whole machine would otherwise decide the test.
    assert recovery.shed_share <= 0.1
    assert recovery.served_rate >= 0.8 * recovery.offered_rate
    assert not math.isnan(recovery.served_p50_s) and recovery.served_p50_s < 1.0
