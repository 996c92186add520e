"""The generation engine behind the KServe infer path, with Triton's LLM tensor convention.

A request carries ``text_input`` (BYTES), optionally ``stream`` (BOOL), ``sampling_parameters`` (BYTES, JSON) and
``exclude_input_in_output`` (BOOL); sampling fields may also come as request parameters, as Triton's vLLM backend
takes them. With ``stream`` true each chunk is one response (decoupled: the last one is marked final); otherwise
one response carries the whole text, the prompt first unless ``exclude_input_in_output`` is set. Every field of
``SamplingParams`` travels in ``sampling_parameters`` (``structured_outputs``, ``logit_bias``, ``min_tokens``...),
except log-probabilities, which this text-only convention cannot carry and so refuses.

Each model instance gets its own engine; a request goes to the engine holding the fewest sequences.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson

from backends.base import EngineBackend, GenerativeBackend
from server.config import ModelConfig
from server.errors import InvalidInput, ModelDockError, ModelNotReady, QueueFull
from server.extensions.generation_metrics import GenerationStats
from server.extensions.statistics import FailureReason, ModelStats, RequestTiming
from server.protocol.generation import GenerateRequest, GenerationOutput, SamplingParams
from server.protocol.types import InferRequest, InferResponse
from server.scheduling.generation.engine import EngineLimits, GenerationEngine
from server.scheduling.instances import InstancePool
from server.scheduling.scheduler import PendingRequest, Scheduler

# Request parameters that are protocol controls, not sampling options.
_PROTOCOL_PARAMETERS = {"priority", "timeout", "binary_data_output", "triton_enable_empty_final_response"}


class GenerationScheduler(Scheduler):
    def __init__(self, config: ModelConfig, version: str, pool: InstancePool, stats: ModelStats | None = None) -> None:
        super().__init__(config, version, pool, stats)
        self.stats.generation = GenerationStats()
        # ModelDock's own engine drives a step-level backend; a library with its own loop is its own engine.
        self.engines: list[GenerationEngine | EngineBackend] = []
        for instance in pool.instances:
            backend = instance.backend
            if isinstance(backend, EngineBackend):
                backend.stats = self.stats.generation
                self.engines.append(backend)
                continue
            if not isinstance(backend, GenerativeBackend):
                raise InvalidInput(f"model '{config.name}': backend {type(backend).__name__} does not generate text")
            limits = EngineLimits.from_config(config, backend)
            self.engines.append(GenerationEngine(config.name, backend, limits, self.stats.generation))
        self._tasks: dict[PendingRequest, asyncio.Task[None]] = {}
        self._started: set[PendingRequest] = set()
        # Streams of the generate and OpenAI routes still open: an unload lets them finish first.
        self._open_streams = 0
        self._no_open_streams = asyncio.Event()
        self._no_open_streams.set()

    # -- the generate extension and the OpenAI routes -------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        if self._closed:
            raise ModelNotReady(f"model '{self.config.name}' version {self.version} is unloading")
        engine = min(self.engines, key=lambda e: e.load)
        start = time.monotonic_ns()
        finished = False
        self._open_streams += 1
        self._no_open_streams.clear()
        try:
            async for output in engine.generate(request):
                finished = output.finished
                yield output
        except ModelDockError as exc:
            # An engine that refused the request (overloaded) rejected it, as a full queue does; Triton's reason.
            reason = FailureReason.REJECTED if isinstance(exc, QueueFull) else FailureReason.BACKEND
            self.stats.record_failure([start], reason)
            raise
        finally:
            self._open_streams -= 1
            if not self._open_streams:
                self._no_open_streams.set()
            if finished:
                now = time.monotonic_ns()
                self.stats.record_batch([RequestTiming(start, 1)], start, start, now, now)

    # -- the KServe infer path ------------------------------------------------------------------------------------
    def enqueue(self, pending: PendingRequest) -> None:
        request = pending.request
        prompt, stream, exclude_input, sampling = parse_infer_request(request)
        generate = GenerateRequest(request_id=request.id or uuid.uuid4().hex, prompt=prompt, sampling=sampling)
        task = asyncio.ensure_future(self._serve(pending, generate, stream, exclude_input))
        self._tasks[pending] = task
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _withdraw(self, pending: PendingRequest) -> bool:
        task = self._tasks.pop(pending, None)
        if task is None or task.done():
            return False
        task.cancel()  # closes the engine stream, which aborts the sequence
        # Only a request whose task never started still counts as queued.
        return pending not in self._started

    async def _serve(self, pending: PendingRequest, request: GenerateRequest, stream: bool, exclude: bool) -> None:
        self._started.add(pending)
        self.stats.dequeued()
        pieces: list[str] = [] if exclude or stream else [request.prompt or ""]
        try:
            async for output in self.generate(request):
                if stream:
                    if output.text or output.finished:
                        pending.send(self._response(pending.request, output.text, output.finished))
                else:
                    pieces.append(output.text)
            if not stream:
                pending.send(self._response(pending.request, "".join(pieces), True))
        except ModelDockError as exc:
            pending.fail(exc)
        finally:
            self._tasks.pop(pending, None)
            self._started.discard(pending)

    def _response(self, request: InferRequest, text: str, final: bool) -> InferResponse:
        return InferResponse(
            model_name=self.config.name,
            model_version=self.version,
            id=request.id,
            outputs={"text_output": np.array([text.encode()], dtype=object)},
            final=final,
        )

    async def close(self) -> None:
        self._closed = True
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        await self._no_open_streams.wait()
        await asyncio.to_thread(lambda: [engine.stop() for engine in self.engines])


def _scalar(request: InferRequest, name: str) -> Any:
    array = request.inputs.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInput(f"input '{name}' must hold one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{name}' is not valid UTF-8") from None
    return str(value)


def parse_infer_request(request: InferRequest) -> tuple[str, bool, bool, SamplingParams]:
    """``(prompt, stream, exclude_input_in_output, sampling)`` from Triton's LLM inputs and request parameters."""
    prompt = _scalar(request, "text_input")
    if prompt is None:
        raise InvalidInput("input 'text_input' is required")
    stream = bool(_scalar(request, "stream") or False)
    exclude = bool(_scalar(request, "exclude_input_in_output") or False)
    sampling: dict[str, Any] = {k: v for k, v in request.parameters.items() if k not in _PROTOCOL_PARAMETERS}
    raw = _scalar(request, "sampling_parameters")
    if raw is not None:
        try:
            decoded = orjson.loads(_text(raw, "sampling_parameters") or "{}")
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"input 'sampling_parameters' is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise InvalidInput("input 'sampling_parameters' must be a JSON object")
        sampling.update(decoded)
    params = SamplingParams.parse(sampling, "sampling_parameters")
    # Triton's LLM convention has no place for log-probabilities in ``text_output``: refused, not dropped.
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None:
            raise InvalidInput(
                f"sampling_parameters: field '{name}': the generate extension and infer return text only; "
                "ask /v1/completions or /v1/chat/completions for log-probabilities"
            )
    return _text(prompt, "text_input"), stream, exclude, params
