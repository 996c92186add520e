"""Vision-language models (``AutoModelForImageTextToText``: SmolVLM/Idefics3, Qwen2-VL, LLaVA...) served through
transformers' own ``generate``.

ModelDock's paged engine takes token ids only, so a model that reads images gets an engine of its own: an
``EngineBackend`` whose worker thread takes the requests waiting when it is free, batches those that share their
sampling settings into one ``generate`` call (prompts left-padded, each row's images beside it), and streams each
row's tokens back as they come through a streamer. Rows end on their own (end of sequence, a stop string, a client
that left) while the rest of the batch goes on.

Images come as OpenAI ``image_url`` content parts, decoded under the operator's limits (remote URLs, image size,
images per request) by ``server.protocol.chat_images``, as for ``backend: vllm``.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import EngineBackend
from server.config import ModelConfig
from server.devices import Device
from server.errors import InvalidInput, ModelLoadError, ModelNotReady
from server.protocol.chat_images import ImageLimits, decode_message_images
from server.protocol.generation import GenerateRequest, GenerationOutput, SamplingParams

DEFAULT_MAX_NUM_SEQS = 8
# Sampling fields this engine does not offer, each refused by name rather than ignored.
_UNOFFERED = ("logprobs", "prompt_logprobs", "structured_outputs", "logit_bias", "stop_token_ids")


def is_vision_language(hf_config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a model that reads images and writes text (transformers' own table of
    image-text-to-text architectures, so new families work as transformers adds them)."""
    from transformers.models.auto import modeling_auto

    architectures = hf_config.get("architectures") or []
    known = set(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    return "vision_config" in hf_config and any(name in known for name in architectures)


def folder_is_vision_language(folder: Path) -> bool:
    try:
        return is_vision_language(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def _sampling_key(sampling: SamplingParams) -> tuple[Any, ...]:
    """Requests batch together only when one ``generate`` call can serve them all."""
    return (
        sampling.greedy,
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
        sampling.repetition_penalty,
        sampling.seed,
        sampling.max_tokens,
        sampling.min_tokens,
        sampling.ignore_eos,
    )


@dataclass(eq=False)
class _Job:
    """One request on its way through the worker: what the model reads, and where its outputs go."""

    prompt: str
    images: list[Any]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[GenerationOutput | BaseException]
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def send(self, item: GenerationOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class VisionLanguageBackend(EngineBackend):
    """One vision-language model on one device, with its own batching generation loop."""

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from backends.base import model_folder
        from backends.transformers.backend import _LOAD_LOCK

        self._torch = torch
        folder = model_folder(config, version_dir)
        self.torch_device = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
        default_dtype = "bfloat16" if device.is_gpu else "float32"
        dtype = getattr(torch, config.parameters.get("dtype") or default_dtype)
        with _LOAD_LOCK:
            try:
                self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
                self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=dtype)
            except Exception as exc:
                raise ModelLoadError(
                    f"{folder}: transformers cannot load the vision-language model: {type(exc).__name__}: {exc}"
                ) from None
            self.model.to(self.torch_device).eval()
        self.tokenizer = self.processor.tokenizer
        # Prompts of one batch end where their answers start.
        self.tokenizer.padding_side = "left"
        text_config = self.model.config.get_text_config()
        self._max_model_len = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._max_num_seqs = config.int_parameter("max_num_seqs", minimum=1) or DEFAULT_MAX_NUM_SEQS
        self._image_limits = ImageLimits.from_parameters(config.parameters, config.name)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: list[_Job] = []
        self._in_flight = 0
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name=f"vlm-{config.name}", daemon=True)
        self._worker.start()

    # -- EngineBackend ------------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def load(self) -> int:
        return self._in_flight

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        if self._stopped:
            raise ModelNotReady(f"model '{self.config.name}' is unloading")
        self._check_request(request)
        prompt, images = await asyncio.to_thread(self._prompt_and_images, request)
        loop = asyncio.get_running_loop()
        job = _Job(prompt, images, request.sampling, loop, asyncio.Queue())
        self._in_flight += 1
        self._jobs.put(job)
        try:
            while True:
                item = await job.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # A client that leaves ends its row; the rest of its batch goes on.
            job.cancelled = True
            self._in_flight -= 1

    def stop(self) -> None:
        self._stopped = True
        self._jobs.put(None)
        self._worker.join()

    def unload(self) -> None:
        self.model = None
        if self.torch_device.type == "cuda":
            self._torch.cuda.empty_cache()

    # -- requests -----------------------------------------------------------------------------------------------
    def _check_request(self, request: GenerateRequest) -> None:
        name = self.config.name
        sampling = request.sampling
        for field_name in _UNOFFERED:
            value = getattr(sampling, field_name)
            # ``logprobs`` 0 asks for the chosen tokens' log-probabilities, so only None means "not asked".
            if value is not None and value != [] and value != {}:
                raise InvalidInput(f"model '{name}' (a vision-language model) does not offer '{field_name}'")
        if sampling.presence_penalty or sampling.frequency_penalty:
            raise InvalidInput(
                f"model '{name}' (a vision-language model) does not offer 'presence_penalty' or 'frequency_penalty'"
            )
        if request.tools:
            raise InvalidInput(f"model '{name}' (a vision-language model) does not offer 'tools'")
        if request.adapter:
            raise InvalidInput(f"model '{name}' has no adapters")
        if request.prompt_token_ids is not None:
            raise InvalidInput(f"model '{name}' (a vision-language model) takes text prompts, not token ids")

    def _prompt_and_images(self, request: GenerateRequest) -> tuple[str, list[Any]]:
        """The prompt text (the processor's chat template for messages) and the images it refers to, in order."""
        if request.messages is None:
            return request.prompt or "", []
        messages, images = decode_message_images(request.messages, self._image_limits, self.config.name)
        kwargs = dict(request.chat_template_kwargs or {})
        kwargs.setdefault("add_generation_prompt", True)
        try:
            prompt = self.processor.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:  # a template error is the messages' fault (roles, content shapes)
            raise InvalidInput(f"messages cannot be rendered with the chat template: {exc}") from None
        return prompt, images

    # -- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._waiting:
                job = self._jobs.get()
                if job is None:
                    return
                self._waiting.append(job)
            while True:  # everything that arrived meanwhile joins the choice of the next batch
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._fail_waiting()
                    return
                self._waiting.append(job)
            self._waiting = [job for job in self._waiting if not job.cancelled]
            if not self._waiting:
                continue
            first = self._waiting[0]
            key = (_sampling_key(first.sampling), bool(first.images))
            batch = [j for j in self._waiting if (_sampling_key(j.sampling), bool(j.images)) == key]
            batch = batch[: self._max_num_seqs]
            self._waiting = [j for j in self._waiting if j not in batch]
            self._report_queue(len(batch))
            try:
                self._generate(batch)
            except InvalidInput as exc:
                for job in batch:
                    job.send(exc)
            except Exception as exc:  # a model failure fails this batch, not the engine
                from server.errors import BackendError

                error = BackendError(f"model '{self.config.name}': {type(exc).__name__}: {exc}")
                for job in batch:
                    job.send(error)
            self._report_queue(0)

    def _fail_waiting(self) -> None:
        for job in self._waiting:
            job.send(ModelNotReady(f"model '{self.config.name}' is unloading"))
        self._waiting = []

    def _report_queue(self, running: int) -> None:
        if self.stats is not None:
            self.stats.update_queue(running, len(self._waiting) + self._jobs.qsize())

    def _generate(self, batch: list[_Job]) -> None:
        torch = self._torch
        images = [job.images for job in batch] if batch[0].images else None
        try:
            inputs = self.processor(
                text=[job.prompt for job in batch], images=images, padding=True, return_tensors="pt"
            )
        except ValueError as exc:  # the processor's word for a prompt whose image tokens do not match its images
            raise InvalidInput(f"model '{self.config.name}': the prompt and its images do not fit: {exc}") from None
        inputs = inputs.to(self.torch_device)
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_tokens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        room = self._max_model_len - prompt_len
        if room < 1:
            raise InvalidInput(
                f"model '{self.config.name}': the prompt takes {prompt_len} tokens of the model's {self._max_model_len}"
            )
        sampling = batch[0].sampling
        max_new = min(sampling.max_tokens or room, room)
        streamer = _RowStreamer(self, batch, prompt_tokens)
        arguments: dict[str, Any] = {
            "max_new_tokens": max_new,
            "min_new_tokens": sampling.min_tokens or None,
            "do_sample": not sampling.greedy,
            "repetition_penalty": sampling.repetition_penalty,
            "streamer": streamer,
            "stopping_criteria": [streamer.stopping],
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling.ignore_eos:
            arguments["eos_token_id"] = None
        if not sampling.greedy:
            arguments.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            self.model.generate(**inputs, **arguments)
        streamer.finish_all("length")


class _RowStreamer:
    """transformers' streamer interface for a batch: each step's new token per row goes to that row's request."""

    def __init__(self, backend: VisionLanguageBackend, batch: list[_Job], prompt_tokens: list[int]) -> None:
        import torch
        from transformers import StoppingCriteria

        self.backend = backend
        self.batch = batch
        self.prompt_tokens = prompt_tokens
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.sent_text = ["" for _ in batch]
        self.done = [False for _ in batch]
        self.last_time = [job.arrival for job in batch]
        self._prompt_seen = False
        streamer = self

        class RowsDone(StoppingCriteria):
            """A row stops once it has ended here (stop string, client gone); generate pads it from then on."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                for i, job in enumerate(streamer.batch):
                    if job.cancelled and not streamer.done[i]:
                        streamer.done[i] = True
                return torch.tensor(streamer.done, device=input_ids.device)

        self.stopping = RowsDone()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate hands the prompt over first
            self._prompt_seen = True
            return
        stats = self.backend.stats
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            job = self.batch[i]
            sampling = job.sampling
            now = time.monotonic()
            if stats is not None:
                if self.tokens[i]:
                    stats.record_output_token(now - self.last_time[i])
                else:
                    stats.record_first_token(now - job.arrival, self.prompt_tokens[i])
            self.last_time[i] = now
            if token in self.backend._eos and not sampling.ignore_eos and len(self.tokens[i]) >= sampling.min_tokens:
                self._finish(i, "stop", [])
                continue
            self.tokens[i].append(token)
            text = self.backend.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            stop_at = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            if stop_at >= 0:
                self._finish(i, "stop", [token], text[:stop_at])
                continue
            # Hold back an incomplete character until the bytes that finish it arrive.
            if text.endswith("\ufffd"):
                new = ""
            else:
                new, self.sent_text[i] = text[len(self.sent_text[i]) :], text
            job.send(
                GenerationOutput(
                    text=new,
                    token_ids=[token],
                    prompt_tokens=self.prompt_tokens[i],
                    completion_tokens=len(self.tokens[i]),
                )
            )

    def _finish(self, i: int, reason: str, token_ids: list[int], final_text: str | None = None) -> None:
        self.done[i] = True
        job = self.batch[i]
        if final_text is None:
            final_text = self.backend.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        rest = final_text[len(self.sent_text[i]) :] if final_text.startswith(self.sent_text[i]) else ""
        if self.backend.stats is not None:
            self.backend.stats.record_finished()
        job.send(
            GenerationOutput(
                text=rest,
                token_ids=token_ids,
                finished=True,
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=self.prompt_tokens[i],
                completion_tokens=len(self.tokens[i]),
            )
        )

    def end(self) -> None:
        """generate's last call; rows still open ran out of tokens (``finish_all`` closes them)."""

    def finish_all(self, reason: str) -> None:
        for i in range(len(self.batch)):
            if not self.done[i]:
                self._finish(i, reason, [])
