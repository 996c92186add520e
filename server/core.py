"""The server as the front ends see it: one object answering every protocol question.

HTTP and gRPC both call into ``InferenceServer`` and only translate to and from their wire formats, so health,
metadata, inference and repository control behave identically on both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from enum import Enum
from typing import Any

from server import __version__
from server.admission import Admission
from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, ModelNotReady, NotAllowed, VersionRetired
from server.extensions.diffusion_metrics import DenoisingCollector
from server.extensions.log_settings import REQUEST_ID, ServerLogging
from server.extensions.metrics import ServerMetrics
from server.extensions.tracing import RequestTracing
from server.protocol.generation import GenerateRequest, GenerationOutput
from server.protocol.shared_memory import SharedMemoryRegistry
from server.protocol.types import InferRequest, InferResponse
from server.repository.model_manager import ModelManager, ServedVersion
from server.scheduling.deadlines import request_deadline, timed_out_message
from server.scheduling.validation import expected_shape

SERVER_NAME = "modeldock"
EXTENSIONS = [
    "classification",
    "generate",
    "binary_tensor_data",
    "logging",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "system_shared_memory",
    "trace",
]


class ModelControlMode(str, Enum):
    """Triton's ``--model-control-mode``: who decides what is loaded."""

    NONE = "none"  # everything at start-up, then nothing changes
    POLL = "poll"  # the repository folders: models follow what is on disk
    EXPLICIT = "explicit"  # clients, through the repository API (and --load-model at start-up)


