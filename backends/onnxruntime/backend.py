"""Runs ``model.onnx`` in an ONNX Runtime session on the CPU or on one CUDA device.

Session options come from config ``parameters`` so they can be tuned per model without code:
``intra_op_thread_count``, ``inter_op_thread_count``, ``graph_optimization_level`` (disable/basic/extended/all),
``execution_mode`` (sequential/parallel), ``enable_mem_pattern`` and ``cudnn_conv_algo_search``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from backends.base import Backend
from server.config import ModelConfig, TensorConfig
from server.devices import Device
from server.errors import BackendError, ConfigError, InvalidInput, ModelLoadError
from server.protocol.datatypes import WIRE_TO_CONFIG

# ONNX tensor element type names (as ORT reports them) -> config data types.
_ORT_TO_CONFIG: dict[str, str] = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(config: ModelConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    intra = config.int_parameter("intra_op_thread_count")
    if intra is not None:
        options.intra_op_num_threads = intra
    inter = config.int_parameter("inter_op_thread_count")
    if inter is not None:
        options.inter_op_num_threads = inter
    level = config.parameters.get("graph_optimization_level")
    if level is not None:
        if level.lower() not in _OPT_LEVELS:
            raise ConfigError(
                f"model '{config.name}': field 'parameters.graph_optimization_level': "
                f"expected one of {sorted(_OPT_LEVELS)}, got '{level}'"
            )
        options.graph_optimization_level = _OPT_LEVELS[level.lower()]
    mode = config.parameters.get("execution_mode")
    if mode is not None:
        if mode.lower() not in ("sequential", "parallel"):
            raise ConfigError(f"model '{config.name}': field 'parameters.execution_mode': sequential or parallel")
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if mode.lower() == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        )
    options.enable_mem_pattern = config.bool_parameter("enable_mem_pattern", default=True)
    return options


def _text_elements(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES elements as ``str``: ORT string tensors hold UTF-8 text and would store a bytes element as its repr."""
    if array.dtype != np.object_:
        return array
    try:
        return np.vectorize(lambda x: x.decode("utf-8") if isinstance(x, bytes) else x, otypes=[object])(array)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}': ONNX Runtime string tensors need UTF-8 text") from None


