"""Loads, serves and unloads models, tracking each version's state for the repository index.

A load builds the new versions completely (config, auto-complete, every instance) before they replace the old
ones, and old versions drain their accepted requests before they are released, so a reload never drops a
request and a failed load leaves what was serving in place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from backends.base import Backend, EngineBackend, GenerativeBackend, backend_class
from server.config import CONFIG_FILENAME, ModelConfig, load_model_config, parse_model_config
from server.errors import (
    ConfigError,
    InvalidInput,
    ModelDockError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    VersionRetired,
)
from server.extensions import classification
from server.extensions.statistics import FailureReason, ModelStats, StatisticsRegistry
from server.protocol.generation import GenerateRequest, GenerationOutput
from server.protocol.types import InferRequest, InferResponse
from server.repository.discovery import ModelRepository, guess_backend, no_versions_reason, version_dirs
from server.repository.ensembles import check_steps_ready, gather_ensembles_last, prepare_ensemble
from server.repository.uploads import discard_staged, stage_model_files
from server.repository.warmup import create_warm_instances
from server.scheduling.dynamic_batcher import DynamicBatcher
from server.scheduling.ensemble_scheduler import EnsembleScheduler
from server.scheduling.instances import InstancePool, ModelInstance
from server.scheduling.response_cache import ResponseCache, VersionCache
from server.scheduling.scheduler import DirectScheduler, Scheduler
from server.scheduling.sequence_batcher import SequenceBatcher
from server.scheduling.validation import validate_request

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


class ServedVersion:
    """One loaded version: its instances and the scheduler in front of them (an ensemble has no instances: its
    scheduler runs other models), with the response cache in front of that when the model enables it."""

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        backend_cls: type[Backend] | None,
        pool: InstancePool | None,
        model_dir: Path,
        stats: ModelStats | None = None,
        labels: dict[str, list[str]] | None = None,
        scheduler: Scheduler | EnsembleScheduler | None = None,
        cache: VersionCache | None = None,
    ) -> None:
        self.config = config
        self.version = version
        self.backend_cls = backend_cls
        self.pool = pool
        # The folder it was loaded from: a folder staged from uploaded files is kept while a version uses it.
        self.model_dir = model_dir
        self.labels = labels or {}
        if scheduler is None:
            assert pool is not None
            scheduler = make_scheduler(config, str(version), pool, stats, model_dir)
        self.scheduler = scheduler
        self.cache = cache
        # The backend's mapping of request parameters to inputs, for the few backends that have one.
        self.apply_request_parameters = (
            backend_cls.apply_request_parameters
            if backend_cls is not None and backend_cls.reads_request_parameters
            else None
        )
        # Set when a reload has swapped in a replacement, so a request that picked this version just before the
        # swap is resubmitted to the replacement instead of failing.
        self.retired = False

    def _admit(self, request: InferRequest) -> None:
        try:
            if self.apply_request_parameters is not None and request.parameters:
                self.apply_request_parameters(self.config, request)
            validate_request(self.config, request)
        except InvalidInput:
            # Counted as a failed inference (reason OTHER), so a client sending bad tensors shows on the dashboards.
            self.scheduler.stats.record_failure([time.monotonic_ns()], FailureReason.OTHER)
            raise
        if self.retired:
            raise VersionRetired(f"model '{self.config.name}' version {self.version} was replaced by a reload")

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        self._admit(request)
        classifies = any(classification.PARAMETER in o.parameters for o in request.outputs)
        lookup = self.cache.lookup(request) if self.cache is not None else None
        if lookup is not None and lookup.response is not None:
            if classifies:
                classification.classify_response(self.config, request, lookup.response, self.labels)
            yield lookup.response
            return
        pending = self.scheduler.submit(request)
        try:
            async for response in pending.responses():
                if lookup is not None and self.cache is not None and response.final:
                    self.cache.store(lookup, response)
                if classifies:
                    classification.classify_response(self.config, request, response, self.labels)
                yield response
        finally:
            # Reached unanswered only when the caller stopped waiting (cancelled, disconnected).
            self.scheduler.cancel(pending)

    @property
    def task(self) -> str:
        """``generate`` or ``embed`` for language models (``parameters.task``, filled in by their backend); else ""."""
        return self.config.parameters.get("task", "")

    @property
    def engine_backend(self) -> EngineBackend | None:
        """The backend of a version served by a library's own engine (vLLM, llama.cpp), else None."""
        backend = getattr(self.pool.instances[0], "backend", None) if self.pool is not None else None
        return backend if isinstance(backend, EngineBackend) else None

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters its engine serves (``backend: vllm``); each is also served as a model of its own."""
        return list(getattr(self.engine_backend, "adapters", ()))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        generate = getattr(self.scheduler, "generate", None)
        if generate is None:
            raise InvalidInput(f"model '{self.config.name}' does not generate text (it is not a causal language model)")
        if self.retired:
            raise VersionRetired(f"model '{self.config.name}' version {self.version} was replaced by a reload")
        async for output in generate(request):
            yield output

    async def infer(self, request: InferRequest) -> InferResponse:
        """The request's last response. Without a cache this is ``stream`` without an async generator: the
        per-request path of unary calls."""
        last: InferResponse | None = None
        if self.cache is not None:
            async for response in self.stream(request):
                last = response
        else:
            self._admit(request)
            pending = self.scheduler.submit(request)
            try:
                last = await pending.last_response()
            finally:
                # Reached unanswered only when the caller stopped waiting (cancelled, disconnected).
                self.scheduler.cancel(pending)
            if last is not None:
                for output in request.outputs:  # a loop, not any(): no generator on every request's path
                    if classification.PARAMETER in output.parameters:
                        classification.classify_response(self.config, request, last, self.labels)
                        break
        if last is None:
            raise ModelNotReady(f"model '{self.config.name}' returned no response")
        return last

    async def close(self) -> None:
        if self.cache is not None:
            self.cache.drop()
        await self.scheduler.close()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.unload)


def generates(pool: InstancePool) -> bool:
    """Whether a version's instances generate text (its scheduler is then the generation engine)."""
    backend = getattr(pool.instances[0], "backend", None)
    return isinstance(backend, (GenerativeBackend, EngineBackend)) and backend.generates


