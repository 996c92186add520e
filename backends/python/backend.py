"""Serves arbitrary Python code: ``model.py`` in the version folder defines a class in the style of Triton's Python
backend (default name ``TritonPythonModel``, else ``Model``; ``parameters: {model_class: Name}`` picks another)::

    class TritonPythonModel:
        def initialize(self, args: dict[str, str]) -> None: ...   # optional
        def execute(self, requests: list[InferenceRequest]) -> list[dict[str, np.ndarray]]: ...
        def finalize(self) -> None: ...                            # optional

How batches map to requests: the server merges the requests it batches together along the batch dimension
before they reach a backend, and splits the outputs afterwards by each request's batch size. So ``execute``
receives exactly one ``InferenceRequest`` holding the whole merged batch and returns a list with one dict of
output arrays (returning the dict itself is accepted too). Every output must keep the batch dimension (for models
with ``max_batch_size > 0``) so each client gets its own rows back. BYTES tensors are numpy object arrays of
``bytes``.

``initialize`` gets Triton's ``args``, all strings: ``model_config`` (the completed config as JSON),
``model_name``, ``model_version``, ``model_repository`` (the model's folder), ``model_instance_kind``
(``CPU``/``GPU``) and ``model_instance_device_id``.

As in Triton, ``execute`` may also return ``pb_utils.InferenceResponse`` objects, be an ``async def``, and call
other served models (Triton's BLS) with ``pb_utils.InferenceRequest(...).exec()`` or ``await ...async_exec()``;
``import triton_python_backend_utils as pb_utils`` works unchanged (see ``backends/python/pb_utils.py``).

Instances of this backend run in worker processes (``releases_gil = False``), so user code may hold the GIL,
import anything, or crash: a crash fails the batch in flight and the worker is restarted. Inputs and outputs
must be given in ``config.yaml`` unless the class has a static ``auto_complete_config(config: dict) -> dict``
which receives the config as Triton JSON and returns it completed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import multiprocessing
import sys
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from backends.base import Backend, import_user_module
from backends.python import pb_utils
from server.config import ModelConfig, parse_model_config
from server.devices import Device
from server.errors import BackendError, ConfigError, ModelLoadError
from server.worker_processes import error_payload, rebuilt_error, stop_process

DEFAULT_CLASS_NAMES = ("TritonPythonModel", "Model")
TRITON_UTILS_MODULE = "triton_python_backend_utils"


class InferenceRequest:
    """What ``execute`` receives: the batch's inputs by name, and the outputs the clients asked for."""

    __slots__ = ("inputs", "requested_output_names")

    def __init__(self, inputs: dict[str, np.ndarray], requested_output_names: list[str]) -> None:
        self.inputs = inputs
        self.requested_output_names = requested_output_names

    def get_input(self, name: str) -> np.ndarray | None:
        """The named input, or ``None`` for an optional input the client left out (as Triton's helper)."""
        return self.inputs.get(name)


def _load_module(path: Path, model_name: str) -> ModuleType:
    # Models written for Triton import its helper module by this name; here it is ``pb_utils``.
    sys.modules.setdefault(TRITON_UTILS_MODULE, pb_utils)
    return import_user_module(path, f"modeldock_python_model_{model_name}_{path.parent.name}")


def _model_class(module: ModuleType, path: Path, config: ModelConfig) -> type:
    chosen = config.parameters.get("model_class")
    names = (chosen,) if chosen else DEFAULT_CLASS_NAMES
    for name in names:
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    raise ModelLoadError(f"{path}: defines no class named {' or '.join(names)} (set parameters.model_class)")


