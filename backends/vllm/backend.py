"""``backend: vllm``: a Hugging Face model served by vLLM's engine (``AsyncLLM``), which schedules, batches, caches
and runs the model in processes of its own; ModelDock owns everything above it.

A version folder holds what ``save_pretrained`` writes, or ``parameters.model_path`` names such a folder; every
other parameter is one of vLLM's engine arguments by its own name (see ``engine_args``). The generation scheduler
uses this backend directly as its engine, so every front end (OpenAI, Triton's generate extension, gRPC streaming)
and the metrics work as for ModelDock's own engine. LoRA adapters named in ``parameters.lora_adapters`` or loaded at
run time are picked per request (``GenerateRequest.adapter``), as vLLM serves them. A vision-language model (one
vLLM runs as multi-modal) takes ``image_url`` content parts in chat messages, and its chats are rendered by vLLM's
own renderer (``image_chat``); a text-only model given an image is refused with a 400 naming the model.

Without vLLM installed the model is refused when its config is read, with the pip command to run as the reason, and
the rest of the repository serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

from backends.base import EngineBackend, declare_generation_io, model_folder
from backends.framework_lock import FRAMEWORK_LOCK
from backends.vllm.engine_args import (
    VllmSettings,
    adapter_folder,
    cpu_environment,
    engine_arguments,
    read_settings,
)
from backends.vllm.image_chat import render_vision_chat
from backends.vllm.translation import token_logprobs, vllm_sampling_params
from server.config import InstanceGroup, ModelConfig
from server.devices import Device, gpu_count
from server.errors import (
    BackendError,
    ConfigError,
    InvalidInput,
    ModelDockError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
)
from server.protocol.chat_images import ImageLimits
from server.protocol.generation import FinishReason, GenerateRequest, GenerationOutput
from server.protocol.prompts import allowed_new_tokens, prompt_token_ids

log = logging.getLogger(__name__)

CPU_INSTALL = "pip install 'modeldock[vllm]'"
CUDA_INSTALL = "pip install 'modeldock[vllm-cuda]'"
# The engine processes read the CPU settings from the environment as they start; two engines starting at once must
# not see each other's, so starts take turns.
_START_LOCK = threading.Lock()
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
# How long a stopping engine's processes get to exit (vLLM's own shutdown waits about as long for its workers).
STOP_TIMEOUT_S = 30


def install_command() -> str:
    """The pip command that installs the vLLM build for this machine: CUDA where a GPU is visible, else the CPU one."""
    return CUDA_INSTALL if gpu_count() > 0 else CPU_INSTALL


def require_vllm(config: ModelConfig) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ModelLoadError(
            f"model '{config.name}': backend vllm needs vLLM, which is not installed; run: {install_command()}"
        )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VllmBackend(EngineBackend):
    default_model_filename: ClassVar[str] = "config.json"
    supports_gpu: ClassVar[bool] = True

    @classmethod
    def model_path(cls, config: ModelConfig, version_dir: Path) -> Path:
        return model_folder(config, version_dir) / "config.json"

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        """Triton's LLM tensors (as for ``backend: transformers``), one instance, and the parameters checked."""
        require_vllm(config)
        if config.max_batch_size:
            raise ConfigError(
                "field 'max_batch_size': vLLM batches in its engine (parameters.max_num_seqs); leave max_batch_size "
                "at 0"
            )
        if len(config.instance_group) > 1 or any(group.count > 1 for group in config.instance_group):
            raise ConfigError(
                "field 'instance_group': backend vllm runs one engine per model, which spreads over GPUs by itself "
                "(parameters.tensor_parallel_size, pipeline_parallel_size, data_parallel_size); give one instance"
            )
        settings = read_settings(config)
        engine_arguments(config, version_dir, settings)
        ImageLimits.from_parameters(config.parameters, config.name)
        config = config.model_copy(deep=True)
        declare_generation_io(config)
        if not config.instance_group:
            config.instance_group = [InstanceGroup(count=1)]
        return config

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        """What vLLM checks before it starts an engine: the model folder, the architecture and every argument."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        arguments = engine_arguments(config, version_dir, read_settings(config))
        try:
            AsyncEngineArgs(**arguments).create_engine_config()
        except Exception as exc:
            raise ModelLoadError(
                f"{model_folder(config, version_dir)}: vLLM refuses the model: {type(exc).__name__}: {exc}"
            ) from None

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        require_vllm(config)
        with FRAMEWORK_LOCK:  # vLLM's modules import torch's lazy parts (see backends/framework_lock.py)
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

        from backends.vllm.engine_stats import engine_stats_logger

        self.settings: VllmSettings = read_settings(config)
        self._image_limits = ImageLimits.from_parameters(config.parameters, config.name)
        arguments = engine_arguments(config, version_dir, self.settings)
        self.lora_enabled = bool(arguments.get("enable_lora"))
        self._adapter_ids = itertools.count(1)
        self._adapters: dict[str, Any] = {}
        for name, path in self.settings.lora_adapters.items():
            self._adapters[name] = self._lora_request(name, adapter_folder(config, version_dir, path))
        try:
            engine_args = AsyncEngineArgs(**arguments)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model '{config.name}': vLLM refuses the parameters: {exc}") from None
        environment = cpu_environment(self.settings, arguments) if current_platform.is_cpu() else {}
        folder = model_folder(config, version_dir)
        with _START_LOCK, _environment(environment):
            running = set(multiprocessing.active_children())
            try:
                self._engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=[engine_stats_logger(self)])
            except ModelDockError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{folder}: vLLM cannot start its engine: {type(exc).__name__}: {exc}") from None
            # The engine's own processes (its engine core; the core starts and stops the workers): waited for on stop.
            self._processes = [p for p in multiprocessing.active_children() if p not in running]
        self.tokenizer = self._engine.tokenizer
        self._max_model_len = int(self._engine.model_config.max_model_len)
        self._multimodal = bool(self._engine.model_config.is_multimodal_model)
        self._request_ids = itertools.count()
        self._in_flight = 0
        self._stopped = False
        log.info(
            "model '%s': vLLM engine started (%s)", config.name, ", ".join(f"{k}={v}" for k, v in environment.items())
        )

    # -- EngineBackend ----------------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def load(self) -> int:
        return self._in_flight

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        if self._stopped:
            raise ModelNotReady(f"model '{self.config.name}' is unloading")
        lora = self._adapter_request(request.adapter)
        prompt: Any
        if self._multimodal and request.messages is not None:
            prompt = await render_vision_chat(self._engine.renderer, request, self._image_limits, self.config.name)
            prompt_ids = list(prompt["prompt_token_ids"])
        else:
            # A text-only model refuses image parts here, naming the model (server.protocol.chat_templates).
            prompt_ids = await asyncio.to_thread(prompt_token_ids, self.tokenizer, request, self.config.name)
            prompt = {"prompt_token_ids": prompt_ids}
        sampling = request.sampling
        params = vllm_sampling_params(
            sampling, allowed_new_tokens(prompt_ids, sampling.max_tokens, self._max_model_len, self.config.name)
        )
        stats = self.stats
        arrival = time.monotonic()
        last_token_at: float | None = None
        completion_tokens = 0
        finished = failed = False
        first_chunk = True
        # vLLM needs ids unique among its requests in flight; clients' ids need not be.
        request_id = f"{request.request_id}-{next(self._request_ids)}"
        stream = self._engine.generate(prompt, params, request_id=request_id, lora_request=lora)
        self._in_flight += 1
        try:
            while True:
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    break
                except ModelDockError:
                    failed = True
                    raise
                except Exception as exc:
                    failed = True
                    raise self._error(exc) from None
                completion = out.outputs[0]
                token_ids = list(completion.token_ids)
                now = time.monotonic()
                if stats is not None and token_ids:
                    if last_token_at is None:
                        stats.record_first_token(now - arrival, len(prompt_ids))
                        for _ in token_ids[1:]:
                            stats.record_output_token(0.0)
                    else:
                        for _ in token_ids:
                            stats.record_output_token((now - last_token_at) / len(token_ids))
                if token_ids:
                    last_token_at = now
                completion_tokens += len(token_ids)
                finished = out.finished
                reason = None
                if finished:
                    reason = _FINISH_REASONS.get(completion.finish_reason or "stop", "stop")
                    if stats is not None:
                        stats.record_finished()
                yield GenerationOutput(
                    text=completion.text,
                    token_ids=token_ids,
                    finished=finished,
                    finish_reason=reason,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion_tokens,
                    logprobs=self._logprobs(token_ids, completion.logprobs, sampling.logprobs),
                    # Once, in the first chunk, as ModelDock's engine sends them.
                    prompt_logprobs=(
                        self._logprobs(prompt_ids, out.prompt_logprobs, sampling.prompt_logprobs)
                        if first_chunk
                        else None
                    ),
                )
                first_chunk = False
                if finished:
                    return
        finally:
            self._in_flight -= 1
            if not finished:
                # The client left (or the request failed): closing vLLM's stream aborts the request in its engine.
                await stream.aclose()
                if stats is not None and not failed:
                    stats.record_aborted(1)

    def _logprobs(self, token_ids: list[int], positions: Any, top: int | None) -> Any:
        if top is None or not positions:
            return None
        return token_logprobs(token_ids, positions, top, self._decode)

    def _decode(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def _error(self, exc: Exception) -> ModelDockError:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, VLLMClientError):
            return InvalidInput(f"vLLM refused the request: {exc}")
        if isinstance(exc, EngineDeadError):
            return BackendError(f"model '{self.config.name}': vLLM's engine died: {exc}")
        cause = exc.__cause__ or exc
        return BackendError(f"model '{self.config.name}': vLLM failed: {type(cause).__name__}: {cause}")

    def stop(self) -> None:
        """Shut the engine down: its processes exit and their memory (weights, KV cache) is freed."""
        if self._stopped:
            return
        self._stopped = True
        self._engine.shutdown()
        # vLLM signals its engine processes to stop; an unload is done once they are gone (memory freed, no zombie).
        for process in self._processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning(
                    "model '%s': vLLM's %s did not stop in %ss; killed", self.config.name, process.name, STOP_TIMEOUT_S
                )
                process.kill()
                process.join(STOP_TIMEOUT_S)
        log.info("model '%s': vLLM engine shut down", self.config.name)

    def unload(self) -> None:
        self.stop()

    # -- LoRA adapters ----------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters this engine serves; each is also served as a model of its own."""
        return sorted(self._adapters)

    def _lora_request(self, name: str, folder: Path) -> Any:
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise ConfigError(
                f"model '{self.config.name}': LoRA adapter '{name}' needs the engine started with LoRA "
                "(parameters.enable_lora: true, and max_lora_rank at least the adapter's rank)"
            )
        if not name or ":" in name:
            raise ConfigError(f"model '{self.config.name}': LoRA adapter name '{name}' must be non-empty, without ':'")
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{folder}: not a LoRA adapter folder (no adapter_config.json, as PEFT's save_pretrained writes)"
            )
        return LoRARequest(lora_name=name, lora_int_id=next(self._adapter_ids), lora_path=str(folder))

    def _adapter_request(self, name: str | None) -> Any:
        if name is None:
            return None
        request = self._adapters.get(name)
        if request is None:
            raise InvalidInput(
                f"model '{self.config.name}' has no LoRA adapter '{name}' (it serves: {', '.join(self.adapters) or 'none'})"
            )
        return request

    async def add_adapter(self, name: str, path: str | None) -> None:
        """Load a LoRA adapter at run time (the repository API's load of ``model:adapter``); a name in use is
        replaced. Without ``path``, the folder ``parameters.lora_adapters`` lists under ``name`` is loaded again."""
        if path is None:
            path = self.settings.lora_adapters.get(name)
            if path is None:
                raise InvalidInput(
                    f"load of '{self.config.name}:{name}': the model's config lists no adapter '{name}'; give its "
                    'folder as the load request\'s config parameter {"parameters": {"lora_path": "<folder>"}}'
                )
        request = self._lora_request(name, adapter_folder(self.config, self.version_dir, path))
        try:
            added = await self._engine.add_lora(request)
        except Exception as exc:
            raise ModelLoadError(f"{request.lora_path}: vLLM cannot load the LoRA adapter: {exc}") from None
        if not added:
            raise ModelLoadError(f"{request.lora_path}: vLLM did not load the LoRA adapter")
        previous = self._adapters.get(name)
        self._adapters[name] = request
        if previous is not None:
            await self._engine.remove_lora(previous.lora_int_id)

    async def remove_adapter(self, name: str) -> None:
        request = self._adapters.pop(name, None)
        if request is None:
            raise ModelNotFound(f"model '{self.config.name}' has no LoRA adapter '{name}'")
        await self._engine.remove_lora(request.lora_int_id)