def make_scheduler(
    config: ModelConfig,
    version: str,
    pool: InstancePool,
    stats: ModelStats | None = None,
    model_dir: Path | None = None,
) -> Scheduler:
    """Triton's choice: the sequence batcher for stateful models, the dynamic batcher when the model batches and
    asks for it, else one request per run. ``model_dir`` is where a sequence model's initial state files live.

    A generating language model gets the generation engine instead, which batches at every token step.
    """
    if generates(pool):
        from server.scheduling.generation.scheduler import GenerationScheduler  # needs torch: only when used

        return GenerationScheduler(config, version, pool, stats)
    if config.sequence_batching is not None:
        return SequenceBatcher(config, version, pool, stats, model_dir)
    if config.batching and config.dynamic_batching is not None:
        return DynamicBatcher(config, version, pool, stats)
    return DirectScheduler(config, version, pool, stats)


@dataclass
class VersionRecord:
    version: int
    state: ModelState
    reason: str = ""
    served: ServedVersion | None = None


@dataclass
class ModelRecord:
    name: str
    path: Path | None
    config: ModelConfig | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    # A failure that concerns the whole model (bad config, no versions), shown with an empty version.
    reason: str = ""
    state: ModelState = ModelState.UNAVAILABLE


class ModelManager:
    def __init__(self, repository: ModelRepository, response_cache: ResponseCache | None = None) -> None:
        self.repository = repository
        # The server-wide response cache (``--cache-config``); models use it only when their config enables it.
        self.response_cache = response_cache
        self.records: dict[str, ModelRecord] = {}
        self.statistics = StatisticsRegistry()
        self._locks: dict[str, asyncio.Lock] = {}
        # Folders staged from files sent with load requests, per model, kept while a loaded version uses them.
        self._uploads: dict[str, list[Path]] = {}

    def model_lock(self, name: str) -> asyncio.Lock:
        """Held while the model loads or unloads."""
        return self._locks.setdefault(name, asyncio.Lock())

    async def load_all(self) -> None:
        found, problems = self.repository.scan()
        for name, reason in problems.items():
            log.error("repository: %s", reason)
            if name in found or "/" not in name:
                self.records[name] = ModelRecord(name, None, reason=reason)
        names = [name for name in found if name not in problems]
        await gather_ensembles_last(self, names, {name: found[name].path for name in names})

    async def load(
        self, name: str, config_override: dict[str, Any] | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        """Load (or reload) a model from its repository folder, or from ``files`` sent with the request.

        Raises ``ModelLoadError`` if nothing new could be served; what was serving then keeps serving. A name
        ``model:adapter`` that is not in the repository loads a LoRA adapter into the loaded model's engine instead
        (see ``load_adapter``).
        """
        target = self._adapter_name(name)
        if target is not None:
            await self.load_adapter(*target, config_override)
            return
        async with self.model_lock(name):
            if files:
                if config_override is None:
                    raise InvalidInput(f"model '{name}': files sent with a load request need a 'config' parameter")
                model_dir = await asyncio.to_thread(stage_model_files, name, files)
                self._uploads.setdefault(name, []).append(model_dir)
            else:
                location = self.repository.locate(name)
                if location is None:
                    raise ModelNotFound(f"model '{name}' is not in the model repository")
                model_dir = location.path
            try:
                await self._load_from(name, model_dir, config_override)
            finally:
                self._discard_unused_uploads(name)

    def _discard_unused_uploads(self, name: str) -> None:
        """Delete staged folders no loaded version of the model runs from (a reload or unload replaced them)."""
        record = self.records.get(name)
        in_use = {e.served.model_dir for e in record.versions.values() if e.served} if record else set()
        staged = self._uploads.pop(name, [])
        for model_dir in staged:
            if model_dir in in_use:
                self._uploads.setdefault(name, []).append(model_dir)
            else:
                discard_staged(model_dir)

    async def _load_from(self, name: str, model_dir: Path, config_override: dict[str, Any] | None) -> None:
        started = time.monotonic()
        record = self.records.setdefault(name, ModelRecord(name, model_dir))
        record.path = model_dir
        if not record.versions or all(v.state != ModelState.READY for v in record.versions.values()):
            record.state = ModelState.LOADING
        try:
            config, backend_cls, selected = await asyncio.to_thread(prepare_model, model_dir, config_override)
            labels = await asyncio.to_thread(classification.load_labels, config, model_dir)
            if config.is_ensemble:
                await prepare_ensemble(self, config, model_dir)
        except ModelDockError as exc:
            self._fail(record, str(exc))
            raise
        except Exception as exc:  # a backend's auto-complete bug: a failed load, not a crashed watcher
            log.exception("model '%s': preparing the load failed", name)
            error = ModelLoadError(f"model '{name}' failed to load: {type(exc).__name__}: {exc}")
            self._fail(record, error.message)
            raise error from None
        new: dict[int, ServedVersion] = {}
        failures: dict[int, str] = {}
        for version, version_dir in selected.items():
            stats = self.statistics.for_version(name, str(version))
            cache = self._version_cache(config, version, stats)
            if backend_cls is None:
                scheduler = EnsembleScheduler(config, str(version), self.call_model, stats)
                new[version] = ServedVersion(config, version, None, None, model_dir, stats, labels, scheduler, cache)
                continue
            try:
                instances = await _load_version(config, version_dir, backend_cls)
            except ModelDockError as exc:
                failures[version] = exc.message
                continue
            except Exception as exc:  # backend bug while loading: report it, keep serving the rest
                log.exception("model '%s' version %d failed to load", name, version)
                failures[version] = f"{type(exc).__name__}: {exc}"
                continue
            for instance in instances:
                instance.model_caller = functools.partial(self.call_model, caller=instance)
            pool = InstancePool(instances)
            try:
                scheduler = None
                if generates(pool):
                    # Its engines allocate the KV cache (and on a GPU capture CUDA graphs) as they start: seconds
                    # of work that must not hold up the event loop.
                    scheduler = await asyncio.to_thread(make_scheduler, config, str(version), pool, stats, model_dir)
                new[version] = ServedVersion(
                    config, version, backend_cls, pool, model_dir, stats, labels, scheduler, cache
                )
            except ModelDockError as exc:  # the scheduler refused the config (engine limits, initial state files)
                await asyncio.to_thread(pool.unload)
                failures[version] = exc.message

        if not new:
            reason = "; ".join(f"version {v}: {r}" for v, r in failures.items()) or "no version loaded"
            self._fail(record, reason)
            raise ModelLoadError(f"model '{name}' failed to load: {reason}")

        previous = record.versions
        record.config = config
        record.reason = ""
        record.state = ModelState.READY
        record.versions = {v: VersionRecord(v, ModelState.READY, served=s) for v, s in new.items()}
        for version, reason in failures.items():
            log.error("model '%s' version %d: %s", name, version, reason)
            kept = previous.get(version)
            if kept is not None and kept.state == ModelState.READY and kept.served is not None:
                # The same version number failed to reload: its previous load keeps serving.
                kept.reason = f"reload failed, still serving the previous load: {reason}"
                record.versions[version] = kept
            else:
                record.versions[version] = VersionRecord(version, ModelState.UNAVAILABLE, reason)
        old = {v: r.served for v, r in previous.items() if r.served is not None and record.versions.get(v) is not r}
        for served in old.values():
            served.retired = True
        # The load's duration tells which model holds up a server's start (time-to-READY is the slowest load's).
        log.info("model '%s' ready (versions %s) after %.1f s", name, sorted(new), time.monotonic() - started)
        await asyncio.gather(*(served.close() for served in old.values()))
        for version in old:
            kept = record.versions.get(version)
            if kept is None or kept.served is None:
                self.statistics.discard(name, str(version))

    def _version_cache(self, config: ModelConfig, version: int, stats: ModelStats) -> VersionCache | None:
        if not config.cacheable:
            return None
        if self.response_cache is None:
            log.info(
                "model '%s' enables response_cache but the server has no cache (start it with --cache-config "
                "local,size=<bytes>); its responses are not cached",
                config.name,
            )
            return None
        return self.response_cache.for_version(config.name, str(version), stats)

    async def call_model(self, request: InferRequest, caller: ModelInstance | None = None) -> InferResponse:
        """Run a request from inside the server (an ensemble step, a Python model's call) as a client's would run.

        ``caller`` is the instance whose model made the call. A model may call itself, but every instance of it
        that waits on such a call holds an instance the call needs: once all of them wait, none ever will be
        free, so the call that would complete that circle fails at once instead of waiting forever.
        """
        served = self.get(request.model_name, request.model_version)
        calls_itself = caller is not None and served.pool is not None and caller in served.pool.instances
        if calls_itself:
            assert caller is not None and served.pool is not None
            if all(instance.self_calls for instance in served.pool.instances if instance is not caller):
                raise ModelNotReady(
                    f"model '{served.config.name}' version {served.version} calls itself while each of its "
                    f"{len(served.pool.instances)} instance(s) is busy waiting on such a call, so the call could "
                    "never run; give the model more instances (instance_group count) than the depth of its calls "
                    "to itself"
                )
            caller.self_calls += 1
        try:
            try:
                return await served.infer(request)
            except VersionRetired:
                return await self.get(request.model_name, request.model_version).infer(request)
        finally:
            if calls_itself:
                assert caller is not None
                caller.self_calls -= 1

    def _fail(self, record: ModelRecord, reason: str) -> None:
        """Record a failed load; versions already serving keep serving."""
        log.error("model '%s' failed to load: %s", record.name, reason)
        serving = [v for v in record.versions.values() if v.state == ModelState.READY]
        if serving:
            record.reason = f"reload failed, still serving the previous load: {reason}"
            record.state = ModelState.READY
        else:
            record.reason = reason
            record.state = ModelState.UNAVAILABLE
            record.versions = {}

    # -- LoRA adapters of engines that serve them ------------------------------------------------------------------
    def _adapter_name(self, name: str) -> tuple[str, str] | None:
        """``(model, adapter)`` for a repository API name ``model:adapter`` whose model is loaded, else None."""
        base, sep, adapter = name.rpartition(":")
        if not sep or not base or self.repository.locate(name) is not None or base not in self.records:
            return None
        return base, adapter

    async def load_adapter(self, model: str, adapter: str, config_override: dict[str, Any] | None) -> None:
        """Load (or replace) a LoRA adapter in every instance of a loaded model, without restarting its engine.

        The adapter folder is the load request's ``config`` parameter ``{"parameters": {"lora_path": "..."}}``
        (relative to the model folder unless absolute), or, without one, the folder the model's config lists under
        that name in ``parameters.lora_adapters``.
        """
        async with self.model_lock(model):
            served = self.get(model)
            backend = served.engine_backend
            if backend is None or not hasattr(backend, "add_adapter"):
                raise InvalidInput(f"model '{model}' does not serve LoRA adapters (backend {served.config.backend})")
            parameters = (config_override or {}).get("parameters") or {}
            path = parameters.get("lora_path") if isinstance(parameters, dict) else None
            if path is not None and not isinstance(path, str):
                raise InvalidInput(f"load of '{model}:{adapter}': parameters.lora_path must be a folder path")
            for instance in served.pool.instances if served.pool is not None else []:
                await instance.backend.add_adapter(adapter, path)
            log.info("model '%s': LoRA adapter '%s' loaded from %s", model, adapter, path)

    async def unload_adapter(self, model: str, adapter: str) -> None:
        async with self.model_lock(model):
            served = self.get(model)
            if adapter not in served.adapters:
                raise ModelNotFound(f"model '{model}' has no LoRA adapter '{adapter}'")
            for instance in served.pool.instances if served.pool is not None else []:
                await instance.backend.remove_adapter(adapter)
            log.info("model '%s': LoRA adapter '%s' unloaded", model, adapter)

    def adapter_target(self, name: str) -> tuple[str, str | None]:
        """The model that serves ``name`` and the LoRA adapter it names: a model's own name, ``model:adapter``, or
        an adapter's bare name when one ready model serves an adapter of that name."""
        if name in self.records:
            return name, None
        base, sep, adapter = name.rpartition(":")
        if sep and base in self.records and self.is_ready(base) and adapter in self.get(base).adapters:
            return base, adapter
        for model in self.records:
            if self.is_ready(model) and name in self.get(model).adapters:
                return model, name
        return name, None

    def adapter_models(self) -> list[str]:
        """Every name a LoRA adapter is served under: ``model:adapter`` and the adapter's own name."""
        names: list[str] = []
        for model in sorted(self.records):
            if self.is_ready(model):
                for adapter in self.get(model).adapters:
                    names += [f"{model}:{adapter}", adapter]
        return names

    async def unload(self, name: str) -> None:
        target = self._adapter_name(name)
        if target is not None:
            await self.unload_adapter(*target)
            return
        async with self.model_lock(name):
            record = self.records.get(name)
            if record is None:
                if self.repository.locate(name) is not None:
                    return  # in the repository but never loaded: already unloaded
                raise ModelNotFound(f"model '{name}' is not in the model repository")
            old = [v for v in record.versions.values() if v.served is not None]
            for entry in old:
                entry.state = ModelState.UNLOADING
            await asyncio.gather(*(entry.served.close() for entry in old if entry.served is not None))
            for entry in old:
                self.statistics.discard(name, str(entry.version))
            record.versions = {}
            record.state = ModelState.UNAVAILABLE
            record.reason = "unloaded"
            self._discard_unused_uploads(name)
            log.info("model '%s' unloaded", name)

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(name) for name in list(self.records)), return_exceptions=True)

    def record(self, name: str) -> ModelRecord:
        record = self.records.get(name)
        if record is None:
            raise ModelNotFound(f"unknown model '{name}'")
        return record

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The version that serves a request; the newest ready one when none is named."""
        record = self.record(name)
        if version:
            if not (version.isascii() and version.isdigit()):
                raise InvalidInput(f"model version must be a positive integer, got '{version}'")
            entry = record.versions.get(int(version))
            if entry is None:
                raise ModelNotFound(f"unknown version {version} of model '{name}'")
            if entry.state != ModelState.READY or entry.served is None:
                raise ModelNotReady(f"version {version} of model '{name}' is {entry.state.value}: {entry.reason}")
            served = entry.served
        else:
            newest = None
            for entry in record.versions.values():  # every request's path: no list, no key function
                if entry.state == ModelState.READY and entry.served is not None:
                    if newest is None or entry.version > newest.version:
                        newest = entry
            if newest is None:
                detail = f": {record.reason}" if record.reason else ""
                raise ModelNotReady(f"model '{name}' is not ready{detail}")
            served = newest.served
        assert served is not None
        if served.config.is_ensemble:
            check_steps_ready(self, served.config)
        return served

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except ModelDockError:
            return False
        return True

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one row per version, or per model when no version is known."""
        rows: list[dict[str, str]] = []
        found, _ = self.repository.scan()
        for name in sorted(set(found) | set(self.records)):
            record = self.records.get(name)
            if record is None:
                rows.append(
                    {"name": name, "version": "", "state": ModelState.UNAVAILABLE.value, "reason": "not loaded"}
                )
                continue
            if not record.versions:
                rows.append({"name": name, "version": "", "state": record.state.value, "reason": record.reason})
            for version in sorted(record.versions):
                entry = record.versions[version]
                state = entry.state
                reason = entry.reason or (record.reason if entry.state == ModelState.READY else "")
                if state == ModelState.READY and record.config is not None and record.config.is_ensemble:
                    try:
                        self.get(name, str(version))
                    except ModelDockError as exc:
                        state, reason = ModelState.UNAVAILABLE, exc.message
                rows.append({"name": name, "version": str(version), "state": state.value, "reason": reason})
        if ready_only:
            rows = [r for r in rows if r["state"] == ModelState.READY.value]
        return rows


