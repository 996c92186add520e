"""Triton's ensemble scheduler: runs a pipeline of models (``platform: ensemble``) as one model.

The steps form a graph through the tensors they read and write. A request starts every step whose inputs exist
and each further step as soon as the last of its inputs is produced, so independent branches run concurrently.
Every step is an ordinary request to the step model through the ``ModelCaller`` the repository hands in: it goes
through that model's own scheduler and batcher, so concurrent ensemble requests batch together inside each step
and the step models' statistics count them.

The graph is checked once, when the ensemble loads, against the completed configs of its step models
(``check_ensemble``), so a request never finds a wiring mistake half-way through the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import numpy as np

from server.config import EnsembleStep, ModelConfig, TensorConfig
from server.errors import ConfigError, InvalidInput, ModelDockError, ModelNotReady
from server.extensions.statistics import FailureReason, ModelStats, RequestTiming
from server.protocol.types import InferRequest, InferResponse, RequestedOutput
from server.scheduling.model_calls import ModelCaller
from server.scheduling.scheduler import PendingRequest

# Builds the config error for a step (by its position) from what is wrong with it.
StepProblem = Callable[[int, str], ConfigError]


def _step_label(position: int, step: EnsembleStep) -> str:
    return f"step {position} (model '{step.model_name}')"


def _full_shape(config: ModelConfig, tensor: TensorConfig) -> list[int]:
    return ([-1] if config.batching else []) + list(tensor.dims)


def _shapes_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def check_ensemble(config: ModelConfig, step_configs: Mapping[int, ModelConfig], source: str) -> None:
    """Refuse an ensemble whose graph cannot run: the error names the step and the tensor at fault.

    ``step_configs`` holds the completed config of each step's model, by the step's position; ``source`` names
    the ensemble's config file.
    """
    assert config.ensemble_scheduling is not None
    steps = config.ensemble_scheduling.step

    def fail(position: int, message: str) -> ConfigError:
        field = f"ensemble_scheduling.step[{position}]"
        return ConfigError(f"{source}: field '{field}': {_step_label(position, steps[position])}: {message}")

    if not config.input or not config.output:
        raise ConfigError(f"{source}: field 'input'/'output': an ensemble must declare its inputs and outputs")
    # Every ensemble tensor's producer: the ensemble's own input, or a step's output (position, output config).
    produced_by: dict[str, tuple[int | None, ModelConfig, TensorConfig]] = {
        t.name: (None, config, t) for t in config.input
    }
    for position, step in enumerate(steps):
        model = step_configs[position]
        if config.batching and model.batching and model.max_batch_size < config.max_batch_size:
            raise fail(
                position,
                f"max_batch_size {model.max_batch_size} is smaller than the ensemble's {config.max_batch_size}",
            )
        for output_name, tensor_name in step.output_map.items():
            output = model.output_by_name(output_name)
            if output is None:
                raise fail(position, f"output_map names '{output_name}', which is not an output of the model")
            earlier = produced_by.get(tensor_name)
            if earlier is not None:
                by = "the ensemble's input" if earlier[0] is None else _step_label(earlier[0], steps[earlier[0]])
                raise fail(position, f"tensor '{tensor_name}' is produced twice: here and by {by}")
            produced_by[tensor_name] = (position, model, output)
    consumed: set[str] = set()
    needs: dict[int, set[int]] = {}
    for position, step in enumerate(steps):
        model = step_configs[position]
        needs[position] = set()
        for input_name, tensor_name in step.input_map.items():
            wanted = model.input_by_name(input_name)
            if wanted is None:
                raise fail(position, f"input_map names '{input_name}', which is not an input of the model")
            producer = produced_by.get(tensor_name)
            if producer is None:
                raise fail(position, f"input '{input_name}' reads tensor '{tensor_name}', which nothing produces")
            _check_match(fail, position, tensor_name, producer[1], producer[2], model, wanted)
            consumed.add(tensor_name)
            if producer[0] is not None:
                needs[position].add(producer[0])
        unmapped = [t.name for t in model.input if not t.optional and t.name not in step.input_map]
        if unmapped:
            raise fail(position, f"the model's required input(s) {unmapped} are not in input_map")
    _check_acyclic(steps, needs, fail)
    for output in config.output:
        producer = produced_by.get(output.name)
        if producer is None or producer[0] is None:
            raise ConfigError(f"{source}: field 'output': ensemble output '{output.name}' is produced by no step")
        position = producer[0]
        _check_match(fail, position, output.name, producer[1], producer[2], config, output)
    unused = [t.name for t in config.input if t.name not in consumed]
    if unused:
        raise ConfigError(f"{source}: field 'input': ensemble input(s) {unused} are read by no step")


def _check_match(
    fail: StepProblem,
    position: int,
    tensor_name: str,
    producer_model: ModelConfig,
    produced: TensorConfig,
    consumer_model: ModelConfig,
    wanted: TensorConfig,
) -> None:
    """The producer's datatype and shape (batch dimension included) must be what the consumer accepts."""
    if produced.data_type != wanted.data_type:
        raise fail(
            position,
            f"tensor '{tensor_name}' is {produced.data_type} where it is produced but {wanted.data_type} where it "
            "is read",
        )
    produced_shape = _full_shape(producer_model, produced)
    wanted_shape = _full_shape(consumer_model, wanted)
    if not _shapes_agree(produced_shape, wanted_shape):
        raise fail(
            position,
            f"tensor '{tensor_name}' has shape {produced_shape} where it is produced but {wanted_shape} where it is "
            "read",
        )