def _isolated_main(conn: Connection, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Body of a throw-away process: run ``function`` and send back its result or its error."""
    try:
        result = function(*args)
    except BaseException as exc:  # user code may raise anything, SystemExit included
        conn.send(("error", error_payload(exc)))
    else:
        conn.send(("ok", result))


def _run_isolated(function: Callable[..., Any], args: tuple[Any, ...], path: Path, timeout_s: float) -> Any:
    """``function(*args)`` in a throw-away process, so that importing user code cannot take the server down nor
    hang it: a process that dies or takes longer than ``timeout_s`` fails with a reason naming ``path``."""
    context = multiprocessing.get_context("spawn")
    parent_conn, child_conn = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_main, args=(child_conn, function, args), daemon=True)
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout_s):
            stop_process(process)
            raise ModelLoadError(
                f"{path}: importing it did not finish within {timeout_s:g}s; a model that needs longer can set "
                "parameters.load_timeout_secs in config.yaml"
            )
        try:
            status, payload = parent_conn.recv()
        except EOFError:
            process.join()
            raise ModelLoadError(
                f"{path}: the process importing it died (exit code {process.exitcode}); does the module call "
                "sys.exit() or os._exit()?"
            ) from None
    finally:
        parent_conn.close()
        process.join(5)
    if status == "ok":
        return payload
    known = rebuilt_error(payload, ModelLoadError)
    if known is not None:
        raise known
    name, message = payload
    raise ModelLoadError(f"{path}: {name}: {message}")


def _check_in_worker(path: str, config_json: str) -> None:
    """Import ``model.py`` and find its class, as a load does, without creating the model."""
    config = ModelConfig.model_validate_json(config_json)
    _model_class(_load_module(Path(path), config.name), Path(path), config)


def _auto_complete_in_worker(path: str, config_json: str) -> dict[str, Any]:
    """Runs in a throw-away process so that importing user code cannot take the server down."""
    config = ModelConfig.model_validate_json(config_json)
    cls = _model_class(_load_module(Path(path), config.name), Path(path), config)
    hook = getattr(cls, "auto_complete_config", None)
    if hook is None:
        return config.to_json()
    try:
        completed = hook(config.to_json())
    except Exception as exc:  # user exception types may not be importable in the server process
        raise ModelLoadError(f"{path}: auto_complete_config failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(completed, dict):
        raise ConfigError(f"{path}: auto_complete_config must return the config as a dict")
    return completed


class PythonBackend(Backend):
    default_model_filename: ClassVar[str] = "model.py"
    releases_gil: ClassVar[bool] = False
    supports_gpu: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        path = self.model_path(config, version_dir)
        cls = _model_class(_load_module(path, config.name), path, config)
        try:
            self.model = cls()
        except Exception as exc:
            raise ModelLoadError(f"{path}: {cls.__name__}() failed: {type(exc).__name__}: {exc}") from None
        # Runs ``async def execute`` (models awaiting several calls to other models at once).
        self._loop: asyncio.AbstractEventLoop | None = None
        if not callable(getattr(self.model, "execute", None)):
            raise ModelLoadError(f"{path}: class {cls.__name__} has no execute(requests) method")
        args = {
            "model_config": json.dumps(config.to_json()),
            "model_name": config.name,
            "model_version": version_dir.name,
            "model_repository": str(version_dir.parent),
            "model_instance_kind": "GPU" if device.is_gpu else "CPU",
            "model_instance_device_id": str(device.index),
        }
        initialize = getattr(self.model, "initialize", None)
        if initialize is not None:
            try:
                initialize(args)
            except Exception as exc:
                raise ModelLoadError(f"{path}: initialize() failed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        path = cls.model_path(config, version_dir)
        _run_isolated(_check_in_worker, (str(path), config.model_dump_json()), path, config.load_timeout_s)

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        if config.input and config.output:
            return config
        path = cls.model_path(config, version_dir)
        source = f"{version_dir.parent / 'config.yaml'}"
        args = (str(path), config.model_dump_json())
        completed = _run_isolated(_auto_complete_in_worker, args, path, config.load_timeout_s)
        completed = parse_model_config(completed, f"{source} (as completed by {path.name})", config.name)
        if not completed.input or not completed.output:
            raise ConfigError(
                f"{source}: field 'input'/'output': the python backend needs the model's inputs and outputs in "
                f"config.yaml, or a static auto_complete_config(config) in {path.name} that adds them"
            )
        return completed

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        result = self.model.execute([InferenceRequest(dict(inputs), list(output_names))])
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        if isinstance(result, (list, tuple)):
            if len(result) != 1:
                raise BackendError(
                    f"model '{self.config.name}': execute() got one request and must return a list of one output "
                    f"dict, got {len(result)} items"
                )
            result = result[0]
        if isinstance(result, pb_utils.InferenceResponse):
            error = result.error()
            if error is not None:
                raise BackendError(f"model '{self.config.name}': {error.message()}")
            result = {tensor.name(): tensor.as_numpy() for tensor in result.output_tensors()}
        if not isinstance(result, Mapping):
            raise BackendError(
                f"model '{self.config.name}': execute() must return a list with one dict of output arrays, "
                f"got {type(result).__name__}"
            )
        return {str(name): np.asarray(value) for name, value in result.items()}

    def unload(self) -> None:
        finalize = getattr(self.model, "finalize", None)
        if finalize is not None:
            finalize()
        if self._loop is not None:
            self._loop.close()