# Beyond a version's load timeout, how long the manager still waits for a backend to report its own timeout.
_LOAD_GRACE_S = 10.0


async def _load_version(config: ModelConfig, version_dir: Path, backend_cls: type[Backend]) -> list[ModelInstance]:
    """Create a version's warm instances, giving up after ``config.load_timeout_s`` (plus a grace period).

    Worker-process instances enforce the deadline themselves and fail with a clear reason. An in-process backend
    that hangs cannot be stopped, so it runs on a thread of its own (a hung load never takes a thread the rest of
    the server needs, nor holds up its exit), and whatever it builds after the manager gave up is released.
    """
    timeout_s = config.load_timeout_s
    loop = asyncio.get_running_loop()
    result: asyncio.Future[list[ModelInstance]] = loop.create_future()

    def deliver(outcome: Any, failed: bool) -> None:
        if result.cancelled():
            if not failed:
                _release_late(config.name, outcome)
            return
        if failed:
            result.set_exception(outcome)
        else:
            result.set_result(outcome)

    def hand_over(outcome: Any, failed: bool) -> None:
        try:
            loop.call_soon_threadsafe(deliver, outcome, failed)
        except RuntimeError:  # the event loop is gone: the server stopped while this was loading
            if not failed:
                _release_late(config.name, outcome)

    def run() -> None:
        try:
            instances = create_warm_instances(config, version_dir, backend_cls, time.monotonic() + timeout_s)
        except BaseException as exc:
            hand_over(exc, True)
            return
        hand_over(instances, False)

    threading.Thread(target=run, name=f"load-{config.name}-{version_dir.name}", daemon=True).start()
    try:
        return await asyncio.wait_for(result, timeout_s + _LOAD_GRACE_S)
    except TimeoutError:
        raise ModelLoadError(
            f"{version_dir}: did not load within {timeout_s}s (parameters.load_timeout_secs in "
            f"{version_dir.parent / CONFIG_FILENAME}); the backend may be stuck loading the model"
        ) from None


