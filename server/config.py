"""The model configuration schema: Triton's ``config.pbtxt`` field names, written as YAML.

Triton users should be able to translate a ``config.pbtxt`` into ``config.yaml`` field for field. Unknown fields
and wrong types are errors that name the file and the field, because a silently ignored typo (``max_batchsize``)
is the kind of mistake that costs an afternoon.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import ConfigError
from server.protocol.datatypes import CONFIG_DATATYPES, CONFIG_TO_WIRE

CONFIG_FILENAME = "config.yaml"
# Seconds a model version may take to load (start every instance, run its warm-up) unless
# ``parameters.load_timeout_secs`` says otherwise; a load that takes longer fails instead of hanging the server.
DEFAULT_LOAD_TIMEOUT_S = 300
LOAD_TIMEOUT_PARAMETER = "load_timeout_secs"


class FieldProblem(ValueError):
    """A check across several fields that still blames one of them, so the error names that field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Reshape(_Strict):
    shape: list[int]


def known_datatype(value: str) -> str:
    """A config ``data_type`` (``TYPE_FP32``, ``TYPE_STRING``, ...) checked against Triton's list."""
    if value not in CONFIG_DATATYPES:
        raise ValueError(f"unknown data_type '{value}'; expected one of {sorted(CONFIG_DATATYPES)}")
    return value


def valid_dims(value: list[int]) -> list[int]:
    """Config ``dims``: each a size, or -1 for a variable one."""
    if any(d == 0 or d < -1 for d in value):
        raise ValueError(f"dims {value}: each must be >= 1, or -1 for a variable size")
    return value


# Field types that carry their checks, for every model of the schema with a data_type and dims.
ConfigDatatype = Annotated[str, AfterValidator(known_datatype)]
Dims = Annotated[list[int], AfterValidator(valid_dims)]


class TensorConfig(_Strict):
    """One input or output tensor of a model. ``dims`` excludes the batch dimension when batching is on."""

    name: str = Field(min_length=1)
    data_type: ConfigDatatype
    dims: Dims
    reshape: Reshape | None = None
    optional: bool = False
    allow_ragged_batch: bool = False
    label_filename: str | None = None

    @property
    def wire_datatype(self) -> str:
        return CONFIG_TO_WIRE[self.data_type]


class InstanceKind(str, Enum):
    KIND_AUTO = "KIND_AUTO"
    KIND_CPU = "KIND_CPU"
    KIND_GPU = "KIND_GPU"
    KIND_MODEL = "KIND_MODEL"


class InstanceGroup(_Strict):
    """``count`` copies of the model per listed GPU (or ``count`` on the CPU)."""

    name: str | None = None
    count: int = Field(default=1, ge=1)
    kind: InstanceKind = InstanceKind.KIND_AUTO
    gpus: list[int] = Field(default_factory=list)

    @field_validator("gpus")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(g < 0 for g in value):
            raise ValueError("gpu ids must be non-negative")
        return value


class TimeoutAction(str, Enum):
    REJECT = "REJECT"
    DELAY = "DELAY"


class QueuePolicy(_Strict):
    """Triton's ``ModelQueuePolicy``: how long requests may wait and how many may wait."""

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_microseconds: int = Field(default=0, ge=0)
    allow_timeout_override: bool = False
    max_queue_size: int = Field(default=0, ge=0)


