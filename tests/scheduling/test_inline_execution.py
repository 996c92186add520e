"""Cheap batches on the event loop: when an instance runs a batch inline, and that a slow model never does.

``ModelInstance`` runs a batch of a backend declaring ``runs_inline_when_cheap`` on the event loop once its recent
batches were measured cheap (``InlineEstimate``); everything else goes to the instance thread. The end-to-end test
serves a cheap and a slow ONNX model (both ONNX Runtime, which declares it) from one server and checks that the
cheap one keeps answering while a batch of the slow one runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from backends.base import Backend
from server.config import ModelConfig, parse_model_config
from server.devices import CPU, Device
from server.scheduling.instances import INLINE_STOP_S, InlineEstimate, InstancePlacement, ModelInstance
from tests.conftest import ServerProcess
from tests.scheduling.test_batching_e2e import write_model


class BurnBackend(Backend):
    """Computes for as many milliseconds of CPU time as its input's first value says, and records on which thread.

    It burns CPU rather than sleeping: the declaration means ``execute`` only computes, and the instance measures
    batches by CPU time."""

    runs_inline_when_cheap: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        self.threads: list[int] = []

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        end = time.thread_time() + float(inputs["INPUT"].flat[0]) / 1000
        while time.thread_time() < end:
            pass
        return {"OUTPUT": inputs["INPUT"] * 2}


class UndeclaredBurnBackend(BurnBackend):
    runs_inline_when_cheap: ClassVar[bool] = False


def burn_config() -> ModelConfig:
    data = {
        "backend": "tests.scheduling.test_inline_execution:BurnBackend",
        "max_batch_size": 64,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [-1]}],
    }
    return parse_model_config(data, "test config", "burn")


def make_instance(
    backend_cls: type[BurnBackend] = BurnBackend, device: Device = CPU
) -> tuple[ModelInstance, BurnBackend]:
    backend = backend_cls(burn_config(), Path("."), device)
    instance = ModelInstance(InstancePlacement("burn", device), backend, None, backend_cls.runs_inline_when_cheap)
    return instance, backend


async def run(instance: ModelInstance, milliseconds: float, width: int = 4, timeout_s: float | None = None) -> bool:
    """One batch; True if it ran on the event loop's thread."""
    inputs = {"INPUT": np.full((1, width), milliseconds, dtype=np.float32)}
    outputs = await instance.execute(inputs, ["OUTPUT"], timeout_s)
    np.testing.assert_array_equal(outputs["OUTPUT"], inputs["INPUT"] * 2)
    backend = instance.backend
    assert isinstance(backend, BurnBackend)
    return backend.threads[-1] == threading.get_ident()


async def test_a_cheap_batch_runs_on_the_loop_once_measured() -> None:
    instance, _ = make_instance()
    try:
        assert not await run(instance, 0)  # nothing measured yet: the thread
        # The thread's first batch can pay one-time costs (a busy machine's page faults, first calls), so it may take
        # one or two more measured batches; after that every cheap batch runs on the loop.
        settled = [await run(instance, 0) for _ in range(3)]
        assert settled[-1], settled
        assert all([await run(instance, 0) for _ in range(20)])
    finally:
        instance.unload()


async def test_a_slow_model_never_runs_on_the_loop() -> None:
    instance, _ = make_instance()
    try:
        assert not any([await run(instance, 5) for _ in range(6)])
    finally:
        instance.unload()


async def test_a_batch_far_larger_than_those_measured_goes_to_the_thread() -> None:
    instance, _ = make_instance()
    try:
        for _ in range(3):
            await run(instance, 0.02, width=4)
        assert await run(instance, 0.02, width=4)
        # 10,000 times the bytes: predicted far past the limit, whatever the small batches cost.
        assert not await run(instance, 0.02, width=40_000)
    finally:
        instance.unload()


async def test_one_slow_inline_batch_sends_the_next_ones_to_the_thread() -> None:
    instance, _ = make_instance()
    try:
        for _ in range(3):
            await run(instance, 0)
        assert await run(instance, 2 * INLINE_STOP_S * 1000)  # cheap until now, so it ran inline (and stalled)
        held = [await run(instance, 0) for _ in range(16)]
        assert not any(held)
        assert await run(instance, 0)  # the hold is over and the thread's batches were cheap
    finally:
        instance.unload()


