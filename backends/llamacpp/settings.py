"""What ``parameters`` in a ``backend: llamacpp`` config.yaml may say, checked before anything is loaded.

Three kinds of keys: the server's own (``task``, ``load_timeout_secs``), this backend's (``max_queue_size``), and
llama.cpp's, which go to ``llama_cpp.Llama(...)`` by their own names, as Triton's vLLM backend passes vLLM's engine
arguments: ``n_ctx``, ``n_gpu_layers``, ``n_threads``, ``n_batch``, ``flash_attn``, ``logits_all``, ``type_k``...
config.yaml values arrive as text, so each is read as YAML (``true``, ``4``, ``[0.5, 0.5]``) and checked against
the type ``Llama`` declares for it; an unknown key, or a value of the wrong type, is refused with the field named
rather than ignored (``Llama`` swallows unknown keyword arguments silently).
"""

from __future__ import annotations

import inspect
import os
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from server.config import LOAD_TIMEOUT_PARAMETER, ModelConfig
from server.errors import ConfigError

DEFAULT_MAX_QUEUE_SIZE = 16
# Keys the server reads for every model, not llama.cpp's.
SERVER_PARAMETERS = frozenset({"task", LOAD_TIMEOUT_PARAMETER})
# ``Llama`` arguments that config.yaml cannot or must not set: Python objects, the file (the version folder's), the
# chat handling (the front ends render chat templates, once for all engines), and its console output.
RESERVED_ARGUMENTS = frozenset(
    {"self", "model_path", "chat_format", "chat_handler", "draft_model", "tokenizer", "verbose", "kwargs"}
)


class LlamaCppSettings(BaseModel):
    """This backend's options, and the arguments of ``llama_cpp.Llama`` (validated, typed) for one instance."""

    model_config = ConfigDict(extra="forbid")

    #: Requests one instance holds waiting behind the one it runs; past it a request is refused at once (503).
    max_queue_size: int = Field(default=DEFAULT_MAX_QUEUE_SIZE, ge=0)
    #: ``Llama`` keyword arguments.
    llama_arguments: dict[str, Any] = Field(default_factory=dict)

    @property
    def logits_all(self) -> bool:
        """Whether llama.cpp keeps every position's logits, which log-probabilities need."""
        return bool(self.llama_arguments.get("logits_all", False))


def llama_argument_types() -> dict[str, Any]:
    """The keyword arguments ``llama_cpp.Llama`` accepts from config.yaml, with their declared types."""
    from llama_cpp import Llama

    # llama_cpp writes its annotations as text (``from __future__ import annotations``); resolve them.
    hints = typing.get_type_hints(Llama.__init__)
    return {
        name: hints.get(name, inspect.Parameter.empty)
        for name, parameter in inspect.signature(Llama.__init__).parameters.items()
        if name not in RESERVED_ARGUMENTS and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container's CPU set limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_instances(config: ModelConfig) -> int:
    """How many instances of the model share this machine's cores."""
    return sum(group.count for group in config.instance_group) or 1


def parse_settings(config: ModelConfig, on_gpu: bool = False, main_gpu: int = 0) -> LlamaCppSettings:
    """The settings of one instance of ``config``'s model; ``ConfigError`` naming the field for anything wrong.

    Left unset: ``n_ctx`` is the model's trained context length (llama.cpp's ``0``), ``n_gpu_layers`` every layer
    on a GPU instance and none on a CPU one, ``n_threads`` (and ``n_threads_batch``) llama-cpp-python's own default,
    half the available cores (the physical ones, with two hardware threads a core), shared evenly among the model's
    instances. More threads than that do harm: llama.cpp's threads wait on each other by spinning, so when they
    outnumber free cores each token waits for a descheduled thread (measured on a busy 2-core machine with a tiny
    model: 2,850 tokens/s with one thread, 9.5 with two).
    """
    types = llama_argument_types()
    arguments: dict[str, Any] = {}
    max_queue_size = DEFAULT_MAX_QUEUE_SIZE
    for key, text in config.parameters.items():
        if key in SERVER_PARAMETERS:
            continue
        if key == "max_queue_size":
            max_queue_size = config.int_parameter(key) or 0
            continue
        if key not in types:
            if key in RESERVED_ARGUMENTS:
                raise ConfigError(f"model '{config.name}': field 'parameters.{key}': cannot be set for llamacpp")
            raise ConfigError(
                f"model '{config.name}': field 'parameters.{key}': not a llama_cpp.Llama argument nor a ModelDock "
                f"parameter (known: max_queue_size, {', '.join(sorted(types))})"
            )
        arguments[key] = _typed(config.name, key, text, types[key])
    arguments.setdefault("n_ctx", 0)
    if on_gpu:
        arguments.setdefault("n_gpu_layers", -1)
        arguments.setdefault("main_gpu", main_gpu)
    else:
        arguments.setdefault("n_gpu_layers", 0)
    threads = max(1, available_cores() // 2 // cpu_instances(config))
    arguments.setdefault("n_threads", threads)
    arguments.setdefault("n_threads_batch", arguments["n_threads"])
    for key in ("n_ctx", "n_threads", "n_threads_batch", "n_batch", "n_ubatch"):
        if key in arguments and arguments[key] is not None and arguments[key] < (0 if key == "n_ctx" else 1):
            raise ConfigError(f"model '{config.name}': field 'parameters.{key}': must be positive")
    try:
        return LlamaCppSettings(max_queue_size=max_queue_size, llama_arguments=arguments)
    except ValidationError as exc:
        raise ConfigError(
            f"model '{config.name}': field 'parameters.max_queue_size': {exc.errors()[0]['msg']}"
        ) from None


def _typed(model: str, key: str, text: str, annotation: Any) -> Any:
    try:
        value = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        value = text
    if annotation is inspect.Parameter.empty:
        return value
    try:
        return TypeAdapter(annotation).validate_python(value, strict=False)
    except ValidationError as exc:
        raise ConfigError(
            f"model '{model}': field 'parameters.{key}': {exc.errors()[0]['msg']} (got {text!r})"
        ) from None
    except Exception:  # an annotation pydantic cannot check (a library class): pass the value as written
        return value
