"""The dynamic batcher in-process, on a real backend whose batches take a known time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import ModelConfig, parse_model_config
from server.errors import BackendError, ConfigError, QueueFull, RequestTimeout
from server.protocol.types import InferRequest
from server.repository.model_manager import ServedVersion, make_scheduler
from server.scheduling.dynamic_batcher import DynamicBatcher
from server.scheduling.instances import InstancePool, create_instances
from server.scheduling.scheduler import DirectScheduler, PendingRequest, Scheduler, merge_inputs
from tests.slow_backend import SleepBackend


def model_config(
    *,
    sleep_ms: int = 0,
    sleep_from_input: bool = False,
    instances: int = 1,
    max_batch_size: int = 8,
    dims: list[int] | None = None,
    **batching: Any,
) -> ModelConfig:
    data = {
        "backend": "tests.slow_backend:SleepBackend",
        "max_batch_size": max_batch_size,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": dims or [4]}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": dims or [4]}],
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "dynamic_batching": batching,
        "parameters": {"sleep_ms": sleep_ms, "sleep_from_input": sleep_from_input},
    }
    return parse_model_config(data, "test config", "sleepy")


def make_batcher(tmp_path: Path, config: ModelConfig) -> DynamicBatcher:
    pool = InstancePool(create_instances(config, tmp_path, SleepBackend))
    return DynamicBatcher(config, "1", pool)


def request(value: float, rows: int = 1, width: int = 4, **parameters: Any) -> InferRequest:
    data = np.full((rows, width), value, dtype=np.float32)
    return InferRequest(model_name="sleepy", inputs={"INPUT": data}, parameters=parameters)


async def result(pending: PendingRequest) -> np.ndarray:
    async for response in pending.responses():
        return response.outputs["OUTPUT"]
    raise AssertionError("no response")


def executed_shapes(batcher: DynamicBatcher) -> list[tuple[int, ...]]:
    return [shape for instance in batcher.pool.instances for shape in instance.backend.batches]  # type: ignore[attr-defined]


async def test_concurrent_requests_are_merged_and_answered_individually(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=100))
    first = batcher.submit(request(0))
    await asyncio.sleep(0.03)  # the first runs alone; the rest queue up behind it
    rest = [batcher.submit(request(i)) for i in range(1, 8)]
    outputs = await asyncio.gather(result(first), *(result(p) for p in rest))
    for value, output in enumerate(outputs):
        np.testing.assert_array_equal(output, np.full((1, 4), 2 * value, dtype=np.float32))
    assert executed_shapes(batcher) == [(1, 4), (7, 4)]
    stats = batcher.stats.to_json()
    assert stats["inference_count"] == 8
    assert stats["execution_count"] == 2
    assert [b["batch_size"] for b in stats["batch_stats"]] == [1, 7]
    assert stats["inference_stats"]["success"]["count"] == 8
    await batcher.close()


async def test_batch_never_exceeds_max_batch_size(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=50, max_batch_size=4))
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.02)
    pending = [batcher.submit(request(i, rows=1 + i % 3)) for i in range(10)]
    await asyncio.gather(result(blocker), *(result(p) for p in pending))
    sizes = [shape[0] for shape in executed_shapes(batcher)]
    assert max(sizes) <= 4
    assert sum(sizes) == 1 + sum(1 + i % 3 for i in range(10))
    await batcher.close()


async def test_lone_request_waits_for_the_queue_delay(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(preferred_batch_size=[4], max_queue_delay_microseconds=200_000))
    begin = time.monotonic()
    await result(batcher.submit(request(1)))
    assert time.monotonic() - begin > 0.15

    # A preferred batch size that is reached does not wait for the delay.
    begin = time.monotonic()
    await asyncio.gather(*(result(batcher.submit(request(i))) for i in range(4)))
    assert time.monotonic() - begin < 0.15
    assert executed_shapes(batcher) == [(1, 4), (4, 4)]
    await batcher.close()


async def test_different_shapes_are_not_merged(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=50, dims=[-1]))
    blocker = batcher.submit(request(0, width=3))
    await asyncio.sleep(0.02)
    pending = [batcher.submit(request(i, width=2 + i % 3)) for i in range(9)]
    outputs = await asyncio.gather(*(result(p) for p in pending))
    await result(blocker)
    for i, output in enumerate(outputs):
        np.testing.assert_array_equal(output, np.full((1, 2 + i % 3), 2 * i, dtype=np.float32))
    # Every executed batch has one width: after the blocker, one batch per distinct width.
    assert sorted(executed_shapes(batcher)[1:]) == [(3, 2), (3, 3), (3, 4)]
    await batcher.close()


async def test_higher_priority_is_served_first(tmp_path: Path) -> None:
    config = model_config(sleep_ms=100, max_batch_size=1, priority_levels=2, default_priority_level=2)
    batcher = make_batcher(tmp_path, config)
    finished: list[str] = []

    async def run(name: str, pending: PendingRequest) -> None:
        await result(pending)
        finished.append(name)

    blocker = asyncio.create_task(run("blocker", batcher.submit(request(0))))
    await asyncio.sleep(0.03)
    low = [asyncio.create_task(run(f"low{i}", batcher.submit(request(i)))) for i in range(2)]
    default = asyncio.create_task(run("default", batcher.submit(request(5, priority=0))))
    high = asyncio.create_task(run("high", batcher.submit(request(9, priority=1))))
    await asyncio.gather(blocker, *low, default, high)
    assert finished == ["blocker", "high", "low0", "low1", "default"]
    await batcher.close()


async def test_queue_timeout_rejects_promptly(tmp_path: Path) -> None:
    config = model_config(sleep_ms=400, default_queue_policy={"default_timeout_microseconds": 50_000})
    batcher = make_batcher(tmp_path, config)
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.02)
    begin = time.monotonic()
    with pytest.raises(RequestTimeout, match="timed out"):
        await result(batcher.submit(request(1)))
    assert time.monotonic() - begin < 0.3
    await result(blocker)
    assert batcher.stats.to_json()["inference_stats"]["fail"]["count"] == 1
    await batcher.close()


async def test_request_may_shorten_its_timeout_when_allowed(tmp_path: Path) -> None:
    config = model_config(sleep_ms=300, default_queue_policy={"allow_timeout_override": True})
    batcher = make_batcher(tmp_path, config)
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.02)
    patient = batcher.submit(request(1))
    with pytest.raises(RequestTimeout):
        await result(batcher.submit(request(2, timeout=50_000)))
    await asyncio.gather(result(blocker), result(patient))
    await batcher.close()


async def test_delayed_request_moves_behind_the_others(tmp_path: Path) -> None:
    config = model_config(
        sleep_ms=300,
        max_batch_size=1,
        priority_levels=2,
        default_priority_level=2,
        priority_queue_policy={1: {"allow_timeout_override": True, "timeout_action": "DELAY"}},
    )
    batcher = make_batcher(tmp_path, config)
    finished: list[str] = []

    async def run(name: str, pending: PendingRequest) -> None:
        await result(pending)
        finished.append(name)

    blocker = asyncio.create_task(run("blocker", batcher.submit(request(0))))
    await asyncio.sleep(0.02)
    delayed = asyncio.create_task(run("delayed", batcher.submit(request(1, priority=1, timeout=50_000))))
    await asyncio.sleep(0.1)  # past the 50 ms timeout: moved behind the queued requests of its level
    normal = asyncio.create_task(run("normal", batcher.submit(request(2, priority=1))))
    await asyncio.gather(blocker, delayed, normal)
    assert finished == ["blocker", "normal", "delayed"]
    await batcher.close()


async def test_full_queue_rejects_at_once(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=200, default_queue_policy={"max_queue_size": 2}))
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.02)
    queued = [batcher.submit(request(i)) for i in (1, 2)]
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit(request(3))
    await asyncio.gather(result(blocker), *(result(p) for p in queued))
    stats = batcher.stats.to_json()
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 3
    await batcher.close()


async def test_instances_run_in_parallel(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=300, instances=2, max_batch_size=1))
    begin = time.monotonic()
    await asyncio.gather(result(batcher.submit(request(1))), result(batcher.submit(request(2))))
    assert time.monotonic() - begin < 0.5
    await batcher.close()


@pytest.mark.parametrize("preserve_ordering", [False, True])
async def test_preserve_ordering_holds_a_fast_batch_behind_a_slow_one(tmp_path: Path, preserve_ordering: bool) -> None:
    config = model_config(sleep_from_input=True, instances=2, max_batch_size=1, preserve_ordering=preserve_ordering)
    batcher = make_batcher(tmp_path, config)
    answered: list[float] = []

    async def send(value: float) -> None:
        output = await result(batcher.submit(request(value)))
        answered.append(float(output[0, 0]) / 2)

    slow = asyncio.ensure_future(send(300))  # sleeps 300 ms on one instance
    await asyncio.sleep(0.02)
    await asyncio.gather(slow, send(10))  # sleeps 10 ms on the other
    assert answered == ([300, 10] if preserve_ordering else [10, 300])
    assert [len(i.backend.batches) for i in batcher.pool.instances] == [1, 1]  # type: ignore[attr-defined]
    await batcher.close()


async def test_close_finishes_accepted_requests(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=50))
    pending = [batcher.submit(request(i)) for i in range(5)]
    await batcher.close()
    outputs = await asyncio.gather(*(result(p) for p in pending))
    assert [float(o[0, 0]) for o in outputs] == [0, 2, 4, 6, 8]


def test_scheduler_choice(tmp_path: Path) -> None:
    batching = model_config()
    pool = InstancePool(create_instances(batching, tmp_path, SleepBackend))
    assert isinstance(make_scheduler(batching, "1", pool), DynamicBatcher)
    unset = batching.model_copy(update={"dynamic_batching": None})
    assert isinstance(make_scheduler(unset, "1", pool), DirectScheduler)
    unbatched = batching.model_copy(update={"max_batch_size": 0})
    assert isinstance(make_scheduler(unbatched, "1", pool), DirectScheduler)
    pool.unload()


def ragged_config(kind: str) -> ModelConfig:
    data = {
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [-1], "allow_ragged_batch": True}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [1]}],
        "batch_input": [{"kind": kind, "target_name": ["INDEX"], "data_type": "TYPE_INT32", "source_input": ["INPUT"]}],
    }
    return parse_model_config(data, "test config", "ragged")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("BATCH_ELEMENT_COUNT", [2, 3, 1]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT", [2, 5, 6]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", [0, 2, 5, 6]),
    ],
)
def test_ragged_inputs_are_concatenated_with_batch_inputs(kind: str, expected: list[int]) -> None:
    requests = [request(1, width=2), request(2, width=3), request(3, width=1)]
    merged = merge_inputs(ragged_config(kind), requests)
    np.testing.assert_array_equal(merged["INPUT"], np.array([1, 1, 2, 2, 2, 3], dtype=np.float32))
    assert merged["INDEX"].dtype == np.int32
    np.testing.assert_array_equal(merged["INDEX"], expected)


def test_batch_input_must_name_an_input() -> None:
    data = ragged_config("BATCH_ELEMENT_COUNT").model_dump(mode="json", exclude_none=True)
    data["batch_input"][0]["source_input"] = ["NOPE"]
    with pytest.raises(ConfigError, match="source_input 'NOPE'"):
        parse_model_config(data, "test config", "ragged")


def assert_settled(batcher: Scheduler, succeeded: int, failed: int) -> None:
    """Every request is counted once, with its outcome, and none is left pending."""
    stats = batcher.stats.to_json()["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (succeeded, failed)
    assert batcher.stats.pending == 0


async def test_cancelled_request_leaves_the_queue_and_never_runs(tmp_path: Path) -> None:
    config = model_config(sleep_ms=200, max_batch_size=1, default_queue_policy={"max_queue_size": 1})
    batcher = make_batcher(tmp_path, config)
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.03)
    abandoned = batcher.submit(request(1))
    batcher.cancel(abandoned)
    # Its place in the queue is free at once: the queue holds one request.
    waiting = batcher.submit(request(2))
    assert batcher.stats.pending == 1
    outputs = await asyncio.wait_for(asyncio.gather(result(blocker), result(waiting)), 5)
    assert [float(o[0, 0]) for o in outputs] == [0, 4]
    assert executed_shapes(batcher) == [(1, 4), (1, 4)]
    assert_settled(batcher, succeeded=2, failed=1)
    await batcher.close()


async def test_cancelled_request_in_a_running_batch_only_loses_its_answer(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=200))
    running = batcher.submit(request(1))
    await asyncio.sleep(0.03)
    batcher.cancel(running)
    batcher.cancel(running)  # a second cancel changes nothing
    await asyncio.wait_for(batcher.close(), 5)
    assert executed_shapes(batcher) == [(1, 4)]
    assert_settled(batcher, succeeded=1, failed=0)


async def test_cancelled_request_of_the_direct_scheduler_never_runs(tmp_path: Path) -> None:
    config = model_config(sleep_ms=200).model_copy(update={"dynamic_batching": None})
    scheduler = make_scheduler(config, "1", InstancePool(create_instances(config, tmp_path, SleepBackend)))
    assert isinstance(scheduler, DirectScheduler)
    blocker = scheduler.submit(request(0))
    await asyncio.sleep(0.03)
    abandoned = scheduler.submit(request(1))
    scheduler.cancel(abandoned)
    assert scheduler.stats.pending == 0
    await asyncio.wait_for(result(blocker), 5)
    await asyncio.wait_for(scheduler.close(), 5)
    assert [len(i.backend.batches) for i in scheduler.pool.instances] == [1]  # type: ignore[attr-defined]
    stats = scheduler.stats.to_json()["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (1, 1)
    assert scheduler.stats.pending == 0


async def test_consumer_cancelled_while_queued_cancels_the_request(tmp_path: Path) -> None:
    config = model_config(sleep_ms=200, max_batch_size=1)
    pool = InstancePool(create_instances(config, tmp_path, SleepBackend))
    served = ServedVersion(config, 1, SleepBackend, pool, tmp_path)
    blocker = asyncio.ensure_future(served.infer(request(0)))
    await asyncio.sleep(0.03)
    client = asyncio.ensure_future(served.infer(request(1)))
    await asyncio.sleep(0.03)
    client.cancel()  # what a cancelled gRPC call or a closed stream does to its handler
    await asyncio.wait_for(blocker, 5)
    await asyncio.wait_for(served.close(), 5)
    assert [len(i.backend.batches) for i in pool.instances] == [1]  # type: ignore[attr-defined]
    stats = served.scheduler.stats
    assert (stats.success.count, stats.fail.count, stats.pending) == (1, 1, 0)


async def test_delayed_request_counts_against_the_queue_size(tmp_path: Path) -> None:
    policy = {"max_queue_size": 1, "default_timeout_microseconds": 30_000, "timeout_action": "DELAY"}
    batcher = make_batcher(tmp_path, model_config(sleep_ms=300, max_batch_size=1, default_queue_policy=policy))
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.02)
    delayed = batcher.submit(request(1))
    await asyncio.sleep(0.1)  # past its timeout: delayed, but still waiting in the queue
    with pytest.raises(QueueFull):
        batcher.submit(request(2))
    await asyncio.wait_for(asyncio.gather(result(blocker), result(delayed)), 5)
    await batcher.close()


async def test_delayed_request_stays_ahead_of_lower_priority_levels(tmp_path: Path) -> None:
    config = model_config(
        sleep_ms=300,
        max_batch_size=1,
        priority_levels=2,
        default_priority_level=2,
        priority_queue_policy={1: {"default_timeout_microseconds": 50_000, "timeout_action": "DELAY"}},
    )
    batcher = make_batcher(tmp_path, config)
    finished: list[str] = []

    async def run(name: str, pending: PendingRequest) -> None:
        await result(pending)
        finished.append(name)

    blocker = asyncio.create_task(run("blocker", batcher.submit(request(0))))
    await asyncio.sleep(0.02)
    low = asyncio.create_task(run("low", batcher.submit(request(1, priority=2))))
    delayed = asyncio.create_task(run("delayed", batcher.submit(request(2, priority=1))))
    await asyncio.wait_for(asyncio.gather(blocker, low, delayed), 5)
    # Triton delays a timed-out request behind its own level and the levels above it, never below.
    assert finished == ["blocker", "delayed", "low"]
    await batcher.close()


async def test_batch_stays_at_the_preferred_size_after_the_queue_delay(tmp_path: Path) -> None:
    config = model_config(sleep_ms=200, preferred_batch_size=[2], max_queue_delay_microseconds=50_000)
    batcher = make_batcher(tmp_path, config)
    blocker = batcher.submit(request(0))
    await asyncio.sleep(0.1)  # the blocker waited out the delay and runs alone
    rest = [batcher.submit(request(i)) for i in range(1, 7)]
    await asyncio.wait_for(asyncio.gather(result(blocker), *(result(p) for p in rest)), 5)
    # The six waited past the delay behind the blocker; as in Triton, batches are still cut at the preferred 2.
    assert executed_shapes(batcher) == [(1, 4), (2, 4), (2, 4), (2, 4)]
    await batcher.close()


async def test_preferred_batch_is_sent_before_the_queue_delay(tmp_path: Path) -> None:
    config = model_config(preferred_batch_size=[2], max_queue_delay_microseconds=1_000_000)
    batcher = make_batcher(tmp_path, config)
    begin = time.monotonic()
    pending = [batcher.submit(request(i)) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*(result(p) for p in pending[:4])), 5)
    assert time.monotonic() - begin < 0.5
    await asyncio.wait_for(result(pending[4]), 5)
    assert executed_shapes(batcher) == [(2, 4), (2, 4), (1, 4)]
    await batcher.close()


async def test_batcher_bug_fails_the_waiting_requests_and_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = make_batcher(tmp_path, model_config(max_queue_delay_microseconds=20_000))
    original = DynamicBatcher._take

    def broken_take(self: DynamicBatcher, head: Any) -> Any:
        monkeypatch.setattr(DynamicBatcher, "_take", original)
        raise RuntimeError("bug")

    monkeypatch.setattr(DynamicBatcher, "_take", broken_take)
    failed = [batcher.submit(request(i)) for i in range(3)]
    for pending in failed:
        with pytest.raises(BackendError, match="dynamic batcher failed"):
            await asyncio.wait_for(result(pending), 5)
    # The instance the failed dispatcher held is back: the next request is served.
    output = await asyncio.wait_for(result(batcher.submit(request(5))), 5)
    assert float(output[0, 0]) == 10
    assert_settled(batcher, succeeded=1, failed=3)
    await batcher.close()


async def test_backend_error_fails_its_batch_only(tmp_path: Path) -> None:
    batcher = make_batcher(tmp_path, model_config(sleep_ms=100))
    first = batcher.submit(request(1))
    await asyncio.sleep(0.03)
    doomed = [batcher.submit(request(-1)), batcher.submit(request(2))]  # a negative input fails its batch
    await asyncio.sleep(0.03)
    await asyncio.wait_for(result(first), 5)
    for pending in doomed:
        with pytest.raises(BackendError, match="negative input"):
            await asyncio.wait_for(result(pending), 5)
    after = await asyncio.wait_for(result(batcher.submit(request(3))), 5)
    assert float(after[0, 0]) == 6
    stats = batcher.stats.to_json()
    assert (stats["inference_stats"]["success"]["count"], stats["inference_stats"]["fail"]["count"]) == (2, 2)
    assert stats["execution_count"] == 2
    assert batcher.stats.pending == 0
    await batcher.close()


async def test_timeout_does_not_touch_a_request_already_executing(tmp_path: Path) -> None:
    config = model_config(sleep_ms=300, default_queue_policy={"default_timeout_microseconds": 100_000})
    batcher = make_batcher(tmp_path, config)
    output = await asyncio.wait_for(result(batcher.submit(request(1))), 5)
    assert float(output[0, 0]) == 2
    stats = batcher.stats.to_json()["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (1, 0)
    await batcher.close()


async def test_arrivals_below_a_full_batch_do_not_wake_the_collector(tmp_path: Path) -> None:
    """Requests trickling in during the queue delay are batched together, and the collector wakes for the delay,
    a full batch or a deadline only, not once per arrival."""
    batcher = make_batcher(tmp_path, model_config(max_queue_delay_microseconds=200_000))
    wakes = 0
    set_event = batcher._arrived.set

    def counting_set() -> None:
        nonlocal wakes
        wakes += 1
        set_event()

    batcher._arrived.set = counting_set  # type: ignore[method-assign]
    pending = [batcher.submit(request(i)) for i in range(5)]
    outputs = await asyncio.gather(*(result(p) for p in pending))
    assert [float(o[0, 0]) for o in outputs] == [2.0 * i for i in range(5)]
    assert executed_shapes(batcher) == [(5, 4)]
    assert wakes == 2  # the first arrival, which starts the wait, and the timer at the end of the delay
    # A full batch wakes it at once rather than after the delay.
    started = time.monotonic()
    full = [batcher.submit(request(i)) for i in range(8)]
    await asyncio.gather(*(result(p) for p in full))
    assert time.monotonic() - started < 0.15
    assert executed_shapes(batcher)[-1] == (8, 4)
    await batcher.close()


async def test_last_response_is_the_final_one_and_errors_propagate() -> None:
    from server.protocol.types import InferResponse

    streamed = PendingRequest(request(0))
    streamed.send(InferResponse("sleepy", "1", outputs={"OUTPUT": np.zeros(1)}, final=False))
    waiter = asyncio.ensure_future(streamed.last_response())
    await asyncio.sleep(0)
    streamed.send(InferResponse("sleepy", "1", outputs={"OUTPUT": np.ones(1)}, final=True))
    last = await waiter
    assert last is not None and float(last.outputs["OUTPUT"][0]) == 1.0

    failed = PendingRequest(request(0))
    waiter = asyncio.ensure_future(failed.last_response())
    await asyncio.sleep(0)
    failed.fail(BackendError("boom"))
    with pytest.raises(BackendError, match="boom"):
        await waiter
