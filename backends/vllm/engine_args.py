"""vLLM's engine arguments from a model's ``parameters``, by vLLM's own names, as Triton's vLLM backend takes them.

Every key of ``parameters`` is either one of ModelDock's settings for this backend (``MODELDOCK_PARAMETERS``) or a
field of vLLM's ``AsyncEngineArgs`` (``tensor_parallel_size``, ``dtype``, ``quantization``, ``max_model_len``,
``enable_lora``, ``distributed_executor_backend``...). Config parameters are text, so each value is converted to
the type of its field here; a key that is neither, or a value of the wrong type, is a ``ConfigError`` naming the
field, before any engine process starts.

CPU-only settings travel to vLLM's engine processes as environment variables, which vLLM reads when it starts them:
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and ``VLLM_CPU_OMP_THREADS_BIND`` (the cores of each tensor-parallel
rank; on a machine with one NUMA node vLLM cannot work them out itself for more than one rank).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import model_folder
from backends.framework_lock import FRAMEWORK_LOCK
from server.config import LOAD_TIMEOUT_PARAMETER, ModelConfig
from server.errors import ConfigError, ModelLoadError
from server.protocol.chat_images import IMAGE_LIMIT_PARAMETERS

# Small enough for tests and laptops; vLLM's own default (4 GiB) is for servers. Raise it with the parameter.
DEFAULT_CPU_KVCACHE_SPACE_GB = 1
# Arguments ModelDock sets unless the config does: its own metrics replace vLLM's periodic log lines.
_DEFAULTS: dict[str, Any] = {"disable_log_stats": True, "enable_log_requests": False}
# Set by ModelDock from the model folder and config, never by a parameter.
_RESERVED = {"model", "served_model_name"}


class VllmSettings(BaseModel):
    """ModelDock's own parameters for ``backend: vllm`` (everything else in ``parameters`` goes to vLLM)."""

    model_config = ConfigDict(extra="forbid")

    #: The Hugging Face model folder, relative to the model's folder; default: the version folder.
    model_path: str = ""
    #: LoRA adapters served from the start: ``{"name": "folder"}`` (JSON text), folders relative to the model's.
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    #: GiB of KV cache on the CPU build (``VLLM_CPU_KVCACHE_SPACE``).
    cpu_kvcache_space_gb: int = Field(default=DEFAULT_CPU_KVCACHE_SPACE_GB, ge=1)
    #: Cores of each tensor-parallel rank on the CPU build (``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``0|1``); default:
    #: this process's cores split evenly between the ranks when there is more than one, else vLLM's ``auto``.
    cpu_omp_threads_bind: str = ""


# ModelDock parameters that are not vLLM's: this backend's settings, the limits on a chat request's images (the same
# for every engine; ``server.protocol.chat_images``) and the server's own.
MODELDOCK_PARAMETERS = frozenset({*VllmSettings.model_fields, *IMAGE_LIMIT_PARAMETERS, "task", LOAD_TIMEOUT_PARAMETER})


def read_settings(config: ModelConfig) -> VllmSettings:
    values: dict[str, Any] = {k: v for k, v in config.parameters.items() if k in VllmSettings.model_fields}
    if "lora_adapters" in values:
        try:
            values["lora_adapters"] = orjson.loads(values["lora_adapters"])
        except orjson.JSONDecodeError:
            raise ConfigError(
                f"model '{config.name}': field 'parameters.lora_adapters': expected a JSON object of adapter names "
                f"to folders, such as '{{\"sql\": \"adapters/sql\"}}', got '{values['lora_adapters']}'"
            ) from None
    try:
        return VllmSettings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"model '{config.name}': field 'parameters.{where}': {error['msg']}") from None


def adapter_folder(config: ModelConfig, version_dir: Path, path: str) -> Path:
    """An adapter folder named in the config or a load request, relative to the model folder unless absolute."""
    folder = Path(path)
    return folder if folder.is_absolute() else version_dir.parent / folder


