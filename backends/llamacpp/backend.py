"""GGUF models through llama.cpp (``backend: llamacpp``): ``<model>/<version>/model.gguf``, served token by token.

Each instance (``instance_group``) is one ``llama_cpp.Llama``: one llama.cpp context with its own KV cache, driven
by a thread of its own, one request at a time (a context decodes one sequence; concurrency comes from instances).
A request waits in its instance's bounded queue (``parameters.max_queue_size``, default 16); when the least busy
instance's queue is full the request is refused at once with 503 instead of queueing without limit.

A request runs through ``Llama.generate``, llama.cpp's own loop: it reuses the KV of the longest prefix the previous
request shared (a chat's earlier turns), evaluates the rest of the prompt, and samples with llama.cpp's sampler
chain (see ``sampling.py``), under a GBNF grammar for structured outputs. Each token goes out as it is sampled; a
client that leaves (the stream is closed) stops the loop before the next token. Time to first token, tokens and
queue sizes go to the model's ``GenerationStats``, so Prometheus metrics and statistics read as for ModelDock's own
engine; a "step" here is one token of one request (the prompt's evaluation for the first).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import llama_cpp
import numpy as np

from backends.base import EngineBackend, declare_generation_io
from backends.llamacpp.sampling import LlamaSampling, llama_sampling
from backends.llamacpp.settings import LlamaCppSettings, parse_settings
from backends.llamacpp.text_stream import TextStream
from backends.llamacpp.tokenizer import GGUFTokenizer
from server.config import ModelConfig
from server.devices import Device
from server.errors import (
    BackendError,
    ConfigError,
    InvalidInput,
    ModelDockError,
    ModelLoadError,
    ModelNotReady,
    QueueFull,
)
from server.extensions.generation_metrics import GenerationStats
from server.protocol.generation import (
    FinishReason,
    GenerateRequest,
    GenerationOutput,
    Logprob,
    TokenLogprobs,
    outbox_chunks,
)
from server.protocol.prompts import allowed_new_tokens, prompt_token_ids

log = logging.getLogger(__name__)


class _QueueGauges:
    """Running and waiting requests summed over a model's instances: the instances share one ``GenerationStats``,
    whose gauges must show the model's totals, not whichever instance wrote last."""

    _lock = threading.Lock()
    _counts: weakref.WeakKeyDictionary[GenerationStats, dict[int, tuple[int, int]]] = weakref.WeakKeyDictionary()

    @classmethod
    def set(cls, stats: GenerationStats | None, instance: int, running: int, waiting: int) -> None:
        if stats is None:
            return
        with cls._lock:
            counts = cls._counts.setdefault(stats, {})
            counts[instance] = (running, waiting)
            stats.update_queue(sum(r for r, _ in counts.values()), sum(w for _, w in counts.values()))


