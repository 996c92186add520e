"""Runs a PyTorch model on the CPU or on the instance's CUDA device.

The version folder holds one of (looked for in this order unless ``default_model_filename`` names one):

- ``model.pt2``: a ``torch.export`` program (``torch.export.save``); inputs and outputs can be filled in from it.
- ``model.pt``: a TorchScript module (``torch.jit.save``).
- ``model.py`` + ``model.safetensors``: an eager ``nn.Module`` class defined in ``model.py`` (named by
  ``parameters.module_class``, else ``Model``, else the only ``nn.Module`` subclass defined there), constructed
  without arguments (or with ``parameters.module_kwargs``, a JSON object) and given the weights from
  ``model.safetensors``.

Nothing is unpickled: TorchScript and export archives have their own restricted loaders and weights come from
safetensors, so a model folder cannot run code through a pickle.

Tensor mapping follows Triton's PyTorch backend. Inputs named ``<anything>__<i>`` (``INPUT__0``) are passed by
position ``i``; otherwise the input names must be the names of ``forward``'s arguments, in any order. Outputs:
a single tensor is the only output; a tuple or list maps by ``OUTPUT__<i>`` index, else in config order; a dict
maps by key.

``parameters``: ``intra_op_thread_count`` / ``inter_op_thread_count`` (torch's thread pools, per process),
``torch_compile: true`` (eager and export models; ``torch_compile_backend`` and ``torch_compile_mode`` pass
through), ``module_class`` and ``module_kwargs`` for eager modules.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from backends.base import Backend, import_user_module
from backends.framework_lock import FRAMEWORK_LOCK
from server.config import ModelConfig, TensorConfig
from server.devices import CPU, Device
from server.errors import BackendError, ConfigError, InvalidInput, ModelLoadError

MODEL_FILES = ("model.pt2", "model.pt", "model.py")
WEIGHTS_FILE = "model.safetensors"
_POSITIONAL = re.compile(r"^.+__(\d+)$")
# The server loads models on several threads at once, and torch's lazily imported parts (torch._dynamo behind
# torch.export.load and torch.compile) fail with circular-import errors when two threads import them together.
# Shared with every backend (see backends/framework_lock.py): torch's lazy imports cross backends.
_LOAD_LOCK = FRAMEWORK_LOCK

_TORCH_TO_CONFIG: dict[torch.dtype, str] = {
    torch.bool: "TYPE_BOOL",
    torch.uint8: "TYPE_UINT8",
    torch.int8: "TYPE_INT8",
    torch.int16: "TYPE_INT16",
    torch.int32: "TYPE_INT32",
    torch.int64: "TYPE_INT64",
    torch.float16: "TYPE_FP16",
    torch.float32: "TYPE_FP32",
    torch.float64: "TYPE_FP64",
}


def model_file(config: ModelConfig, version_dir: Path) -> Path:
    if config.default_model_filename:
        path = version_dir / config.default_model_filename
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found")
        return path
    for name in MODEL_FILES:
        if (version_dir / name).is_file():
            return version_dir / name
    raise ModelLoadError(f"{version_dir}: no model file found (expected one of {', '.join(MODEL_FILES)})")


def positional_indices(names: list[str]) -> list[int] | None:
    """Positions from Triton's ``NAME__<i>`` convention, or ``None`` when the names do not all follow it."""
    matches = [_POSITIONAL.match(n) for n in names]
    if not names or not all(matches):
        return None
    return [int(m.group(1)) for m in matches if m]


def _set_threads(config: ModelConfig) -> None:
    """Torch's thread pools are per process, so the last model loaded with these parameters sets them."""
    intra = config.int_parameter("intra_op_thread_count", minimum=1)
    if intra is not None:
        torch.set_num_threads(intra)
    inter = config.int_parameter("inter_op_thread_count", minimum=1)
    if inter is not None and torch.get_num_interop_threads() != inter:
        try:
            torch.set_num_interop_threads(inter)
        except RuntimeError:  # torch allows this only before the first inter-op work in the process
            pass