def _dims_from_ort(shape: list[object]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def check_config_matches(config: ModelConfig, session: ort.InferenceSession, path: Path) -> None:
    """Fail the load when ``input``/``output`` in the config do not describe the ONNX graph.

    A mismatch would otherwise load as READY and fail every request, or reject every request the metadata
    endpoint tells clients to send; the error names the field to fix.
    """
    source = path.parent.parent / "config.yaml"
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        graph = {arg.name: arg for arg in args}
        for position, tensor in enumerate(getattr(config, kind)):
            field = f"{kind}[{position}]"
            arg = graph.get(tensor.name)
            if arg is None:
                raise ConfigError(
                    f"{source}: field '{field}.name': '{tensor.name}' is not an {kind} of {path.name} "
                    f"(its {kind}s: {sorted(graph)})"
                )
            graph_type = _ORT_TO_CONFIG.get(arg.type, arg.type)
            if graph_type != tensor.data_type:
                raise ConfigError(
                    f"{source}: field '{field}.data_type': {tensor.data_type} but {path.name} has {graph_type} "
                    f"for '{tensor.name}'"
                )
            if tensor.allow_ragged_batch:
                continue  # the model sees every request's elements as one 1-D concatenation
            graph_dims = _dims_from_ort(list(arg.shape))
            if config.batching:
                if not graph_dims or graph_dims[0] != -1:
                    raise ConfigError(
                        f"{source}: field 'max_batch_size': {config.max_batch_size} but {kind} '{tensor.name}' of "
                        f"{path.name} has no variable leading (batch) dimension (shape {graph_dims})"
                    )
                graph_dims = graph_dims[1:]
            dims = tensor.reshape.shape if tensor.reshape is not None else tensor.dims
            dims_field = f"{field}.reshape.shape" if tensor.reshape is not None else f"{field}.dims"
            fits = len(dims) == len(graph_dims) and all(g in (-1, d) for d, g in zip(dims, graph_dims, strict=True))
            if not fits:
                batch = " after the batch dimension" if config.batching else ""
                raise ConfigError(
                    f"{source}: field '{dims_field}': {dims} does not fit {path.name}'s shape {graph_dims}{batch} "
                    f"for '{tensor.name}'"
                )
    known = {t.name for t in config.input} | {item.target_name[0] for item in config.batch_input}
    if config.sequence_batching is not None:
        known |= set(config.sequence_batching.server_inputs)
        _check_sequence_tensors(config, session, path)
    missing = [arg.name for arg in session.get_inputs() if arg.name not in known]
    if missing:
        raise ConfigError(f"{source}: field 'input': {path.name} needs inputs {missing} that the config leaves out")


def _check_sequence_tensors(config: ModelConfig, session: ort.InferenceSession, path: Path) -> None:
    """The control and state tensors the sequence batcher fills in must be in the graph with the configured type."""
    assert config.sequence_batching is not None
    source = path.parent.parent / "config.yaml"
    graph = {
        "input": {arg.name: arg for arg in session.get_inputs()},
        "output": {arg.name: arg for arg in session.get_outputs()},
    }
    expected: list[tuple[str, str, str, str]] = []
    for position, item in enumerate(config.sequence_batching.control_input):
        for control in item.control:
            data_type = WIRE_TO_CONFIG[control.wire_datatype]
            expected.append((f"sequence_batching.control_input[{position}].name", item.name, "input", data_type))
    for position, state in enumerate(config.sequence_batching.state):
        field = f"sequence_batching.state[{position}]"
        expected.append((f"{field}.input_name", state.input_name, "input", state.data_type))
        expected.append((f"{field}.output_name", state.output_name, "output", state.data_type))
    for field, name, kind, data_type in expected:
        arg = graph[kind].get(name)
        if arg is None:
            raise ConfigError(
                f"{source}: field '{field}': '{name}' is not an {kind} of {path.name} (its {kind}s: {sorted(graph[kind])})"
            )
        graph_type = _ORT_TO_CONFIG.get(arg.type, arg.type)
        if graph_type != data_type:
            raise ConfigError(f"{source}: field '{field}': {path.name} has {graph_type} for '{name}', not {data_type}")


class OnnxRuntimeBackend(Backend):
    default_model_filename: ClassVar[str] = "model.onnx"
    releases_gil: ClassVar[bool] = True
    supports_gpu: ClassVar[bool] = True
    runs_inline_when_cheap: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        path = self.model_path(config, version_dir)
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found")
        providers: list[object]
        if device.is_gpu:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    f"model '{config.name}': KIND_GPU instance needs onnxruntime's CUDAExecutionProvider, which "
                    f"this install lacks (available: {ort.get_available_providers()}); install onnxruntime-gpu "
                    "or use kind: KIND_CPU"
                )
            cuda_options = {"device_id": device.index}
            if "cudnn_conv_algo_search" in config.parameters:
                cuda_options["cudnn_conv_algo_search"] = config.parameters["cudnn_conv_algo_search"]
            providers = [("CUDAExecutionProvider", cuda_options)]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(config), providers=providers)
        except ModelLoadError:
            raise
        except Exception as exc:  # ORT raises its own exception types for every kind of bad file
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {exc}") from None
        check_config_matches(config, self.session, path)
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        path = cls.model_path(config, version_dir)
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {exc}") from None
        check_config_matches(config, session, path)

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        path = cls.model_path(config, version_dir)
        if config.input and config.output:
            return config
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found (needed to fill in inputs/outputs)")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {exc}") from None
        config = config.model_copy(deep=True)

        def describe(args: list[ort.NodeArg]) -> list[TensorConfig]:
            tensors = []
            for arg in args:
                data_type = _ORT_TO_CONFIG.get(arg.type)
                if data_type is None:
                    raise ModelLoadError(f"{path}: tensor '{arg.name}' has unsupported type {arg.type}")
                dims = _dims_from_ort(list(arg.shape))
                if config.max_batch_size > 0:
                    if not dims or dims[0] != -1:
                        raise ModelLoadError(
                            f"{path}: max_batch_size is {config.max_batch_size} but tensor '{arg.name}' has no "
                            "variable leading (batch) dimension"
                        )
                    dims = dims[1:]
                tensors.append(TensorConfig(name=arg.name, data_type=data_type, dims=dims))
            return tensors

        # Sequence control and state tensors are the server's, not the client's.
        sequence = config.sequence_batching
        server_inputs = set(sequence.server_inputs) if sequence is not None else set()
        server_outputs = set(sequence.server_outputs) if sequence is not None else set()
        if not config.input:
            config.input = describe([a for a in session.get_inputs() if a.name not in server_inputs])
        if not config.output:
            config.output = describe([a for a in session.get_outputs() if a.name not in server_outputs])
        return config

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        names = [n for n in output_names if n in self._output_names] or self._output_names
        feed = {name: _text_elements(name, inputs[name]) for name in self._input_names if name in inputs}
        try:
            results = self.session.run(names, feed)
        except Exception as exc:
            raise BackendError(f"model '{self.config.name}': ONNX Runtime failed: {exc}") from None
        return dict(zip(names, results, strict=True))

    def unload(self) -> None:
        del self.session