@dataclass(eq=False)
class _Job:
    """One request on its way through an instance: built on the event loop, run on the instance's thread."""

    request: GenerateRequest
    sampling: LlamaSampling
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[GenerationOutput | BaseException]
    arrival: float
    cancelled: bool = False

    def send(self, item: GenerationOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the event loop closed while the request ran
            self.cancelled = True


class LlamaCppBackend(EngineBackend):
    default_model_filename: ClassVar[str] = "model.gguf"
    # Only a llama.cpp built with a GPU backend (CUDA, Metal, Vulkan...) offloads layers; a CPU build runs on CPUs.
    supports_gpu: ClassVar[bool] = bool(llama_cpp.llama_supports_gpu_offload())

    @classmethod
    def auto_complete_config(cls, config: ModelConfig, version_dir: Path) -> ModelConfig:
        """Triton's LLM convention (``text_input`` → ``text_output``, decoupled), as for ``backend: transformers``."""
        task = config.parameters.get("task", "generate")
        if task != "generate":
            raise ConfigError(f"field 'parameters.task': backend llamacpp generates text; got '{task}'")
        if config.max_batch_size:
            raise ConfigError(
                "field 'max_batch_size': llama.cpp runs one request per instance at a time (add instances in "
                "instance_group for concurrency); leave max_batch_size at 0"
            )
        config = config.model_copy(deep=True)
        declare_generation_io(config)
        return config

    @classmethod
    def check_model(cls, config: ModelConfig, version_dir: Path) -> None:
        """The parameters, and the GGUF file's header and vocabulary (``vocab_only``: no weights are read)."""
        parse_settings(config)
        path = cls.model_path(config, version_dir)
        llama = _open_llama(path, {"vocab_only": True})
        llama.close()

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        super().__init__(config, version_dir, device)
        self.settings: LlamaCppSettings = parse_settings(config, device.is_gpu, device.index)
        self._llama = _open_llama(self.model_path(config, version_dir), self.settings.llama_arguments)
        self.tokenizer = GGUFTokenizer(self._llama)
        self._n_ctx: int = self._llama.n_ctx()
        vocab = self._llama._model.vocab
        # The end-of-generation tokens (end of text, end of turn...), which ``min_tokens`` holds back.
        self._end_ids = np.array(
            [t for t in range(len(self.tokenizer)) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.intp
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Job] = deque()
        self._running: _Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"llamacpp-{config.name}", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._n_ctx

    @property
    def load(self) -> int:
        return len(self._waiting) + (self._running is not None)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        if self._stopping:
            raise ModelNotReady(f"model '{self.config.name}' is unloading")
        if request.adapter:
            raise InvalidInput(
                f"model '{self.config.name}' (backend llamacpp) serves no adapters; got '{request.adapter}'"
            )
        job = _Job(
            request=request,
            sampling=llama_sampling(request.sampling, self.settings.logits_all),
            loop=asyncio.get_running_loop(),
            outbox=asyncio.Queue(),
            arrival=time.monotonic(),
        )
        with self._wake:
            if len(self._waiting) >= self.settings.max_queue_size and (self._running is not None or self._waiting):
                raise QueueFull(
                    f"model '{self.config.name}': every instance has {self.settings.max_queue_size} requests waiting "
                    "(parameters.max_queue_size); retry later"
                )
            self._waiting.append(job)
            self._wake.notify()
        self._publish_queue()
        # Closed with this generator, so a caller that stops reading aborts at once, not when it is collected.
        async with aclosing(outbox_chunks(job.outbox, lambda: self._abort(job))) as chunks:
            async for item in chunks:
                yield item

    def _abort(self, job: _Job) -> None:
        with self._wake:
            job.cancelled = True
            queued = job in self._waiting
            if queued:
                self._waiting.remove(job)
        if self.stats is not None:
            self.stats.record_aborted(1)
        if queued:
            self._publish_queue()

    def stop(self) -> None:
        """End the instance's thread; requests still queued are failed (the scheduler drains first)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def unload(self) -> None:
        self.stop()
        self._llama.close()

    def _publish_queue(self) -> None:
        _QueueGauges.set(self.stats, id(self), int(self._running is not None), len(self._waiting))

    # -- the instance's thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting):
                    self._wake.wait()
                if self._stopping:
                    break
                job = self._waiting.popleft()
                self._running = job
            self._publish_queue()
            try:
                self._run(job)
            except ModelDockError as exc:
                job.send(exc)
            except Exception as exc:  # a llama.cpp failure fails this request, not the instance
                log.exception("model '%s': generation failed", self.config.name)
                job.send(BackendError(f"{type(exc).__name__}: {exc}"))
            finally:
                with self._wake:
                    self._running = None
                self._publish_queue()
        error = ModelNotReady(f"model '{self.config.name}' was unloaded")
        with self._wake:
            left, self._waiting = list(self._waiting), deque()
        for job in left:
            job.send(error)
        self._publish_queue()

    def _grammar(self, text: str | None) -> llama_cpp.LlamaGrammar | None:
        """The request's grammar, parsed once by llama.cpp first: an unparsable grammar gives no sampler at all,
        which the sampler chain would not survive, so it is refused here with a 400."""
        if text is None:
            return None
        vocab = self._llama._model.vocab
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not sampler:
            raise InvalidInput(
                "field 'structured_outputs': llama.cpp cannot parse the grammar (GBNF with a 'root' rule expected)"
            )
        llama_cpp.llama_sampler_free(sampler)
        return llama_cpp.LlamaGrammar.from_string(text, verbose=False)

    def _run(self, job: _Job) -> None:
        """Generate one request to its end, sending each token's text as it comes."""
        if job.cancelled:
            return
        request, sampling = job.request, job.request.sampling
        prompt_ids = prompt_token_ids(self.tokenizer, request, self.config.name)
        max_tokens = allowed_new_tokens(
            prompt_ids, sampling.max_tokens, self._n_ctx, self.config.name, "parameters.n_ctx"
        )
        grammar = self._grammar(job.sampling.grammar)
        llama = self._llama
        end_ids = set(sampling.stop_token_ids)
        stream = TextStream(sampling.stop)
        vocab_size = len(self.tokenizer)
        outside = [t for t in job.sampling.logit_bias if not 0 <= t < vocab_size]
        if outside:
            raise InvalidInput(
                f"field 'logit_bias': token ids {outside[:5]} are outside the vocabulary (0..{vocab_size - 1})"
            )
        processor = _logits_processor(job.sampling.logit_bias, sampling.min_tokens, len(prompt_ids), self._end_ids)
        llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(32))
        output_ids: list[int] = []
        prompt_logprobs = None
        stats = self.stats
        started = last = time.monotonic()
        tokens = llama.generate(
            prompt_ids,
            reset=True,
            logits_processor=processor,
            grammar=grammar,
            **job.sampling.generate_arguments,
        )
        try:
            for token in tokens:
                now = time.monotonic()
                if job.cancelled:
                    return
                output_ids.append(token)
                if stats is not None:
                    if len(output_ids) == 1:
                        stats.record_first_token(now - job.arrival, len(prompt_ids))
                        stats.record_step("mixed", now - started, now - started, len(prompt_ids))
                    else:
                        stats.record_output_token(now - last)
                        stats.record_step("decode", now - last, now - last, 1)
                last = now
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = [self._token_logprobs(llama.n_tokens - 1, token, sampling.logprobs)]
                if len(output_ids) == 1 and sampling.prompt_logprobs is not None:
                    prompt_logprobs = self._prompt_logprobs(prompt_ids, sampling.prompt_logprobs)
                reason: FinishReason | None = None
                text = ""
                if token in end_ids or (
                    not sampling.ignore_eos and llama_cpp.llama_vocab_is_eog(llama._model.vocab, token)
                ):
                    reason = "stop"
                else:
                    text, stopped = stream.add(self.tokenizer.piece_bytes([token]))
                    if stopped:
                        reason = "stop"
                if reason is None and (
                    len(output_ids) >= max_tokens or len(prompt_ids) + len(output_ids) >= self._n_ctx
                ):
                    reason = "length"
                if reason is not None:
                    text += stream.flush()
                job.send(
                    GenerationOutput(
                        text=text,
                        token_ids=[token],
                        finished=reason is not None,
                        finish_reason=reason,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=len(output_ids),
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs if len(output_ids) == 1 else None,
                    )
                )
                if reason is not None:
                    if stats is not None:
                        stats.record_finished()
                    return
        finally:
            tokens.close()

    def _logprob(self, logprobs: np.ndarray, token: int) -> Logprob:
        return Logprob(token, self.tokenizer.decode([token], skip_special_tokens=False), float(logprobs[token]))

    def _token_logprobs(self, row: int, token: int, top: int) -> TokenLogprobs:
        """The chosen token's log-probability at ``row`` of llama.cpp's logits, and the ``top`` most likely."""
        logprobs = _log_softmax(self._llama.scores[row])
        best: list[int] = []
        if top:
            candidates = np.argpartition(-logprobs, min(top, len(logprobs) - 1))[:top]
            best = sorted(candidates.tolist(), key=lambda t: (-logprobs[t], t))
        return TokenLogprobs(self._logprob(logprobs, token), [self._logprob(logprobs, t) for t in best])

    def _prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprobs | None]:
        """Each prompt token's log-probability given the ones before it (the first has none), from the logits the
        prompt's evaluation kept (``logits_all``); a prefix reused from the previous request kept its rows too."""
        return [None] + [self._token_logprobs(i - 1, prompt_ids[i], top) for i in range(1, len(prompt_ids))]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.sum(np.exp(shifted)))


def _logits_processor(
    logit_bias: dict[int, float], min_tokens: int, prompt_len: int, end_ids: np.ndarray
) -> llama_cpp.LogitsProcessorList | None:
    """What llama.cpp's sampler chain does not do per request: OpenAI's logit bias, and the end-of-generation
    tokens (``end_ids``) banned while fewer than ``min_tokens`` tokens are out."""
    if not logit_bias and not min_tokens:
        return None
    ids = np.array(list(logit_bias), dtype=np.intp)
    bias = np.array(list(logit_bias.values()), dtype=np.float32)

    def process(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if len(ids):
            scores[ids] += bias
        if len(input_ids) - prompt_len < min_tokens and len(end_ids):
            scores[end_ids] = -np.inf
        return scores

    return llama_cpp.LogitsProcessorList([process])


def _open_llama(path: Path, arguments: dict[str, Any]) -> llama_cpp.Llama:
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found (a GGUF file, model.gguf, is expected)")
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **arguments)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{path}: llama.cpp cannot load it: {exc}") from None