def _load_eager(path: Path, config: ModelConfig) -> torch.nn.Module:
    module_name = f"modeldock_torch_model_{config.name}_{path.parent.name}"
    module = import_user_module(path, module_name)
    chosen = config.parameters.get("module_class")
    if chosen:
        cls = getattr(module, chosen, None)
    elif isinstance(getattr(module, "Model", None), type):
        cls = module.Model
    else:
        defined = [
            c
            for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == module_name
        ]
        cls = defined[0] if len(defined) == 1 else None
        if cls is None:
            raise ModelLoadError(
                f"{path}: defines {len(defined)} nn.Module classes; name one with parameters.module_class"
            )
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelLoadError(f"{path}: '{chosen}' is not an nn.Module class defined there")
    try:
        kwargs = json.loads(config.parameters.get("module_kwargs", "{}"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model '{config.name}': field 'parameters.module_kwargs': not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model '{config.name}': field 'parameters.module_kwargs': expected a JSON object")
    try:
        model = cls(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{path}: {cls.__name__}(**module_kwargs) failed: {type(exc).__name__}: {exc}") from None
    weights = path.parent / WEIGHTS_FILE
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{weights}: cannot read safetensors weights: {exc}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{weights}: weights do not fit {cls.__name__}: {exc}") from None
    elif model.state_dict():
        raise ModelLoadError(f"{weights}: weights file not found ({cls.__name__} has parameters to load)")
    return model


def _exported_program(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a bad archive
        raise ModelLoadError(f"{path}: torch.export.load cannot load it: {type(exc).__name__}: {exc}") from None


class PyTorchBackend(Backend):
    default_model_filename: ClassVar[str] = "model.pt"
    alternative_model_filenames: ClassVar[tuple[str, ...]] = MODEL_FILES
    releases_gil: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        with _LOAD_LOCK:
            self._load()

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        cls(config, version_dir, CPU).unload()

    def _load(self) -> None:
        config, version_dir, device = self.config, self.version_dir, self.device
        strings = [t.name for t in config.input + config.output if t.data_type == "TYPE_STRING"]
        if strings:
            raise ConfigError(f"model '{config.name}': tensors {strings}: the pytorch backend has no TYPE_STRING")
        if device.is_gpu and not torch.cuda.is_available():
            raise ModelLoadError(f"model '{config.name}': KIND_GPU instance but this torch build has no CUDA")
        self.torch_device = torch.device(str(device))
        _set_threads(config)
        path = model_file(config, version_dir)
        arg_names: list[str]
        if path.suffix == ".pt2":
            module = _exported_program(path).module()
            module.to(self.torch_device)
            arg_names = list(inspect.signature(module.forward).parameters)
        elif path.suffix == ".py":
            module = _load_eager(path, config).to(self.torch_device).eval()
            arg_names = [
                p.name
                for p in inspect.signature(module.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        else:
            try:
                module = torch.jit.load(str(path), map_location=self.torch_device).eval()
            except Exception as exc:
                raise ModelLoadError(f"{path}: torch.jit.load cannot load it as TorchScript: {exc}") from None
            arg_names = [a.name for a in module.forward.schema.arguments[1:]]
            if config.bool_parameter("torch_compile"):
                raise ConfigError(
                    f"model '{config.name}': field 'parameters.torch_compile': not supported for TorchScript "
                    "(use a torch.export model.pt2 or an eager model.py)"
                )
        self._input_order = self._order_inputs(arg_names)
        self.module: Callable[..., Any] = module
        if config.bool_parameter("torch_compile"):
            options: dict[str, Any] = {"backend": config.parameters.get("torch_compile_backend", "inductor")}
            if "torch_compile_mode" in config.parameters:
                options["mode"] = config.parameters["torch_compile_mode"]
            self.module = torch.compile(module, **options)

    def _order_inputs(self, arg_names: list[str]) -> list[str | None]:
        """Config input names in the order ``forward`` takes them; ``None`` marks an argument left to default."""
        names = [t.name for t in self.config.input]
        if self.config.sequence_batching is not None:
            names += self.config.sequence_batching.server_inputs
        indices = positional_indices(names)
        if indices is not None:
            if sorted(indices) != list(range(len(names))):
                raise ConfigError(
                    f"model '{self.config.name}': field 'input': positional names must be numbered 0..{len(names) - 1}"
                )
            by_index = dict(zip(indices, names, strict=True))
            return [by_index[i] for i in range(len(names))]
        unknown = [n for n in names if n not in arg_names]
        if unknown:
            raise ConfigError(
                f"model '{self.config.name}': field 'input': {unknown} are not arguments of the model's forward "
                f"({arg_names}); name inputs after them or use INPUT__0, INPUT__1 ... for positions"
            )
        last = max(arg_names.index(n) for n in names)
        return [a if a in names else None for a in arg_names[: last + 1]]

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        if config.input and config.output:
            return config
        path = model_file(config, version_dir)
        source = version_dir.parent / "config.yaml"
        if path.suffix != ".pt2":
            raise ConfigError(
                f"{source}: field 'input'/'output': required for {path.name}; only torch.export programs "
                "(model.pt2) carry their signature"
            )
        with _LOAD_LOCK:
            program = _exported_program(path)
        config = config.model_copy(deep=True)
        values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op in ("placeholder", "output")}

        def describe(name: str, value: Any) -> TensorConfig:
            if not isinstance(value, torch.Tensor) or value.dtype not in _TORCH_TO_CONFIG:
                raise ConfigError(f"{path}: tensor '{name}' has a type the server cannot serve ({value!r})")
            dims = [d if isinstance(d, int) else -1 for d in value.shape]
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise ConfigError(
                        f"{path}: max_batch_size is {config.max_batch_size} but tensor '{name}' has no dynamic "
                        "leading (batch) dimension; export it with a torch.export.Dim for dimension 0"
                    )
                dims = dims[1:]
            return TensorConfig(name=name, data_type=_TORCH_TO_CONFIG[value.dtype], dims=dims)

        signature = program.graph_signature
        if not config.input:
            config.input = [
                describe(spec.arg.name, values.get(spec.arg.name))
                for spec in signature.input_specs
                if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
            ]
        if not config.output:
            output_node = next(n for n in program.graph.nodes if n.op == "output")
            flat = {arg.name: arg.meta.get("val") for arg in output_node.args[0] if hasattr(arg, "meta")}
            user = [
                spec.arg.name
                for spec in signature.output_specs
                if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT
            ]
            out_spec = program.call_spec.out_spec
            if out_spec is not None and out_spec.type is dict:
                names = [str(k) for k in out_spec.context]
            else:
                names = [f"OUTPUT__{i}" for i in range(len(user))]
            config.output = [describe(name, flat.get(node)) for name, node in zip(names, user, strict=True)]
        return config

    def _to_tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        if array.dtype == np.object_:
            raise InvalidInput(f"input '{name}': the pytorch backend cannot take BYTES tensors")
        if not array.flags.writeable:  # torch.from_numpy wants a writable buffer (wire decoding gives read-only)
            array = array.copy()
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.torch_device)

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        names = [t.name for t in self.config.output]
        if self.config.sequence_batching is not None:
            names += self.config.sequence_batching.server_outputs
        if isinstance(result, torch.Tensor):
            if len(names) != 1:
                raise BackendError(f"model '{self.config.name}': forward returned one tensor for outputs {names}")
            tensors = {names[0]: result}
        elif isinstance(result, Mapping):
            tensors = {str(k): v for k, v in result.items()}
        elif isinstance(result, (tuple, list)):
            indices = positional_indices(names)
            ordered = names
            if indices is not None and sorted(indices) == list(range(len(names))):
                ordered = [names[indices.index(i)] for i in range(len(names))]
            if len(result) < len(ordered):
                raise BackendError(
                    f"model '{self.config.name}': forward returned {len(result)} values for outputs {ordered}"
                )
            tensors = dict(zip(ordered, result, strict=False))
        else:
            raise BackendError(f"model '{self.config.name}': forward returned {type(result).__name__}, not tensors")
        out: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                out[name] = value.detach().cpu().numpy()
        return out

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        args = [self._to_tensor(n, inputs[n]) if n is not None and n in inputs else None for n in self._input_order]
        try:
            with torch.inference_mode():
                result = self.module(*args)
                outputs = self._outputs(result)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"model '{self.config.name}': PyTorch failed: {type(exc).__name__}: {exc}") from None
        return outputs

    def unload(self) -> None:
        del self.module
        if self.device.is_gpu:
            torch.cuda.empty_cache()