class DynamicBatching(_Strict):
    preferred_batch_size: list[int] = Field(default_factory=list)
    max_queue_delay_microseconds: int = Field(default=0, ge=0)
    preserve_ordering: bool = False
    priority_levels: int = Field(default=0, ge=0)
    default_priority_level: int = Field(default=0, ge=0)
    default_queue_policy: QueuePolicy = Field(default_factory=QueuePolicy)
    priority_queue_policy: dict[int, QueuePolicy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _levels_consistent(self) -> DynamicBatching:
        if any(size < 1 for size in self.preferred_batch_size):
            raise FieldProblem("preferred_batch_size", "entries must be >= 1")
        if self.priority_levels:
            if not 1 <= self.default_priority_level <= self.priority_levels:
                raise FieldProblem(
                    "default_priority_level",
                    f"must be between 1 and priority_levels ({self.priority_levels})",
                )
            bad = [level for level in self.priority_queue_policy if not 1 <= level <= self.priority_levels]
            if bad:
                raise FieldProblem(
                    "priority_queue_policy", f"levels {bad} are outside 1..priority_levels ({self.priority_levels})"
                )
        elif self.default_priority_level:
            raise FieldProblem(
                "default_priority_level",
                f"{self.default_priority_level} needs priority_levels > 0",
            )
        elif self.priority_queue_policy:
            raise FieldProblem(
                "priority_queue_policy", "default_priority_level and priority_queue_policy need priority_levels > 0"
            )
        return self


class ControlKind(str, Enum):
    CONTROL_SEQUENCE_START = "CONTROL_SEQUENCE_START"
    CONTROL_SEQUENCE_READY = "CONTROL_SEQUENCE_READY"
    CONTROL_SEQUENCE_END = "CONTROL_SEQUENCE_END"
    CONTROL_SEQUENCE_CORRID = "CONTROL_SEQUENCE_CORRID"


# The types Triton accepts for the correlation-id control tensor.
CORRID_DATATYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")
# Triton's default for ``max_sequence_idle_microseconds: 0``.
DEFAULT_SEQUENCE_IDLE_MICROSECONDS = 1_000_000


class SequenceControl(_Strict):
    """One signal the sequence batcher writes into a control input: a false/true pair, or the correlation id."""

    kind: ControlKind
    int32_false_true: list[int] = Field(default_factory=list)
    fp32_false_true: list[float] = Field(default_factory=list)
    bool_false_true: list[bool] = Field(default_factory=list)
    data_type: str | None = None

    @model_validator(mode="after")
    def _values_fit_kind(self) -> SequenceControl:
        lists = [k for k in ("int32_false_true", "fp32_false_true", "bool_false_true") if getattr(self, k)]
        if self.kind == ControlKind.CONTROL_SEQUENCE_CORRID:
            if lists:
                raise FieldProblem(lists[0], "CONTROL_SEQUENCE_CORRID takes data_type, not false/true values")
            if self.data_type not in CORRID_DATATYPES:
                raise FieldProblem("data_type", f"CONTROL_SEQUENCE_CORRID needs data_type one of {CORRID_DATATYPES}")
            return self
        if self.data_type is not None:
            raise FieldProblem("data_type", f"only CONTROL_SEQUENCE_CORRID takes a data_type, not {self.kind.value}")
        if len(lists) != 1:
            raise ValueError(
                f"{self.kind.value} needs exactly one of int32_false_true, fp32_false_true, bool_false_true"
            )
        if len(getattr(self, lists[0])) != 2:
            raise FieldProblem(lists[0], "expected two values: [false, true]")
        return self

    @property
    def wire_datatype(self) -> str:
        """The datatype of the tensor this control fills in."""
        if self.data_type is not None:
            return CONFIG_TO_WIRE[self.data_type]
        if self.int32_false_true:
            return "INT32"
        return "FP32" if self.fp32_false_true else "BOOL"

    def value(self, flag: bool) -> int | float | bool:
        """The value written for a false or true signal (START, END, READY)."""
        pair: list[Any] = self.int32_false_true or self.fp32_false_true or self.bool_false_true
        return pair[1] if flag else pair[0]


class ControlInput(_Strict):
    name: str = Field(min_length=1)
    control: list[SequenceControl] = Field(min_length=1)


class InitialState(_Strict):
    """The value of a state on a sequence's first request: zeros, or row-major data from a file in the model
    folder's ``initial_state/`` directory (as in Triton)."""

    data_type: str
    dims: list[int]
    zero_data: bool | None = None
    data_file: str | None = None
    name: str = ""

    @field_validator("data_type")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in CONFIG_DATATYPES:
            raise ValueError(f"unknown data_type '{value}'; expected one of {sorted(CONFIG_DATATYPES)}")
        return value

    @field_validator("dims")
    @classmethod
    def _fixed_dims(cls, value: list[int]) -> list[int]:
        if any(d < 1 for d in value):
            raise ValueError(f"dims {value}: an initial state needs a fixed shape (each dim >= 1)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> InitialState:
        if bool(self.zero_data) == bool(self.data_file):
            raise ValueError("set exactly one of zero_data: true or data_file")
        return self


class SequenceState(_Strict):
    """Triton's implicit state: the server feeds ``output_name`` of one request back as ``input_name`` of the
    sequence's next request, so neither is a client-visible tensor."""

    input_name: str = Field(min_length=1)
    output_name: str = Field(min_length=1)
    data_type: ConfigDatatype
    dims: Dims
    initial_state: list[InitialState] = Field(default_factory=list, max_length=1)
    use_same_buffer_for_input_output: bool = False
    use_growable_memory: bool = False

    @field_validator("initial_state", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        """A pbtxt ``initial_state: { ... }`` reads as one mapping; Triton's field is a list of them."""
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _initial_state_fits(self) -> SequenceState:
        for initial in self.initial_state:
            if initial.data_type != self.data_type:
                raise FieldProblem(
                    "initial_state[0].data_type", f"{initial.data_type} differs from the state's {self.data_type}"
                )
            fits = len(initial.dims) == len(self.dims) and all(
                d in (-1, i) for d, i in zip(self.dims, initial.dims, strict=True)
            )
            if not fits:
                raise FieldProblem("initial_state[0].dims", f"{initial.dims} does not fit the state's dims {self.dims}")
        return self

    @property
    def wire_datatype(self) -> str:
        return CONFIG_TO_WIRE[self.data_type]


class SequenceStrategyDirect(_Strict):
    max_queue_delay_microseconds: int = Field(default=0, ge=0)
    minimum_slot_utilization: float = Field(default=0.0, ge=0.0, le=1.0)


class SequenceStrategyOldest(_Strict):
    max_candidate_sequences: int = Field(default=0, ge=0)
    preferred_batch_size: list[int] = Field(default_factory=list)
    max_queue_delay_microseconds: int = Field(default=0, ge=0)
    preserve_ordering: bool = False

    @field_validator("preferred_batch_size")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError("entries must be >= 1")
        return value


class SequenceBatching(_Strict):
    """Triton's ``sequence_batching``: every request of one sequence (correlation id) reaches the same batch slot
    in order, with control inputs and implicit state filled in by the server."""

    max_sequence_idle_microseconds: int = Field(default=0, ge=0)
    direct: SequenceStrategyDirect | None = None
    oldest: SequenceStrategyOldest | None = None
    control_input: list[ControlInput] = Field(default_factory=list)
    state: list[SequenceState] = Field(default_factory=list)
    iterative_sequence: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SequenceBatching:
        if self.direct is not None and self.oldest is not None:
            raise FieldProblem("oldest", "choose one strategy: direct or oldest")
        if self.iterative_sequence:
            raise FieldProblem("iterative_sequence", "iterative sequences are not supported")
        seen_kinds: set[ControlKind] = set()
        seen_names: set[str] = set()
        for position, item in enumerate(self.control_input):
            if item.name in seen_names:
                raise FieldProblem(f"control_input[{position}].name", f"'{item.name}' is named twice")
            seen_names.add(item.name)
            for index, control in enumerate(item.control):
                if control.kind in seen_kinds:
                    raise FieldProblem(
                        f"control_input[{position}].control[{index}].kind", f"{control.kind.value} is given twice"
                    )
                seen_kinds.add(control.kind)
            if len(item.control) > 1:
                raise FieldProblem(f"control_input[{position}].control", "one control per control input")
        outputs: set[str] = set()
        for position, state in enumerate(self.state):
            if state.input_name in seen_names:
                raise FieldProblem(
                    f"state[{position}].input_name", f"'{state.input_name}' is already a control or state input"
                )
            seen_names.add(state.input_name)
            if state.output_name in outputs:
                raise FieldProblem(f"state[{position}].output_name", f"'{state.output_name}' is named twice")
            outputs.add(state.output_name)
        return self

    @property
    def idle_microseconds(self) -> int:
        return self.max_sequence_idle_microseconds or DEFAULT_SEQUENCE_IDLE_MICROSECONDS

    @property
    def server_inputs(self) -> list[str]:
        """Model inputs the server fills in (controls, then states): never sent by clients nor shown to them."""
        return [c.name for c in self.control_input] + [s.input_name for s in self.state]

    @property
    def server_outputs(self) -> list[str]:
        """Model outputs the server keeps (new states): never sent to clients."""
        return [s.output_name for s in self.state]


class BatchInputKind(str, Enum):
    BATCH_ELEMENT_COUNT = "BATCH_ELEMENT_COUNT"
    BATCH_ACCUMULATED_ELEMENT_COUNT = "BATCH_ACCUMULATED_ELEMENT_COUNT"
    BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO = "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO"


class BatchInput(_Strict):
    """Triton's ``batch_input``: a tensor the server builds for each batch, e.g. where each request's part of a
    ragged (1-D concatenated) input ends, since the model cannot tell from the concatenation itself."""

    kind: BatchInputKind
    target_name: list[str] = Field(min_length=1, max_length=1)
    data_type: str
    source_input: list[str] = Field(min_length=1, max_length=1)

    @field_validator("data_type")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in CONFIG_DATATYPES or value in ("TYPE_STRING", "TYPE_BOOL"):
            raise ValueError(f"batch_input data_type must be numeric, got '{value}'")
        return value


class LatestPolicy(_Strict):
    num_versions: int = Field(default=1, ge=1)


class AllPolicy(_Strict):
    pass


class SpecificPolicy(_Strict):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Exactly one of ``latest``, ``all`` or ``specific``, as in Triton."""

    latest: LatestPolicy | None = None
    all: AllPolicy | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one of latest, all, specific (got {', '.join(chosen)})")
        if not chosen:
            self.latest = LatestPolicy()
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those present on disk, newest first."""
        ordered = sorted(available, reverse=True)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific.versions]
        assert self.latest is not None
        return ordered[: self.latest.num_versions]


class WarmupInput(_Strict):
    data_type: str
    dims: list[int]
    zero_data: bool | None = None
    random_data: bool | None = None
    input_data_file: str | None = None

    @field_validator("data_type")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in CONFIG_DATATYPES:
            raise ValueError(f"unknown data_type '{value}'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> WarmupInput:
        sources = [s for s in ("zero_data", "random_data", "input_data_file") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError("set exactly one of zero_data, random_data, input_data_file")
        return self


class ModelWarmup(_Strict):
    name: str
    batch_size: int = Field(default=1, ge=1)
    inputs: dict[str, WarmupInput]
    count: int = Field(default=1, ge=1)


class ModelTransactionPolicy(_Strict):
    """Triton's ``model_transaction_policy``: a decoupled model may send any number of responses per request."""

    decoupled: bool = False


class EnsembleStep(_Strict):
    """One model call of an ensemble, and how its tensors connect to the ensemble's tensors."""

    model_name: str = Field(min_length=1)
    model_version: int = Field(default=-1, ge=-1)
    # The step model's input name -> the ensemble tensor that feeds it.
    input_map: dict[str, str] = Field(default_factory=dict)
    # The step model's output name -> the ensemble tensor it produces.
    output_map: dict[str, str] = Field(default_factory=dict)


class EnsembleScheduling(_Strict):
    step: list[EnsembleStep] = Field(min_length=1)


class ResponseCacheSettings(_Strict):
    """Triton's ``response_cache``: whether this model's responses may be answered from the server's cache."""

    enable: bool = False


class ModelConfig(_Strict):
    """A model's ``config.yaml``; the folder name is the model name unless ``name`` says otherwise."""

    name: str = ""
    platform: str = ""
    backend: str = ""
    max_batch_size: int = Field(default=0, ge=0)
    input: list[TensorConfig] = Field(default_factory=list)
    output: list[TensorConfig] = Field(default_factory=list)
    instance_group: list[InstanceGroup] = Field(default_factory=list)
    dynamic_batching: DynamicBatching | None = None
    sequence_batching: SequenceBatching | None = None
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    parameters: dict[str, str] = Field(default_factory=dict)
    default_model_filename: str = ""
    model_warmup: list[ModelWarmup] = Field(default_factory=list)
    batch_input: list[BatchInput] = Field(default_factory=list)
    model_transaction_policy: ModelTransactionPolicy = Field(default_factory=ModelTransactionPolicy)
    ensemble_scheduling: EnsembleScheduling | None = None
    response_cache: ResponseCacheSettings | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _flatten_parameters(cls, value: Any) -> Any:
        """Accept Triton's ``{key: {string_value: "1"}}`` as well as plain ``{key: 1}``; a nested mapping or list
        (``speculative: {method: ngram, ...}``) is kept as its JSON text, for the backend or engine that reads it."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, dict) and set(item) == {"string_value"}:
                item = item["string_value"]
            elif isinstance(item, (dict, list)):
                item = json.dumps(item)
            if isinstance(item, bool):
                item = "true" if item else "false"
            if isinstance(item, (int, float)):
                item = str(item)
            flat[str(key)] = item
        return flat

    @model_validator(mode="after")
    def _batch_inputs_known(self) -> ModelConfig:
        names = {t.name for t in self.input}
        for item in self.batch_input:
            if self.input and item.source_input[0] not in names:
                raise ValueError(f"batch_input source_input '{item.source_input[0]}' is not an input")
            if item.target_name[0] in names:
                raise ValueError(f"batch_input target_name '{item.target_name[0]}' is also a client input")
        if self.batch_input and not self.max_batch_size:
            raise ValueError("batch_input needs max_batch_size > 0")
        return self

    @model_validator(mode="after")
    def _unique_tensor_names(self) -> ModelConfig:
        for kind in ("input", "output"):
            names = [t.name for t in getattr(self, kind)]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise FieldProblem(kind, f"duplicate {kind} names: {dupes}")
        # One name for an input and an output would make a response's tensors ambiguous with the request's.
        inputs = {t.name for t in self.input}
        for position, tensor in enumerate(self.output):
            if tensor.name in inputs:
                raise FieldProblem(f"output[{position}].name", f"'{tensor.name}' is also the name of an input")
        return self

    @model_validator(mode="after")
    def _sequence_batching_fits(self) -> ModelConfig:
        sequence = self.sequence_batching
        if sequence is None:
            return self
        if self.dynamic_batching is not None:
            raise FieldProblem("sequence_batching", "a model takes dynamic_batching or sequence_batching, not both")
        clients = {t.name for t in self.input} | {t.name for t in self.output}
        for position, item in enumerate(sequence.control_input):
            if item.name in clients:
                raise FieldProblem(
                    f"sequence_batching.control_input[{position}].name",
                    f"'{item.name}' is also a client input or output; the server fills in control inputs",
                )
        for position, state in enumerate(sequence.state):
            for field_name in ("input_name", "output_name"):
                name = getattr(state, field_name)
                if name in clients:
                    raise FieldProblem(
                        f"sequence_batching.state[{position}].{field_name}",
                        f"'{name}' is also a client input or output; the server keeps implicit state",
                    )
        if sequence.oldest is not None:
            too_big = [s for s in sequence.oldest.preferred_batch_size if s > max(1, self.max_batch_size)]
            if too_big:
                raise FieldProblem(
                    "sequence_batching.oldest.preferred_batch_size",
                    f"{too_big} larger than max_batch_size ({self.max_batch_size})",
                )
        return self

    @model_validator(mode="after")
    def _load_timeout_valid(self) -> ModelConfig:
        value = self.parameters.get(LOAD_TIMEOUT_PARAMETER)
        if value is not None and not (value.strip().isascii() and value.strip().isdigit() and int(value) >= 1):
            raise FieldProblem(
                f"parameters.{LOAD_TIMEOUT_PARAMETER}", f"expected a whole number of seconds >= 1, got '{value}'"
            )
        return self

    @model_validator(mode="after")
    def _preferred_sizes_fit(self) -> ModelConfig:
        if self.batching and self.dynamic_batching is not None:
            too_big = [s for s in self.dynamic_batching.preferred_batch_size if s > self.max_batch_size]
            if too_big:
                raise FieldProblem(
                    "dynamic_batching.preferred_batch_size",
                    f"{too_big} larger than max_batch_size ({self.max_batch_size})",
                )
        return self

    @model_validator(mode="after")
    def _ensemble_fields_agree(self) -> ModelConfig:
        if self.is_ensemble and self.ensemble_scheduling is None:
            raise FieldProblem("ensemble_scheduling", "platform 'ensemble' needs ensemble_scheduling with its steps")
        if not self.is_ensemble and self.ensemble_scheduling is not None:
            raise FieldProblem("ensemble_scheduling", f"needs platform: {ENSEMBLE_PLATFORM}")
        if self.is_ensemble and self.backend:
            raise FieldProblem("backend", "an ensemble runs other models and has no backend of its own")
        return self

    @model_validator(mode="before")
    @classmethod
    def _backend_from_platform(cls, data: Any) -> Any:
        """Triton lets ``platform: onnxruntime_onnx`` stand in for ``backend``; so do we."""
        if isinstance(data, dict) and not data.get("backend") and data.get("platform"):
            backend = PLATFORM_TO_BACKEND.get(str(data["platform"]))
            if backend:
                data = {**data, "backend": backend}
        return data

    def int_parameter(self, key: str, minimum: int = 0) -> int | None:
        """A backend option from ``parameters`` as an integer; None when absent."""
        if key not in self.parameters:
            return None
        try:
            value = int(self.parameters[key])
        except ValueError:
            raise ConfigError(f"model '{self.name}': field 'parameters.{key}': expected an integer") from None
        if value < minimum:
            raise ConfigError(f"model '{self.name}': field 'parameters.{key}': must be >= {minimum}")
        return value

    @property
    def load_timeout_s(self) -> int:
        """Seconds one version may take to load: ``parameters.load_timeout_secs``, else the server's default."""
        value = self.int_parameter(LOAD_TIMEOUT_PARAMETER, minimum=1)
        return DEFAULT_LOAD_TIMEOUT_S if value is None else value

    def bool_parameter(self, key: str, default: bool = False) -> bool:
        """A backend option from ``parameters`` as a flag (true/false, 1/0, yes/no)."""
        value = self.parameters.get(key, str(default)).strip().lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"model '{self.name}': field 'parameters.{key}': expected true or false, got '{value}'")
        return value in ("true", "1", "yes")

    def input_by_name(self, name: str) -> TensorConfig | None:
        return next((t for t in self.input if t.name == name), None)

    def output_by_name(self, name: str) -> TensorConfig | None:
        return next((t for t in self.output if t.name == name), None)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    @property
    def is_ensemble(self) -> bool:
        return self.platform == ENSEMBLE_PLATFORM

    @property
    def cacheable(self) -> bool:
        """Whether responses may come from the response cache: asked for with ``response_cache.enable``.

        A model whose answer depends on more than the request (sequence batching with its per-sequence state,
        decoupled models that stream several responses) must never be cached; this is the one place that says
        so, and any such field added to the schema must be checked here.
        """
        if self.response_cache is None or not self.response_cache.enable:
            return False
        if getattr(self, "sequence_batching", None) is not None:
            return False
        return not getattr(getattr(self, "model_transaction_policy", None), "decoupled", False)

    def to_json(self) -> dict[str, Any]:
        """The config as Triton's JSON model-config shape (what ``/v2/models/{m}/config`` returns)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["parameters"] = {k: {"string_value": v} for k, v in self.parameters.items()}
        return data


ENSEMBLE_PLATFORM = "ensemble"

PLATFORM_TO_BACKEND: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
}


def _format_location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def format_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if p not in ("function-after", "function-before"))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        elif item["type"] == "value_error":
            cause = item.get("ctx", {}).get("error")
            msg = str(cause) if cause is not None else msg.removeprefix("Value error, ")
            if isinstance(cause, FieldProblem):
                loc += tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", cause.field))
        problems.append(f"field '{_format_location(loc)}': {msg}")
    return f"{source}: " + "; ".join(problems)


def parse_model_config(data: Any, source: str, model_name: str) -> ModelConfig:
    """Validate a config mapping; ``source`` names where it came from in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    if config.name and config.name != model_name:
        raise ConfigError(f"{source}: field 'name': '{config.name}' does not match the model folder '{model_name}'")
    config.name = model_name
    return config


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/config.yaml``; a missing file means "all defaults, auto-complete the rest"."""
    path = model_dir / CONFIG_FILENAME
    if not path.exists():
        return parse_model_config({}, str(path), model_dir.name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a config must be a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_model_config(data, str(path), model_dir.name)