def _release_late(name: str, instances: list[ModelInstance]) -> None:
    log.warning("model '%s': a load that timed out finished later; releasing its instances", name)
    threading.Thread(target=lambda: [i.unload() for i in instances], daemon=True).start()


def prepare_model(
    model_dir: Path, config_override: dict[str, Any] | None = None
) -> tuple[ModelConfig, type[Backend] | None, dict[int, Path]]:
    """Read and complete a model's config and choose its versions; blocking, so run in a thread."""
    if config_override is not None:
        config = parse_model_config(config_override, f"config override for model '{model_dir.name}'", model_dir.name)
    else:
        config = load_model_config(model_dir)
    available = version_dirs(model_dir)
    if not available:
        raise ModelLoadError(f"{model_dir}: {no_versions_reason(model_dir)}")
    selected_numbers = config.version_policy.select(list(available))
    if not selected_numbers:
        raise ConfigError(
            f"{model_dir}: field 'version_policy': selects none of the versions present {sorted(available)}"
        )
    selected = {v: available[v] for v in selected_numbers}
    if config.is_ensemble:  # no backend: its graph is checked against the step models once they are loaded
        return config, None, selected
    newest = selected[max(selected)]
    if not config.backend:
        config.backend = guess_backend(newest)
        if not config.backend:
            raise ConfigError(f"{model_dir}/config.yaml: field 'backend': not set and no known model file in {newest}")
    try:
        backend_cls = backend_class(config.backend)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{model_dir / CONFIG_FILENAME}: {exc.message}") from None
    config = backend_cls.auto_complete_config(config, newest)
    if not config.input or not config.output:
        raise ConfigError(
            f"{model_dir}/config.yaml: field 'input'/'output': not given and the backend cannot infer them"
        )
    return config, backend_cls, selected