class InferenceServer:
    def __init__(
        self,
        models: ModelManager,
        control_mode: ModelControlMode = ModelControlMode.EXPLICIT,
        server_logging: ServerLogging | None = None,
        tracing: RequestTracing | None = None,
    ) -> None:
        self.models = models
        self.control_mode = control_mode
        self.logging = server_logging or ServerLogging()
        self.tracing = tracing or RequestTracing()
        self.metrics = ServerMetrics(models.statistics)
        # Image-generation models time their denoising steps in the backend, below the statistics' reach.
        self.metrics.registry.register(DenoisingCollector())
        # Regions clients registered; the codecs resolve tensors' shared memory parameters against it.
        self.shared_memory = SharedMemoryRegistry()
        self.live = True
        # Set once the start-up load of the repository has finished.
        self.started = False
        # ``--request-timeout-secs``: the longest any inference request may take (0: no server-wide bound).
        self.request_timeout_s = 0.0
        # Closed when a shutdown begins: readiness turns false and new inferences are refused while old ones finish.
        self.admission = Admission()

    # -- health -------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Ready once the start-up load is done. Broken models, and models loaded later by polling or the repository
        API, do not hold it back: a serving replica must not drop out of its load balancer because a new model
        appeared beside the ones it serves (each model's own readiness says whether that model can serve)."""
        return self.live and self.started and self.admission.open

    # -- logging ------------------------------------------------------------------------------------------
    def log_settings(self) -> dict[str, Any]:
        return self.logging.current()

    def update_log_settings(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        return self.logging.update(changes)

    # -- tracing ------------------------------------------------------------------------------------------
    def trace_settings(self, model: str = "") -> dict[str, Any]:
        if model:
            self.model_ready(model)  # an unknown model is refused by name
        return self.tracing.settings(model)

    def update_trace_settings(self, changes: Mapping[str, Any], model: str = "") -> dict[str, Any]:
        if model:
            self.model_ready(model)
        return self.tracing.update(changes, model)

    # -- metadata -----------------------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        served = self.models.get(name, version)
        record = self.models.record(name)
        config = served.config
        versions = sorted((str(v) for v, e in record.versions.items() if e.served is not None), key=int)
        return {
            "name": name,
            "versions": versions,
            "platform": config.platform or config.backend,
            "inputs": [
                {"name": t.name, "datatype": t.wire_datatype, "shape": expected_shape(config, t)} for t in config.input
            ],
            "outputs": [
                {"name": t.name, "datatype": t.wire_datatype, "shape": expected_shape(config, t)} for t in config.output
            ],
        }

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return self.models.get(name, version).config.to_json()

    def model_ready(self, name: str, version: str = "") -> bool:
        if name not in self.models.records and self.models.repository.locate(name) is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return self.admission.open and self.models.is_ready(name, version)

    def decoupled(self, name: str, version: str = "") -> bool:
        """Whether the model may answer a request with other than exactly one response (its
        ``model_transaction_policy``): a stream front end answers any other model's requests through ``infer``,
        one coroutine instead of ``stream_infer``'s chain of async generators."""
        return self.models.get(name, version).config.model_transaction_policy.decoupled

    # -- inference ----------------------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        # The admission is held with enter/leave, not its context manager: this is every request's path.
        admission = self.admission
        admission.enter()
        try:
            if self.logging.json:
                REQUEST_ID.set(request.id or uuid.uuid4().hex)
            span = self.tracing.start(request) if self.tracing.active else None
            if span is None:
                return await self._bounded_infer(request)
            try:
                response = await self._bounded_infer(request)
            except BaseException as exc:
                self.tracing.finish(request, span, exc)
                raise
            self.tracing.finish(request, span)
            return response
        finally:
            admission.leave()

    async def _bounded_infer(self, request: InferRequest) -> InferResponse:
        served = self.models.get(request.model_name, request.model_version)
        timeout_s = request_deadline(request, self.request_timeout_s, served.config)
        if timeout_s is None:
            return await self._infer(request, served)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._infer(request, served)
        except TimeoutError:
            raise DeadlineExceeded(timed_out_message(request, timeout_s)) from None

    async def _infer(self, request: InferRequest, served: ServedVersion) -> InferResponse:
        try:
            return await served.infer(request)
        except VersionRetired:
            # Not accepted by the replaced version, so running it on its replacement cannot run it twice.
            return await self.models.get(request.model_name, request.model_version).infer(request)

    async def stream_infer(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        with self.admission.admit():
            if self.logging.json:
                REQUEST_ID.set(request.id or uuid.uuid4().hex)
            span = self.tracing.start(request) if self.tracing.active else None
            if span is None:
                async for response in self._bounded_stream(request):
                    yield response
                return
            error: BaseException | None = None
            try:
                async for response in self._bounded_stream(request):
                    yield response
            except GeneratorExit:  # the caller stopped reading: not a failure of the request
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.tracing.finish(request, span, error)

    async def _bounded_stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        config = self.models.get(request.model_name, request.model_version).config
        timeout_s = request_deadline(request, self.request_timeout_s, config)
        if timeout_s is None:
            async for response in self._stream_infer(request):
                yield response
            return
        try:
            async with asyncio.timeout(timeout_s):
                async for response in self._stream_infer(request):
                    yield response
        except TimeoutError:
            raise DeadlineExceeded(timed_out_message(request, timeout_s)) from None

    async def _stream_infer(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        stream = self.models.get(request.model_name, request.model_version).stream(request)
        try:
            try:
                first = await anext(stream)
            except VersionRetired:
                stream = self.models.get(request.model_name, request.model_version).stream(request)
                first = await anext(stream)
        except StopAsyncIteration:
            return
        yield first
        async for response in stream:
            yield response

    async def generate(self, name: str, version: str, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        """Text generation on a causal language model: chunks of new text as the engine produces them.

        ``name`` may also be a LoRA adapter its engine serves (``model:adapter`` or the adapter's own name), which
        the request then names."""
        name, adapter = self.models.adapter_target(name)
        if adapter is not None:
            request.adapter = adapter
        with self.admission.admit():
            stream = self.models.get(name, version).generate(request)
            try:
                try:
                    first = await anext(stream)
                except VersionRetired:
                    stream = self.models.get(name, version).generate(request)
                    first = await anext(stream)
            except StopAsyncIteration:
                return
            yield first
            async for output in stream:
                yield output

    def language_model(self, name: str, version: str = "") -> tuple[Any, int]:
        """A ready language model's tokenizer and the most tokens (prompt and output) it attends over, for the
        routes that tokenize without generating (``/v1/tokenize``)."""
        served = self.models.get(self.models.adapter_target(name)[0], version)
        backend = getattr(served.pool.instances[0], "backend", None) if served.pool and served.pool.instances else None
        tokenizer = getattr(backend, "tokenizer", None)
        if tokenizer is None:
            raise InvalidInput(f"model '{name}' has no tokenizer (it is not a language model)")
        engines = getattr(served.scheduler, "engines", None) or []
        limits = getattr(engines[0], "limits", None) if engines else None
        max_model_len = limits.max_model_len if limits is not None else int(getattr(backend, "max_model_len", 0))
        return tokenizer, max_model_len

    def model_parameters(self, name: str, version: str = "") -> dict[str, str]:
        """A ready model's ``parameters`` (its tool-call and reasoning parsers, say), a LoRA adapter's being its
        base model's."""
        return dict(self.models.get(self.models.adapter_target(name)[0], version).config.parameters)

    def model_task(self, name: str, version: str = "") -> str:
        """``generate`` or ``embed`` for a ready language model (or a LoRA adapter one serves), "" for any other
        ready model."""
        return self.models.get(self.models.adapter_target(name)[0], version).task

    def adapter_models(self) -> list[str]:
        """The names LoRA adapters are served under, as models of their own (``model:adapter`` and ``adapter``)."""
        return self.models.adapter_models()

    # -- statistics ---------------------------------------------------------------------------------------
    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics JSON for every loaded version of one model (or of all models when ``name`` is "")."""
        if version and not name:
            raise InvalidInput("a model version was given without a model name")
        if name:
            record = self.models.record(name)
            if version:
                self.models.get(name, version)
            versions = [(name, str(v)) for v, e in sorted(record.versions.items()) if e.served is not None]
            if not versions:
                raise ModelNotReady(f"model '{name}' is not loaded")
            if version:
                versions = [(name, version)]
        else:
            versions = [
                (n, str(v))
                for n, record in sorted(self.models.records.items())
                for v, e in sorted(record.versions.items())
                if e.served is not None
            ]
        statistics = self.models.statistics
        return {"model_stats": [statistics.for_version(n, v).to_json() for n, v in versions]}

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this server's metrics (``GET /metrics``)."""
        return self.metrics.exposition()

    # -- repository ---------------------------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.models.index(ready_only)

    def _check_explicit(self, action: str) -> None:
        if self.control_mode != ModelControlMode.EXPLICIT:
            raise NotAllowed(
                f"explicit model {action} is not allowed in model control mode '{self.control_mode.value}'; "
                "start the server with --model-control-mode explicit"
            )

    async def load_model(
        self, name: str, config_override: dict[str, Any] | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        self._check_explicit("load")
        await self.models.load(name, config_override, files)

    async def unload_model(self, name: str) -> None:
        self._check_explicit("unload")
        await self.models.unload(name)