def _check_acyclic(steps: list[EnsembleStep], needs: dict[int, set[int]], fail: StepProblem) -> None:
    """Kahn's algorithm: the steps left over once nothing more can start wait on each other."""
    remaining = {p: set(n) for p, n in needs.items()}
    while True:
        ready = [p for p, n in remaining.items() if not n]
        if not ready:
            break
        for position in ready:
            del remaining[position]
        for waiting in remaining.values():
            waiting.difference_update(ready)
    # Steps that only wait on a cycle without being part of it are dropped too, so the error names the cycle.
    while True:
        needed = set().union(*remaining.values()) if remaining else set()
        downstream = [p for p in remaining if p not in needed]
        if not downstream:
            break
        for position in downstream:
            del remaining[position]
    if remaining:
        first = min(remaining)
        cycle = ", ".join(_step_label(p, steps[p]) for p in sorted(remaining))
        raise fail(first, f"the steps form a cycle through their tensors: {cycle}")


class EnsembleScheduler:
    """Runs each accepted request through the step graph; has no instances of its own.

    It offers what ``ServedVersion`` uses of a ``Scheduler`` (``submit``, ``cancel``, ``close``, ``stats``).
    """

    def __init__(self, config: ModelConfig, version: str, call: ModelCaller, stats: ModelStats | None = None) -> None:
        assert config.ensemble_scheduling is not None
        self.config = config
        self.version = version
        self.steps = config.ensemble_scheduling.step
        self.stats = stats if stats is not None else ModelStats(config.name, version)
        self._call = call
        self._closed = False
        self._running: dict[PendingRequest, asyncio.Task[None]] = {}

    def submit(self, request: InferRequest) -> PendingRequest:
        if self._closed:
            raise ModelNotReady(f"model '{self.config.name}' version {self.version} is unloading")
        pending = PendingRequest(request)
        task = asyncio.ensure_future(self._serve(pending))
        self._running[pending] = task
        task.add_done_callback(lambda _: self._running.pop(pending, None))
        return pending

    def cancel(self, pending: PendingRequest) -> None:
        """The client left: stop the pipeline; its step requests are withdrawn from their models' queues."""
        if pending.done:
            return
        pending.cancel()
        task = self._running.get(pending)
        if task is not None:
            task.cancel()
        self.stats.record_failure([pending.arrival_ns], FailureReason.CANCELED)

    async def close(self) -> None:
        self._closed = True
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _serve(self, pending: PendingRequest) -> None:
        try:
            response = await self.run(pending.request)
        except ModelDockError as exc:
            if not pending.done:
                pending.fail(exc)
                reason = FailureReason.OTHER if isinstance(exc, InvalidInput) else FailureReason.BACKEND
                self.stats.record_failure([pending.arrival_ns], reason)
            return
        if pending.done:
            return
        pending.send(response)
        rows = pending.rows if self.config.batching else 1
        # The ensemble has no queue of its own: its whole time is the pipeline's time, counted as compute.
        start, end = pending.arrival_ns, time.monotonic_ns()
        self.stats.record_batch([RequestTiming(pending.arrival_ns, rows)], start, start, end, end)

    async def run(self, request: InferRequest) -> InferResponse:
        """Run the step graph for one request and gather the ensemble outputs it asked for."""
        tensors: dict[str, np.ndarray] = dict(request.inputs)
        waiting = {position: set(step.input_map.values()) for position, step in enumerate(self.steps)}
        running: dict[asyncio.Task[InferResponse], int] = {}

        def start_ready() -> None:
            for position in [p for p, needed in waiting.items() if needed <= tensors.keys()]:
                del waiting[position]
                task = asyncio.ensure_future(self._call(self._step_request(request, position, tensors)))
                running[task] = position

        start_ready()
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    position = running.pop(task)
                    step = self.steps[position]
                    try:
                        response = task.result()
                    except ModelDockError as exc:
                        raise type(exc)(
                            f"ensemble '{self.config.name}' {_step_label(position, step)}: {exc.message}"
                        ) from None
                    for output_name, tensor_name in step.output_map.items():
                        tensors[tensor_name] = response.outputs[output_name]
                start_ready()
        finally:
            for task in running:
                task.cancel()
        if waiting:
            position = min(waiting)
            missing = sorted(waiting[position] - tensors.keys())
            raise InvalidInput(
                f"ensemble '{self.config.name}' {_step_label(position, self.steps[position])} cannot run: "
                f"tensor(s) {missing} were not given"
            )
        wanted = [o.name for o in request.outputs] or [t.name for t in self.config.output]
        return InferResponse(
            model_name=self.config.name,
            model_version=self.version,
            id=request.id,
            outputs={name: tensors[name] for name in wanted},
        )

    def _step_request(self, request: InferRequest, position: int, tensors: Mapping[str, np.ndarray]) -> InferRequest:
        step = self.steps[position]
        return InferRequest(
            model_name=step.model_name,
            model_version="" if step.model_version == -1 else str(step.model_version),
            id=request.id,
            inputs={input_name: tensors[tensor_name] for input_name, tensor_name in step.input_map.items()},
            outputs=[RequestedOutput(name) for name in step.output_map],
            # Priority and timeout apply to the whole pipeline, so each step's request carries them.
            parameters={k: v for k, v in request.parameters.items() if k in ("priority", "timeout")},
        )
