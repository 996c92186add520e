"""Hugging Face ``transformers`` models: causal language models for generation, encoders for embeddings.

A version folder holds what ``save_pretrained`` writes (``config.json``, weights, tokenizer files), or
``parameters.model_path`` names such a folder. Nothing is ever downloaded: every load is local-files-only.
The task comes from the architecture in ``config.json`` (a ``...ForCausalLM``/``...LMHeadModel`` generates,
a speech-recognition architecture transcribes, a text-to-waveform one speaks, anything else embeds) unless
``parameters.task`` says which; the speech tasks live in ``speech_tasks.py`` and the modules it names.

Generation runs through the engine in ``server.scheduling.generation``: this backend owns the weights and the KV
cache memory and runs one step at a time. Embeddings are ordinary batches: mean-pooled, L2-normalised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from backends.base import GenerativeBackend, StepBatch, StepResult, declare_generation_io, model_folder, tensor
from backends.framework_lock import FRAMEWORK_LOCK
from backends.transformers.speech_tasks import SPEECH_TASKS, complete_speech_config, load_speech_model, speech_task
from backends.transformers.vision_language import VisionLanguageBackend, folder_is_vision_language, is_vision_language
from server.config import ModelConfig
from server.devices import Device
from server.errors import BackendError, ConfigError, InvalidInput, ModelLoadError

# No network: a model folder must hold everything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TASKS = ("generate", "embed", *SPEECH_TASKS)
DTYPES = ("float32", "float16", "bfloat16")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DEFAULT_EMBED_BATCH = 32
# ``from_pretrained`` builds models on the meta device through process-wide state, so two loads at once (the
# server loads models concurrently) can see each other's half-built modules; one at a time is safe.
# Shared with every backend (see backends/framework_lock.py): torch's lazy imports cross backends.
_LOAD_LOCK = FRAMEWORK_LOCK


def detect_task(config: ModelConfig, folder: Path) -> str:
    task = config.parameters.get("task", "")
    if task:
        if task not in TASKS:
            raise ConfigError(f"field 'parameters.task': expected one of {list(TASKS)}, got '{task}'")
        return task
    config_file = folder / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{config_file}: not found; a transformers model folder holds what save_pretrained writes"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: cannot be read: {exc}") from None
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ConfigError(
            f"{config_file}: no 'architectures' to tell the task from; set parameters.task to generate or embed"
        )
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures) or is_vision_language(hf_config):
        return "generate"
    return speech_task(architectures) or "embed"


def _model_process(config: ModelConfig, device: Device) -> bool:
    """``parameters.model_process``: auto (a worker process on a GPU, in-process on the CPU), true or false."""
    if config.parameters.get("model_process", "auto").strip().lower() == "auto":
        return device.is_gpu
    return config.bool_parameter("model_process")


def _leave_out_cudnn_attention(torch: Any) -> None:
    """Keep PyTorch's scaled-dot-product attention off its cuDNN kernel, in every process that runs these models.

    cuDNN's attention builds an execution plan for each new shape (37-83 ms a call on an H200), and language-model
    steps bring new shapes all the time (a prompt step's token count is whatever its prompts add up to; embedding
    batches are padded to their longest text). Measured with GPT-2 small in bfloat16: a prompt step took 46-743 ms
    with cuDNN eligible and 8-16 ms without it, and 16 streaming clients got 3,090 output tokens/s instead of 338.
    Flash and memory-efficient attention need no per-shape set-up and are as fast once set up. The switch is
    process-wide (PyTorch has no per-model one), so other models in the same process lose the cuDNN kernel too;
    nothing else changes for them.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