def test_the_hold_after_a_slow_inline_batch_doubles_each_time() -> None:
    estimate = InlineEstimate()
    holds = []
    for _ in range(3):
        estimate.record(0.0, 16, inline=False)
        estimate.record(2 * INLINE_STOP_S, 16, inline=True)
        held = 0
        while not estimate.allows(16):
            held += 1
            estimate.record(0.0, 16, inline=False)
        holds.append(held)
    assert holds == [holds[0], 2 * holds[0], 4 * holds[0]]


@pytest.mark.parametrize("case", ["undeclared backend", "GPU instance", "near deadline"])
async def test_batches_stay_on_the_thread(case: str) -> None:
    backend_cls = UndeclaredBurnBackend if case == "undeclared backend" else BurnBackend
    instance, _ = make_instance(backend_cls, Device("gpu", 0) if case == "GPU instance" else CPU)
    timeout_s = 0.005 if case == "near deadline" else None
    try:
        assert not any([await run(instance, 0, timeout_s=timeout_s) for _ in range(10)])
    finally:
        instance.unload()


# -- end to end: a slow model on the same server --------------------------------------------------------------
FEATURES = 512
LAYERS = 48


def double_plus_one_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["INPUT", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["OUTPUT"]),
        ],
        "fast",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(np.float32([2.0]), "two"), numpy_helper.from_array(np.float32([1.0]), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def matmul_chain_model() -> onnx.ModelProto:
    """``LAYERS`` products with one square matrix (tanh between them): seconds of ONNX Runtime for a large input."""
    weight = (np.random.default_rng(0).standard_normal((FEATURES, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
    nodes, previous = [], "INPUT"
    for layer in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [previous, "weight"], [f"product{layer}"]))
        previous = "OUTPUT" if layer == LAYERS - 1 else f"hidden{layer}"
        nodes.append(helper.make_node("Tanh", [f"product{layer}"], [previous]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", FEATURES])],
        [numpy_helper.from_array(weight, "weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def two_model_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServerProcess, Path]:
    repository = tmp_path_factory.mktemp("inline") / "models"
    single_thread = {"intra_op_thread_count": "1"}
    write_model(
        repository,
        "fast",
        {"backend": "onnxruntime", "max_batch_size": 8, "dynamic_batching": {}, "parameters": single_thread},
        double_plus_one_model(),
    )
    write_model(
        repository,
        "slow",
        {"backend": "onnxruntime", "max_batch_size": 1024, "parameters": single_thread},
        matmul_chain_model(),
    )
    return start_server(repository), repository / "slow" / "1" / "model.onnx"


async def infer(client: InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = await client.infer(model, [tensor])
    output = result.as_numpy("OUTPUT")
    assert output is not None
    return output


@pytest.mark.slow
async def test_a_slow_model_does_not_hold_up_a_cheap_ones_requests(
    two_model_server: tuple[ServerProcess, Path],
) -> None:
    server, slow_file = two_model_server
    rng = np.random.default_rng(1)
    big = rng.standard_normal((1024, FEATURES)).astype(np.float32)
    small = rng.standard_normal((1, 16)).astype(np.float32)
    async with InferenceServerClient(server.grpc_url) as client:
        for _ in range(20):  # the cheap model is measured, and then runs on the loop
            np.testing.assert_allclose(await infer(client, "fast", small), small * 2 + 1)
        expected = ort.InferenceSession(str(slow_file), providers=["CPUExecutionProvider"]).run(None, {"INPUT": big})[0]
        started = time.monotonic()
        np.testing.assert_allclose(await infer(client, "slow", big), expected, rtol=1e-4, atol=1e-5)
        slow_s = time.monotonic() - started

        slow = asyncio.create_task(infer(client, "slow", big))
        await asyncio.sleep(min(0.05, slow_s / 10))  # the slow batch is executing
        latencies = []
        for _ in range(5):
            sent = time.monotonic()
            np.testing.assert_allclose(await infer(client, "fast", small), small * 2 + 1)
            latencies.append(time.monotonic() - sent)
        fast_done = slow.done()
        np.testing.assert_allclose(await slow, expected, rtol=1e-4, atol=1e-5)
    assert not fast_done, f"the cheap model's requests waited for the slow batch ({slow_s:.2f} s)"
    assert max(latencies) < slow_s / 3, (latencies, slow_s)
