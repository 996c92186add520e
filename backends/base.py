"""The interface every backend implements, and how backends are found by name.

A backend is a class; the server creates one object per model instance (one copy of one version on one device)
and calls ``execute`` with a whole batch. Backends know nothing of HTTP, gRPC, queues or batching. Third parties
publish a backend by declaring an entry point in the ``modeldock.backends`` group whose name is what
``backend:`` in ``config.yaml`` refers to; ``backend: package.module:ClassName`` names a class directly, for a
backend that is importable but not installed as a distribution.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from backends.framework_lock import FRAMEWORK_LOCK
from server.config import ModelConfig, ModelTransactionPolicy, TensorConfig
from server.devices import Device
from server.errors import ModelLoadError
from server.extensions.generation_metrics import GenerationStats
from server.protocol.generation import GenerateRequest, GenerationOutput
from server.protocol.types import InferRequest

ENTRY_POINT_GROUP = "modeldock.backends"

# Built into this distribution; used when the package runs from a source tree without being installed.
_BUILTIN: dict[str, str] = {
    "onnxruntime": "backends.onnxruntime:OnnxRuntimeBackend",
    "pytorch": "backends.pytorch:PyTorchBackend",
    "python": "backends.python:PythonBackend",
    "tensorrt": "backends.tensorrt:TensorRTBackend",
    "transformers": "backends.transformers:TransformersBackend",
    "llamacpp": "backends.llamacpp:LlamaCppBackend",
    "vllm": "backends.vllm:VllmBackend",
    "diffusers": "backends.diffusers:DiffusersBackend",
}

# Built-in backends whose modules import no torch-family framework (see ``backend_class``).
_WITHOUT_TORCH = frozenset({"onnxruntime", "python", "tensorrt", "llamacpp"})


class Backend(ABC):
    """One loaded copy of a model version on one device."""

    #: File name looked for in a version folder when the config gives no ``default_model_filename``.
    default_model_filename: ClassVar[str] = "model"
    #: Other files a version folder may hold instead, looked for when the config gives no ``default_model_filename``.
    alternative_model_filenames: ClassVar[tuple[str, ...]] = ()
    #: Whether ``execute`` releases the GIL for most of its time; if not, instances run in worker processes.
    releases_gil: ClassVar[bool] = True
    #: Whether the backend accepts GPU instances at all.
    supports_gpu: ClassVar[bool] = False
    #: Whether ``apply_request_parameters`` does anything (kept off every other model's per-request path).
    reads_request_parameters: ClassVar[bool] = False
    #: Whether ``execute`` on a CPU instance only computes (no I/O, sleeps, locks or waits on anything else), so a
    #: batch its instance has measured at a few microseconds may run on the event loop instead of its thread.
    runs_inline_when_cheap: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self.config = config
        self.version_dir = version_dir
        self.device = device

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        """Fill in what the config leaves out (inputs, outputs) from the model file itself."""
        return config

    @classmethod  # noqa: B027 - optional hook: most backends have nothing to check beyond a load's own checks
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        """Check the model file against the completed config as a load would, without serving it.

        ``modeldock validate`` calls this so it reports what a load would report (a file the runtime cannot read,
        inputs that do not match the config); raise ``ModelLoadError`` naming the file and field.
        """

    @classmethod
    def model_path(cls, config: ModelConfig, version_dir: Path) -> Path:
        return version_dir / (config.default_model_filename or cls.default_model_filename)

    @classmethod  # noqa: B027 - optional hook: only backends with ``reads_request_parameters`` have one
    def apply_request_parameters(cls, config: ModelConfig, request: InferRequest) -> None:
        """Turn the request ``parameters`` this backend acts on into input tensors of ``request``, in place.

        Called when a request is admitted (for HTTP, gRPC and the OpenAI routes alike), before it is validated and
        queued: a batch carries only tensors, so a setting sent as a KServe parameter must become one to reach
        ``execute``. Raise ``InvalidInput`` naming the parameter for a bad value.
        """

    @abstractmethod
    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one batch. ``output_names`` lists the outputs the batch's requests need."""

    def unload(self) -> None:  # noqa: B027 - optional hook: most backends free everything when collected
        """Release memory and device resources; the object is not used afterwards."""


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One engine step: for each sequence, the tokens whose KV is not cached yet and where its KV lives.

    ``token_ids[i]`` are sequence ``i``'s new tokens: one for a sequence that is decoding, a prompt or a chunk of
    one for a sequence being prefilled. ``start[i]`` is the position of the first of them (the tokens before it are
    cached). Token ``p`` of sequence ``i`` lives in cache slot ``block_tables[i][p // block_size] * block_size + p %
    block_size``; the backend works out the slots itself, on its own device, instead of receiving one number per
    cached token.

    ``sample_rows`` are the sequences that get a next token this step (not those part-way through a prompt), and
    ``full_rows`` those among them whose whole row of logits the engine needs (sampling, penalties); the others
    take the row's argmax, which the backend works out where the logits are. ``prompt_logit_rows`` are sequences
    whose logits the engine needs at every new token, not only the last (a request's prompt log-probabilities).
    ``verify_rows`` are sequences whose new tokens end in draft tokens (speculative decoding): the engine needs the
    argmax after each of them, not only after the last.
    """

    token_ids: list[list[int]]
    start: list[int]
    block_tables: list[list[int]]
    block_size: int
    sample_rows: list[int]
    full_rows: list[int] = field(default_factory=list)
    prompt_logit_rows: list[int] = field(default_factory=list)
    verify_rows: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step gives the engine: the argmax token of each of ``sample_rows`` (in that order), and the float32
    logits of ``full_rows`` on the host (shape [len(full_rows), vocab]; None when there are none), and for each
    of ``prompt_logit_rows`` the float32 logits of all its new tokens on the host (shape [tokens, vocab]), and for
    each of ``verify_rows`` the argmax after every one of its new tokens (the last one's is also in ``argmax``)."""

    argmax: list[int]
    logits: Any = None
    prompt_logits: list[Any] = field(default_factory=list)
    verify_argmax: list[list[int]] = field(default_factory=list)


class GenerativeBackend(Backend):
    """A causal language model, driven token by token by the generation engine instead of batch by batch.

    The engine decides which sequences run in each step and which cache slots they own; the backend owns the
    tensors (weights and the KV cache memory) and runs the model. ``execute`` is not used for generation.
    """

    #: The tokenizer (a ``transformers`` tokenizer: ``encode``, ``decode``, ``apply_chat_template``).
    tokenizer: Any

    @property
    def generates(self) -> bool:
        """Whether this instance serves generation; a backend that can also serve plain batches may say no."""
        return True

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) the model can attend over."""

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a sequence unless a request says to ignore them."""

    @property
    def vocab_size(self) -> int:
        """The width of a logits row, which may exceed the tokenizer's vocabulary (padded embeddings); grammar
        masks and ``logit_bias`` checks use it."""
        return len(self.tokenizer)

    @abstractmethod
    def kv_bytes_per_token(self) -> int:
        """Cache memory one token takes across all layers, for sizing the cache from a memory budget."""

    @abstractmethod
    def allocate_kv_cache(self, num_slots: int, max_num_seqs: int, max_model_len: int) -> None:
        """Reserve cache memory for ``num_slots`` tokens; called once before the first step. The engine's limits
        come along for what a backend prepares per batch shape (CUDA graphs, say)."""

    @abstractmethod
    def forward(self, batch: StepBatch) -> StepResult:
        """Run one step: the KV of every new token goes to the cache, and the sampled rows' results come back."""

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        raise ModelLoadError(f"model '{self.config.name}' generates text: it runs through the generation engine")


def model_folder(config: ModelConfig, version_dir: Path) -> Path:
    """The folder a framework loads (a ``save_pretrained`` folder, say): ``parameters.model_path``, relative to the
    model folder unless absolute, or else the version folder itself."""
    named = config.parameters.get("model_path")
    if not named:
        return version_dir
    path = Path(named)
    return path if path.is_absolute() else version_dir.parent / path


def tensor(name: str, data_type: str, dims: list[int], optional: bool = False) -> TensorConfig:
    """One input or output, as a backend's ``auto_complete_config`` declares it."""
    return TensorConfig(name=name, data_type=data_type, dims=dims, optional=optional)


def declare_generation_io(config: ModelConfig) -> None:
    """Give a text-generating model Triton's LLM tensors (``text_input``, ``stream``, ``sampling_parameters``,
    ``exclude_input_in_output`` in; ``text_output`` out), decoupled, where its config names none: every engine
    (ModelDock's, vLLM, llama.cpp) then answers the same generate and infer requests. Changes ``config`` in place."""
    config.parameters["task"] = "generate"
    config.model_transaction_policy = ModelTransactionPolicy(decoupled=True)
    if not config.input:
        config.input = [
            tensor("text_input", "TYPE_STRING", [1]),
            tensor("stream", "TYPE_BOOL", [1], optional=True),
            tensor("sampling_parameters", "TYPE_STRING", [1], optional=True),
            tensor("exclude_input_in_output", "TYPE_BOOL", [1], optional=True),
        ]
    if not config.output:
        config.output = [tensor("text_output", "TYPE_STRING", [-1])]


class EngineBackend(Backend):
    """A language model served by a library that runs its own generation loop (vLLM, llama.cpp).

    Such a library schedules, batches and caches by itself, so it gets whole requests instead of engine steps: the
    backend turns a ``GenerateRequest`` into the library's call and the library's results into ``GenerationOutput``
    chunks. Everything above it (the OpenAI routes, the generate extension, gRPC streaming, metrics) treats it as it
    treats ModelDock's own engine. ``execute`` is not used for generation.
    """

    #: The model's tokenizer where the library exposes one (``encode``, ``decode``, ``apply_chat_template``).
    tokenizer: Any = None
    #: Where the backend records time to first token, tokens and queue sizes; set by the scheduler before use.
    stats: GenerationStats | None = None

    @property
    def generates(self) -> bool:
        return True

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """The longest sequence (prompt plus output) the model can attend over."""

    @property
    @abstractmethod
    def load(self) -> int:
        """Requests in flight, for choosing the least busy instance of a model."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        """Chunks of the completion as they are produced (an async generator); closing it aborts the request."""

    def stop(self) -> None:  # noqa: B027 - optional hook: called once every stream has ended, before unload
        """Stop taking requests and end the library's loop; called from a worker thread."""

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        raise ModelLoadError(f"model '{self.config.name}' generates text: it runs through its engine")


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``, via entry points first, then the built-in table."""
    if not name:
        raise ModelLoadError("field 'backend': no backend given (e.g. backend: onnxruntime)")
    target = None
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            target = ep.value
            break
    if target is None:
        target = _BUILTIN.get(name)
    if target is None and ":" in name:
        target = name
    if target is None:
        known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(_BUILTIN))
        raise ModelLoadError(f"field 'backend': unknown backend '{name}'; installed backends: {known}")
    module_name, _, attr = target.partition(":")
    try:
        # Backend modules import torch, transformers, diffusers...: one thread at a time. Those known to import none
        # of them skip the lock, so an ONNX model's load is not held up behind a torch import on another thread.
        with nullcontext() if name in _WITHOUT_TORCH else FRAMEWORK_LOCK:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"backend '{name}' is not available: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ModelLoadError(f"backend '{name}': {target} is not a Backend subclass")
    return cls


def import_user_module(path: Path, module_name: str) -> ModuleType:
    """Import a user's ``model.py`` from a version folder under a name unique to that model version.

    The unique name keeps two models (or two versions) that both ship ``model.py`` from replacing each other in
    ``sys.modules``; the version folder goes on the path so ``model.py`` can import modules shipped beside it.
    """
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelLoadError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from None
    return module