class TransformersBackend(GenerativeBackend):
    default_model_filename: ClassVar[str] = "config.json"
    supports_gpu: ClassVar[bool] = True

    @classmethod
    def model_path(cls, config: ModelConfig, version_dir: Path) -> Path:
        return model_folder(config, version_dir) / "config.json"

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        """Triton's LLM convention for generation, ``text_input`` → ``embedding`` for embeddings."""
        task = detect_task(config, model_folder(config, version_dir))
        dtype = config.parameters.get("dtype", "")
        if dtype and dtype not in DTYPES:
            raise ConfigError(f"field 'parameters.dtype': expected one of {list(DTYPES)}, got '{dtype}'")
        config = config.model_copy(deep=True)
        config.parameters["task"] = task
        if task in SPEECH_TASKS:
            return complete_speech_config(task, config)
        if task == "generate":
            if config.max_batch_size:
                raise ConfigError(
                    "field 'max_batch_size': a generating model batches in its engine (parameters.max_num_seqs); "
                    "leave max_batch_size at 0"
                )
            declare_generation_io(config)
        else:
            if not config.max_batch_size:
                config.max_batch_size = DEFAULT_EMBED_BATCH
            if not config.input:
                config.input = [tensor("text_input", "TYPE_STRING", [1])]
            if not config.output:
                config.output = [tensor("embedding", "TYPE_FP32", [-1]), tensor("token_count", "TYPE_INT32", [1])]
        return config

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        from transformers import AutoConfig

        folder = model_folder(config, version_dir)
        try:
            AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{folder / 'config.json'}: transformers cannot read it: {exc}") from None

    def __new__(cls, config: ModelConfig, version_dir: Path, device: Device) -> Any:
        """A vision-language model runs its own generation loop (``vision_language.py``), not the paged engine."""
        task = config.parameters.get("task") or detect_task(config, model_folder(config, version_dir))
        if cls is TransformersBackend and task == "generate":
            if folder_is_vision_language(model_folder(config, version_dir)):
                return VisionLanguageBackend(config, version_dir, device)
        return super().__new__(cls)

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from backends.transformers import paged_attention

        self._torch = torch
        self.task = config.parameters.get("task") or detect_task(config, model_folder(config, version_dir))
        folder = model_folder(config, version_dir)
        self.torch_device = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
        default_dtype = "bfloat16" if self.torch_device.type == "cuda" else "float32"
        self.dtype = getattr(torch, config.parameters.get("dtype") or default_dtype)
        self._worker: Any = None
        self._speech: Any = None
        if self.task in SPEECH_TASKS:
            with _LOAD_LOCK:
                self._speech = load_speech_model(self.task, config, folder, self.torch_device, self.dtype)
            return
        if self.task == "generate" and _model_process(config, device):
            self._start_worker(config, version_dir, device, folder)
            return
        _leave_out_cudnn_attention(torch)
        with _LOAD_LOCK:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                if self.task == "generate":
                    self.model = AutoModelForCausalLM.from_pretrained(
                        folder,
                        local_files_only=True,
                        dtype=self.dtype,
                        attn_implementation=paged_attention.ATTENTION_NAME,
                    )
                else:
                    self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
            except Exception as exc:
                raise ModelLoadError(
                    f"{folder}: transformers cannot load the model: {type(exc).__name__}: {exc}"
                ) from None
            self.model.to(self.torch_device).eval()
            if self.task == "generate" and config.bool_parameter("pack_linear_weights", default=True):
                from backends.transformers import packed_linear

                if packed_linear.can_pack(self.model, self.torch_device):
                    single_row = (
                        config.bool_parameter("single_row_weights")
                        if "single_row_weights" in config.parameters
                        else None
                    )
                    row_kernel = None
                    if config.bool_parameter("dense_row_kernel", default=True):
                        from backends.transformers import dense_kernel

                        row_kernel = dense_kernel.load()
                    packed_linear.pack_linear_layers(self.model, single_row, row_kernel)
            if self.task == "generate" and self.torch_device.type == "cpu":
                if config.bool_parameter("fused_activations", default=True):
                    from backends.transformers.fused_activations import fuse_tanh_gelu

                    fuse_tanh_gelu(self.model)
        self._paged = paged_attention
        self._cache: Any = None
        self._graphs: Any = None
        self._use_cuda_graphs = config.bool_parameter("cuda_graphs", default=True)
        text_config = self.model.config.get_text_config()
        self._layers = int(text_config.num_hidden_layers)
        heads = int(text_config.num_attention_heads)
        self._kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        self._head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        self._max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 2048)

    def _start_worker(self, config: ModelConfig, version_dir: Path, device: Device, folder: Path) -> None:
        """The model in a worker process (see ``worker.py``); only the tokenizer is loaded here."""
        from transformers import AutoTokenizer

        from backends.transformers.worker import ModelWorker

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{folder}: transformers cannot load the tokenizer: {type(exc).__name__}: {exc}"
            ) from None
        self._worker = ModelWorker(config, version_dir, device)
        self.model = None
        self._cache = None
        self._graphs = None

    # -- generation ----------------------------------------------------------------------------------------------
    @property
    def generates(self) -> bool:
        return self.task == "generate"

    @property
    def max_model_len(self) -> int:
        if self._worker is not None:
            return int(self._worker.info["max_model_len"])
        return self._max_positions

    @property
    def eos_token_ids(self) -> list[int]:
        if self._worker is not None:
            return list(self._worker.info["eos_token_ids"])
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    @property
    def vocab_size(self) -> int:
        if self._worker is not None:
            return int(self._worker.info.get("vocab_size") or len(self.tokenizer))
        return int(self.model.config.get_text_config().vocab_size)

    def kv_bytes_per_token(self) -> int:
        if self._worker is not None:
            return int(self._worker.info["kv_bytes_per_token"])
        element = self._torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self._layers * self._kv_heads * self._head_dim * element

    def allocate_kv_cache(self, num_slots: int, max_num_seqs: int, max_model_len: int) -> None:
        if self._worker is not None:
            self._worker.allocate_kv_cache(num_slots, max_num_seqs, max_model_len)
            return
        # One slot more than the engine hands out: the scratch slot that padded graph rows write to.
        self._cache = self._paged.PagedKVCache(
            self._layers, num_slots + 1, self._kv_heads, self._head_dim, self.dtype, self.torch_device
        )
        if (
            self.torch_device.type == "cpu"
            and self.dtype == self._torch.float32
            and self.config.bool_parameter("decode_attention_kernel", default=True)
        ):
            from backends.transformers import decode_kernel

            self._cache.decode_kernel = decode_kernel.load()
        self._graphs = None
        if self.torch_device.type == "cuda" and self._use_cuda_graphs:
            from backends.transformers.cuda_graphs import DecodeGraphs

            self._graphs = DecodeGraphs(
                self._run_model,
                self._cache,
                scratch_slot=num_slots,
                max_batch=max_num_seqs,
                max_context=max_model_len,
                device=self.torch_device,
            )
            self._graphs.capture_all()

    def _run_model(self, step: Any) -> Any:
        with self._torch.inference_mode():
            # Logits only where the engine samples (the model's own head, so its final scaling applies).
            output = self.model(
                input_ids=step.input_ids,
                position_ids=step.position_ids,
                use_cache=False,
                logits_to_keep=step.logits_to_keep,
                **{self._paged.STEP_ARGUMENT: step},
            )
        return output.logits[0]

    def forward(self, batch: StepBatch) -> StepResult:
        if self._worker is not None:
            return self._worker.forward(batch)  # type: ignore[no-any-return]
        if self._cache is None:
            raise BackendError(f"model '{self.config.name}': the KV cache was not allocated")
        prompt_logits: list[Any] = []
        if batch.prompt_logit_rows:
            logits, prompt_logits = self._run_keeping_prompt_logits(batch)
        elif batch.verify_rows:
            logits, drafts_argmax = self._run_verifying(batch)
        elif self._graphs is not None and self._graphs.fits(batch):
            logits = self._graphs.run(batch)
        else:
            logits = self._run_model(self._paged.StepTensors.build(batch, self._cache, self.torch_device))
        if not batch.sample_rows:
            return StepResult([], prompt_logits=prompt_logits)
        rows = logits if len(batch.sample_rows) == len(batch.token_ids) else logits[batch.sample_rows]
        # ``cpu()`` lets other threads run while the device finishes the step; ``tolist`` alone would hold the GIL.
        argmax = rows.argmax(dim=-1).cpu().tolist()
        full = logits[batch.full_rows].float().cpu() if batch.full_rows else None
        verify: list[list[int]] = []
        if batch.verify_rows:
            last = dict(zip(batch.sample_rows, argmax, strict=True))
            verify = [[*drafts, last[row]] for row, drafts in zip(batch.verify_rows, drafts_argmax, strict=True)]
        return StepResult(argmax, full, prompt_logits, verify)

    def _run_verifying(self, batch: StepBatch) -> tuple[Any, list[list[int]]]:
        """A step with draft tokens: the model's head also runs at each draft's predecessor (only there, not at
        every token of the step), and their argmax comes back per verified row."""
        import dataclasses

        step = self._paged.StepTensors.build(batch, self._cache, self.torch_device)
        last = step.logits_to_keep
        ends = last.tolist()
        spans = [(ends[row] - len(batch.token_ids[row]) + 1, ends[row]) for row in batch.verify_rows]
        extra = [position for first, end in spans for position in range(first, end)]
        keep = self._torch.cat([last, self._torch.tensor(extra, dtype=last.dtype, device=last.device)])
        logits = self._run_model(dataclasses.replace(step, logits_to_keep=keep))
        count = len(batch.token_ids)
        predicted = logits[count:].argmax(dim=-1).cpu().tolist()
        per_row, offset = [], 0
        for first, end in spans:
            per_row.append(predicted[offset : offset + end - first])
            offset += end - first
        return logits[:count], per_row

    def _run_keeping_prompt_logits(self, batch: StepBatch) -> tuple[Any, list[Any]]:
        """A step that keeps the logits of every new token (the head runs over all of them, not only the last of
        each sequence): the usual last-token rows, and each of ``prompt_logit_rows``' rows on the host."""
        import dataclasses

        step = self._paged.StepTensors.build(batch, self._cache, self.torch_device)
        last = step.logits_to_keep
        every = self._run_model(
            dataclasses.replace(step, logits_to_keep=self._torch.arange(step.input_ids.shape[1], device=last.device))
        )
        ends = last.tolist()
        prompt = [
            every[ends[row] - len(batch.token_ids[row]) + 1 : ends[row] + 1].float().cpu()
            for row in batch.prompt_logit_rows
        ]
        return every[last], prompt

    # -- embeddings ----------------------------------------------------------------------------------------------
    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        if self._speech is not None:
            return self._speech.execute(inputs, output_names)  # type: ignore[no-any-return]
        if self.task == "generate":
            return super().execute(inputs, output_names)
        texts = []
        for item in inputs["text_input"].reshape(-1):
            try:
                texts.append(item.decode() if isinstance(item, bytes) else str(item))
            except UnicodeDecodeError:
                raise InvalidInput("input 'text_input' is not valid UTF-8") from None
        torch = self._torch
        limit = min(self._max_positions, getattr(self.tokenizer, "model_max_length", self._max_positions))
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        encoded = {k: v.to(self.torch_device) for k, v in encoded.items()}
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        counts = encoded["attention_mask"].sum(dim=1, keepdim=True).to(torch.int32)
        return {"embedding": pooled.cpu().numpy(), "token_count": counts.cpu().numpy()}

    def unload(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            return
        self._speech = None
        self._cache = None
        self.model = None
        if self.torch_device.type == "cuda":
            self._torch.cuda.empty_cache()
