"""Runs a serialized TensorRT engine (``model.plan``) on the instance's GPU with the TensorRT 10 tensor API.

Device memory and the CUDA stream come from torch (``torch.cuda``): it is already the GPU dependency of the
PyTorch backend, and its caching allocator makes per-batch input and output buffers cheap. The ``tensorrt`` extra
therefore installs ``tensorrt`` and ``torch``. Both are imported only when a TensorRT model loads, and when
either is missing the model fails to load with the install command while the rest of the repository serves.

I/O is bound by tensor name. Dynamic shapes work through the engine's optimisation profiles: the instance uses
profile ``parameters.optimization_profile`` (default 0), sets each input's shape per batch and allocates outputs
at the shapes TensorRT derives. An engine is built for one GPU architecture, so only KIND_GPU instances exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from backends.base import Backend
from server.config import InstanceKind, ModelConfig, TensorConfig
from server.devices import Device, gpu_count
from server.errors import BackendError, ConfigError, InvalidInput, ModelLoadError
from server.protocol.datatypes import WIRE_TO_CONFIG, wire_datatype

INSTALL_HINT = 'pip install "modeldock[tensorrt]"'


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelLoadError(f"the tensorrt backend needs the tensorrt package ({exc}): {INSTALL_HINT}") from None
    return tensorrt


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(f"the tensorrt backend uses torch for GPU memory ({exc}): {INSTALL_HINT}") from None
    return torch


def _deserialize(trt: ModuleType, path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ModelLoadError(
            f"{path}: TensorRT cannot deserialize the engine (not a plan file, or built for another TensorRT "
            "version or GPU)"
        )
    # The runtime must outlive the engine; keep it reachable from the engine's owner.
    return runtime, engine


def _numpy_dtype(trt: ModuleType, engine: Any, name: str) -> np.dtype:
    trt_dtype = engine.get_tensor_dtype(name)
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError:
        raise ModelLoadError(f"tensor '{name}' has TensorRT type {trt_dtype}, which the server cannot serve") from None


def _io_names(trt: ModuleType, engine: Any) -> tuple[list[str], list[str]]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    return inputs, outputs


def _require_gpu(config: ModelConfig) -> None:
    if gpu_count() == 0:
        raise ModelLoadError(f"model '{config.name}': TensorRT engines need an NVIDIA GPU and none is visible")


class TensorRTBackend(Backend):
    default_model_filename: ClassVar[str] = "model.plan"
    releases_gil: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        trt = import_tensorrt()
        torch = import_torch()
        if not device.is_gpu:
            raise ModelLoadError(
                f"model '{config.name}': the tensorrt backend runs only KIND_GPU instances (got a CPU instance; "
                "set instance_group kind: KIND_GPU, and make sure a GPU is visible)"
            )
        self._torch = torch
        self._device = torch.device(str(device))
        profile = config.parameters.get("optimization_profile", "0")
        if not profile.isdigit():
            raise ConfigError(f"model '{config.name}': field 'parameters.optimization_profile': expected an integer")
        with torch.cuda.device(self._device):
            self._runtime, self.engine = _deserialize(trt, self.model_path(config, version_dir))
            if int(profile) >= self.engine.num_optimization_profiles:
                raise ConfigError(
                    f"model '{config.name}': field 'parameters.optimization_profile': the engine has "
                    f"{self.engine.num_optimization_profiles} profile(s)"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise ModelLoadError(f"model '{config.name}': TensorRT could not create an execution context")
            self.stream = torch.cuda.Stream(device=self._device)
            self.context.set_optimization_profile_async(int(profile), self.stream.cuda_stream)
            self.stream.synchronize()
        self._inputs, self._outputs = _io_names(trt, self.engine)
        self._dtypes = {n: _numpy_dtype(trt, self.engine, n) for n in self._inputs + self._outputs}
        missing = [t.name for t in config.input if t.name not in self._inputs]
        missing += [t.name for t in config.output if t.name not in self._outputs]
        if missing:
            raise ConfigError(
                f"model '{config.name}': tensors {missing} are not in the engine (inputs {self._inputs}, "
                f"outputs {self._outputs})"
            )
        for tensor in config.input + config.output:
            engine_type = wire_datatype(np.empty(0, self._dtypes[tensor.name]))
            if engine_type != tensor.wire_datatype:
                raise ConfigError(
                    f"model '{config.name}': tensor '{tensor.name}': config says {tensor.data_type} but the engine "
                    f"has {WIRE_TO_CONFIG[engine_type]}"
                )

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        for position, group in enumerate(config.instance_group):
            if group.kind == InstanceKind.KIND_CPU:
                raise ConfigError(
                    f"{version_dir.parent / 'config.yaml'}: field 'instance_group[{position}].kind': the tensorrt "
                    "backend runs only on GPUs (use KIND_GPU)"
                )
        trt = import_tensorrt()
        import_torch()
        if config.input and config.output:
            return config
        _require_gpu(config)
        path = cls.model_path(config, version_dir)
        _runtime, engine = _deserialize(trt, path)
        config = config.model_copy(deep=True)

        def describe(name: str) -> TensorConfig:
            dtype = _numpy_dtype(trt, engine, name)
            dims = [int(d) for d in engine.get_tensor_shape(name)]
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise ConfigError(
                        f"{path}: max_batch_size is {config.max_batch_size} but tensor '{name}' has no dynamic "
                        "leading (batch) dimension"
                    )
                dims = dims[1:]
            data_type = WIRE_TO_CONFIG[wire_datatype(np.empty(0, dtype))]
            return TensorConfig(name=name, data_type=data_type, dims=dims)

        inputs, outputs = _io_names(trt, engine)
        if not config.input:
            config.input = [describe(n) for n in inputs]
        if not config.output:
            config.output = [describe(n) for n in outputs]
        return config

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        context = self.context
        with torch.cuda.device(self._device), torch.cuda.stream(self.stream):
            # Buffers stay referenced until the stream is synchronised below.
            buffers = {}
            for name in self._inputs:
                if name not in inputs:
                    raise InvalidInput(f"missing input '{name}' for model '{self.config.name}'")
                array = np.ascontiguousarray(inputs[name], dtype=self._dtypes[name])
                tensor = torch.from_numpy(array.copy() if not array.flags.writeable else array)
                tensor = tensor.to(self._device, non_blocking=True)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise InvalidInput(
                        f"input '{name}': shape {list(tensor.shape)} is outside the TensorRT engine's optimisation "
                        "profile"
                    )
                context.set_tensor_address(name, tensor.data_ptr())
                buffers[name] = tensor
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"model '{self.config.name}': output '{name}' has unresolved shape {shape}")
                torch_dtype = torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
                tensor = torch.empty(shape, dtype=torch_dtype, device=self._device)
                context.set_tensor_address(name, tensor.data_ptr())
                buffers[name] = tensor
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError(f"model '{self.config.name}': TensorRT execute_async_v3 failed")
            wanted = [n for n in output_names if n in self._outputs] or self._outputs
            results = {name: buffers[name].cpu() for name in wanted}
            self.stream.synchronize()
        return {name: tensor.numpy() for name, tensor in results.items()}

    def unload(self) -> None:
        del self.context
        del self.engine
        del self._runtime