def _field_kinds(field: dataclasses.Field[Any]) -> set[str]:
    """The plain type names a field's annotation allows (vLLM's annotations are strings: ``int | None``)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return {part.strip().split("[")[0] for part in annotation.split("|")}


def _convert(config: ModelConfig, name: str, raw: str, field: dataclasses.Field[Any]) -> Any:
    kinds = _field_kinds(field)
    default = field.default
    text = raw.strip()
    where = f"model '{config.name}': field 'parameters.{name}'"
    if "None" in kinds and text.lower() in ("none", "null"):
        return None
    if "bool" in kinds or isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        if kinds <= {"bool", "None"}:
            raise ConfigError(f"{where}: expected true or false, got '{raw}'")
    if "int" in kinds or (isinstance(default, int) and not isinstance(default, bool)):
        try:
            return int(text)
        except ValueError:
            if kinds <= {"int", "None"}:
                raise ConfigError(f"{where}: expected an integer, got '{raw}'") from None
    if "float" in kinds or isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            if kinds <= {"float", "None"}:
                raise ConfigError(f"{where}: expected a number, got '{raw}'") from None
    if text[:1] in ("{", "[") and kinds - {"str", "None", "Literal"}:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    return raw


def engine_fields() -> dict[str, dataclasses.Field[Any]]:
    with FRAMEWORK_LOCK:  # the first import of vLLM imports torch's lazy parts (see backends/framework_lock.py)
        from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name: f for f in dataclasses.fields(AsyncEngineArgs) if f.init}


def engine_arguments(config: ModelConfig, version_dir: Path, settings: VllmSettings) -> dict[str, Any]:
    """The keyword arguments of ``AsyncEngineArgs`` for this model, checked against its fields."""
    fields = engine_fields()
    arguments: dict[str, Any] = dict(_DEFAULTS)
    for name, raw in config.parameters.items():
        if name in MODELDOCK_PARAMETERS:
            continue
        field = fields.get(name)
        if field is None or name in _RESERVED:
            close = difflib.get_close_matches(name, [*fields, *MODELDOCK_PARAMETERS], n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            reason = "is set by ModelDock" if name in _RESERVED else "is neither an argument of vLLM's AsyncEngineArgs"
            if name not in _RESERVED:
                reason += f" nor a ModelDock parameter ({', '.join(sorted(MODELDOCK_PARAMETERS))})"
            raise ConfigError(f"model '{config.name}': field 'parameters.{name}': {reason}{hint}")
        arguments[name] = _convert(config, name, raw, field)
    folder = model_folder(config, version_dir)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder / 'config.json'}: not found; backend vllm loads a Hugging Face model folder (what "
            "save_pretrained writes) from the version folder or parameters.model_path"
        )
    arguments["model"] = str(folder)
    arguments["served_model_name"] = [config.name]
    if settings.lora_adapters and "enable_lora" not in config.parameters:
        arguments["enable_lora"] = True
    return arguments


def cpu_environment(settings: VllmSettings, arguments: dict[str, Any]) -> dict[str, str]:
    """The environment vLLM's CPU build reads when it starts its engine processes."""
    environment = {"VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kvcache_space_gb)}
    ranks = int(arguments.get("tensor_parallel_size") or 1) * int(arguments.get("pipeline_parallel_size") or 1)
    if settings.cpu_omp_threads_bind:
        environment["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_omp_threads_bind
    elif ranks > 1:
        environment["VLLM_CPU_OMP_THREADS_BIND"] = split_cores(sorted(os.sched_getaffinity(0)), ranks)
    return environment


def split_cores(cores: list[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` ranks sharing ``cores``: consecutive cores, as even a split as
    possible; with fewer cores than ranks, ranks share cores (slower, but it runs)."""
    if len(cores) >= ranks:
        size, extra = divmod(len(cores), ranks)
        groups, start = [], 0
        for rank in range(ranks):
            end = start + size + (1 if rank < extra else 0)
            groups.append(cores[start:end])
            start = end
    else:
        groups = [[cores[rank % len(cores)]] for rank in range(ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)
