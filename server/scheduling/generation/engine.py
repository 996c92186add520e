"""The generation engine: continuous (iteration-level) batching over a paged KV cache.

Each step decodes one token for every running sequence and, in the same forward pass, prefills prompts (whole, or
in chunks when they exceed the step's token budget), so a new request joins at the next step without pausing the
running ones, and a finished one leaves at once. A sequence is admitted only when the cache has blocks for its
tokens; when a running sequence needs a block and none is free, the most recently admitted one is preempted (its
blocks freed, its tokens recomputed when it is admitted again), so the oldest requests always make progress. A
client that leaves aborts its sequence before the next step.

With prefix caching (on unless ``parameters.enable_prefix_caching`` is false), a sequence is admitted with the
cached blocks of its longest cached start already computed (see ``kv_blocks``), so a shared system prompt is
prefilled once, and a preempted sequence gets back what no one else needed meanwhile; each block a step will fill
is named when the step is scheduled, so requests that arrive together share it from their first step.

With n-gram speculation (``parameters.speculative``, see ``speculative``), a greedy decoding sequence runs its next
token together with draft tokens copied from earlier in its own text, and keeps as many as the model's argmax at
each of them confirms, plus the model's own next token: the same tokens as one at a time, in fewer steps. Rows
that sample, follow a grammar or want log-probabilities do not speculate.

Overload is answered, not queued without end: a request that finds ``max_waiting_seqs`` sequences already waiting
(the running batch or the KV cache being full), or whose wait, predicted from the rate at which the engine has been
admitting sequences, would exceed ``parameters.max_queue_delay_ms``, is refused at once with ``Overloaded`` (429 and
``Retry-After``); one that has waited longer than that all the same is refused when the delay passes.

The model runs on one thread per engine; the event loop only hands requests in and takes chunks out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from backends.base import GenerativeBackend, StepBatch
from server.config import ModelConfig
from server.errors import BackendError, ConfigError, InvalidInput, ModelDockError, ModelNotReady, Overloaded
from server.extensions.generation_metrics import GenerationStats
from server.protocol.generation import (
    FinishReason,
    GenerateRequest,
    GenerationOutput,
    SamplingParams,
    TokenLogprobs,
    outbox_chunks,
)
from server.protocol.prompts import allowed_new_tokens, prompt_token_ids
from server.scheduling.generation.detokenizer import IncrementalDetokenizer
from server.scheduling.generation.kv_blocks import BlockAllocator, OutOfBlocks
from server.scheduling.generation.sampling import SequenceSampler, StepSampler, TokenTexts, prompt_logprobs
from server.scheduling.generation.speculative import NgramDrafter, SpeculativeConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 64
# Sequences that may wait for admission, by default, per sequence the engine may run: enough to keep the batch full
# between admissions, few enough that a flood is answered with 429s rather than growing memory and latency.
DEFAULT_WAITING_PER_RUNNING = 4
# Admissions the predicted wait is worked out from (the latest ones), and how many it needs before predicting.
_ADMISSION_WINDOW = 64
_ADMISSIONS_TO_PREDICT = 8
DEFAULT_BLOCK_SIZE = 16
DEFAULT_KV_CACHE_MB = 1024
# Tokens one step may run, by default. On a GPU a step of 2,048 tokens costs little more than a step of a few, so
# bursts of prompts are prefilled in as few steps as possible. On a CPU a step costs in proportion to its tokens
# (about 2 ms a token for GPT-2 small on one core), so a burst of 16 prompts in one step made every client wait 4 s
# for a first token and stalled every running stream as long; steps of 512 tokens gave the first prompts their first
# token in 1.15 s instead of 2.17 (median, 16 clients) at the same throughput and the same worst case.
DEFAULT_GPU_BATCHED_TOKENS = 2048
DEFAULT_CPU_BATCHED_TOKENS = 512
# The engine thread and the event loop share the GIL. CPython makes a thread that wants it wait up to the switch
# interval (5 ms by default) while another runs Python, and the event loop gives the GIL up at every socket write:
# with a step loop that is mostly Python (kernel launches on a GPU), each streamed chunk would then wait milliseconds,
# and the event loop, not the model, would set the token rate. A short interval keeps those waits short.
SWITCH_INTERVAL_S = 0.0002


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's limits, from the model config's ``parameters``."""

    max_num_seqs: int
    max_model_len: int
    block_size: int
    num_blocks: int
    # Tokens one step may run, decoding ones included; longer prompts are prefilled in chunks over several steps.
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    speculative: SpeculativeConfig | None = None
    # Overload: sequences that may wait for admission, and the longest wait before a request is refused (None: no
    # limit on the wait).
    max_waiting_seqs: int = DEFAULT_MAX_NUM_SEQS * DEFAULT_WAITING_PER_RUNNING
    max_queue_delay_s: float | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, backend: GenerativeBackend) -> EngineLimits:
        max_model_len = config.int_parameter("max_model_len", minimum=2) or backend.max_model_len
        if max_model_len > backend.max_model_len:
            raise ConfigError(
                f"model '{config.name}': parameters.max_model_len {max_model_len} exceeds the model's "
                f"{backend.max_model_len} positions"
            )
        block_size = config.int_parameter("kv_block_size", minimum=1) or DEFAULT_BLOCK_SIZE
        max_num_seqs = config.int_parameter("max_num_seqs", minimum=1) or DEFAULT_MAX_NUM_SEQS
        blocks_per_seq = -(-max_model_len // block_size)
        num_blocks = config.int_parameter("kv_cache_blocks", minimum=1)
        if num_blocks is None:
            budget = (config.int_parameter("kv_cache_memory_mb", minimum=1) or DEFAULT_KV_CACHE_MB) << 20
            affordable = budget // max(1, backend.kv_bytes_per_token() * block_size)
            num_blocks = max(blocks_per_seq, min(affordable, blocks_per_seq * max_num_seqs))
        if num_blocks < blocks_per_seq:
            raise ConfigError(
                f"model '{config.name}': parameters.kv_cache_blocks {num_blocks} cannot hold one sequence of "
                f"max_model_len {max_model_len} ({blocks_per_seq} blocks of {block_size} tokens)"
            )
        batched = config.int_parameter("max_num_batched_tokens", minimum=1) or (
            max(DEFAULT_GPU_BATCHED_TOKENS, max_model_len) if backend.device.is_gpu else DEFAULT_CPU_BATCHED_TOKENS
        )
        caching = config.bool_parameter("enable_prefix_caching", default=True)
        speculative = SpeculativeConfig.from_parameter(config.name, config.parameters.get("speculative"))
        waiting = config.int_parameter("max_waiting_seqs", minimum=1) or max_num_seqs * DEFAULT_WAITING_PER_RUNNING
        delay_ms = config.int_parameter("max_queue_delay_ms", minimum=1)
        delay = delay_ms / 1000 if delay_ms else None
        return cls(max_num_seqs, max_model_len, block_size, num_blocks, batched, caching, speculative, waiting, delay)


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    # Where its chunks go: a queue read on the event loop that asked.
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue[GenerationOutput | BaseException]
    sampler: SequenceSampler
    detokenizer: IncrementalDetokenizer
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache; a preempted sequence drops back to 0 and is prefilled again.
    computed: int = 0
    first_token_at: float | None = None
    # Tokens that end the sequence: its stop token ids, and the model's end-of-sequence ids unless ignored.
    end_token_ids: frozenset[int] = frozenset()
    last_token_at: float | None = None
    # Prefix caching: the names of its full blocks so far, and how many of its blocks are named in the cache.
    block_hashes: list[int] = field(default_factory=list)
    named_blocks: int = 0
    # Speculation: its prompt lookup, and the draft tokens of the step in progress (run after its next token).
    drafter: NgramDrafter | None = None
    drafts: list[int] = field(default_factory=list)
    retired: bool = False
    # Whether it was ever admitted (only a request that never started is refused for waiting too long).
    admitted: bool = False
    # Log-probabilities: the prompt's (filled while it is prefilled, sent with the first token), the last token's.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    token_logprobs: TokenLogprobs | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def step_tokens(self, count: int) -> list[int]:
        """The tokens this step runs for it: ``count`` uncomputed ones, its drafts last."""
        return self.uncomputed(count - len(self.drafts)) + self.drafts if self.drafts else self.uncomputed(count)

    def uncomputed(self, count: int) -> list[int]:
        """The next ``count`` tokens whose KV is not cached (without copying the whole sequence when decoding)."""
        prompt = len(self.prompt_ids)
        if self.computed >= prompt:
            return self.output_ids[self.computed - prompt : self.computed - prompt + count]
        return self.token_ids[self.computed : self.computed + count]


class GenerationEngine:
    def __init__(self, name: str, backend: GenerativeBackend, limits: EngineLimits, stats: GenerationStats) -> None:
        self.name = name
        self.backend = backend
        self.limits = limits
        self.stats = stats
        self.tokenizer = backend.tokenizer
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.blocks = BlockAllocator(limits.num_blocks, limits.block_size, limits.enable_prefix_caching)
        backend.allocate_kv_cache(limits.num_blocks * limits.block_size, limits.max_num_seqs, limits.max_model_len)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Sequence] = []
        self._aborted: set[int] = set()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._stopping = False
        # Chunks produced by the step in progress, handed to their event loops in one call each when it ends.
        self._outgoing: list[tuple[Sequence, GenerationOutput | BaseException]] = []
        # Blocks named in the step being scheduled before it computes them (see ``_name_ahead``).
        self._named_ahead: list[int] = []
        # When the latest sequences were admitted: the rate that predicts how long a new request would wait.
        self._admissions: deque[float] = deque(maxlen=_ADMISSION_WINDOW)
        self.token_texts = TokenTexts(self.tokenizer)
        self._sampler = StepSampler(backend.vocab_size, self.token_texts)
        # Structured outputs' grammar compiler (``server.structured_output``), made by the first request needing it.
        self._grammars: Any = None
        self._thread = threading.Thread(target=self._loop, name=f"generate-{name}", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Sequences this engine holds, for choosing the least busy engine of a model."""
        return len(self._running) + len(self._waiting) + len(self._incoming)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationOutput]:
        """Chunks of the completion as they are produced; closing the iterator aborts the sequence."""
        if self._stopping:
            raise ModelNotReady(f"model '{self.name}' is unloading")
        refusal = self._refusal()
        if refusal is not None:
            self.stats.record_rejected()
            raise refusal
        prompt_ids = await asyncio.to_thread(prompt_token_ids, self.tokenizer, request, self.name)
        grammar = None
        if request.sampling.structured_outputs is not None:
            grammar = await self._grammar(request.sampling, self._end_token_ids(request.sampling))
        sequence = self.new_sequence(request, prompt_ids, grammar)
        with self._wake:
            self._incoming.append(sequence)
            self._wake.notify()
        self.stats.update_queue(len(self._running), len(self._waiting) + len(self._incoming))
        # Closed with this generator, so a caller that stops reading aborts at once, not when it is collected.
        async with aclosing(outbox_chunks(sequence.outbox, lambda: self.abort(sequence.id))) as chunks:
            async for item in chunks:
                yield item

    def new_sequence(self, request: GenerateRequest, prompt_ids: list[int], grammar: Any = None) -> Sequence:
        """The sequence that will answer ``request`` (its chunks go to the running event loop), not yet handed to
        the engine; ``grammar``: its structured-output matcher, if it has one."""
        max_tokens = allowed_new_tokens(prompt_ids, request.sampling.max_tokens, self.limits.max_model_len, self.name)
        sampling = request.sampling
        end_token_ids = self._end_token_ids(sampling)
        return Sequence(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            loop=asyncio.get_running_loop(),
            outbox=asyncio.Queue(),
            sampler=SequenceSampler(sampling, prompt_ids, self.backend.vocab_size, end_token_ids, grammar),
            detokenizer=IncrementalDetokenizer(self.tokenizer, sampling.stop),
            arrival=time.monotonic(),
            end_token_ids=end_token_ids,
            drafter=NgramDrafter(self.limits.speculative) if self.limits.speculative else None,
        )

    def _end_token_ids(self, sampling: SamplingParams) -> frozenset[int]:
        """Tokens that end a sequence: its stop token ids, and the model's end-of-sequence ids unless ignored."""
        eos = [] if sampling.ignore_eos else self.backend.eos_token_ids
        return frozenset([*sampling.stop_token_ids, *eos])

    async def _grammar(self, sampling: SamplingParams, end_token_ids: frozenset[int]) -> Any:
        """The sequence's grammar matcher. Compiling runs in the structured-output thread pool (cached by spec),
        so neither this event loop nor the engine thread waits on it, and a spec that does not compile is the
        request's ``InvalidInput`` before it joins the engine."""
        if self._grammars is None:
            try:
                from server.structured_output.compiler import StructuredOutputCompiler
            except ImportError:
                raise InvalidInput(
                    "structured_outputs: this server lacks xgrammar; install it with pip install 'modeldock[llm]'"
                ) from None
            self._grammars = StructuredOutputCompiler(self.tokenizer, self.backend.vocab_size)
        assert sampling.structured_outputs is not None
        compiled = await asyncio.wrap_future(self._grammars.compile(sampling.structured_outputs))
        return self._grammars.matcher(compiled, end_token_ids)

    def predicted_wait(self, ahead: int) -> float | None:
        """Seconds until ``ahead`` more sequences have been admitted, at the rate of the latest admissions; None
        until there have been enough of them to tell."""
        admissions = list(self._admissions)
        if len(admissions) < _ADMISSIONS_TO_PREDICT:
            return None
        span = admissions[-1] - admissions[0]
        if span <= 0:
            return 0.0
        # A stall since the last admission counts: the rate is no better than what the engine shows now.
        since = max(0.0, time.monotonic() - admissions[-1])
        return max(ahead * span / (len(admissions) - 1), since)

    def _refusal(self) -> Overloaded | None:
        """Why a new request cannot be taken in time, or None: the waiting queue is full, or the predicted wait
        exceeds the model's ``max_queue_delay_ms``."""
        waiting = len(self._waiting) + len(self._incoming)
        full = waiting or len(self._running) >= self.limits.max_num_seqs
        if not full:
            return None
        wait = self.predicted_wait(waiting + 1)
        if waiting >= self.limits.max_waiting_seqs:
            return Overloaded(
                f"model '{self.name}' is overloaded: {waiting} requests are waiting for room in its running batch "
                f"(parameters.max_waiting_seqs {self.limits.max_waiting_seqs}); retry later",
                wait or 1.0,
            )
        delay = self.limits.max_queue_delay_s
        if delay is not None and wait is not None and wait > delay:
            return Overloaded(
                f"model '{self.name}' is overloaded: a new request would wait about {wait * 1000:.0f} ms to start, "
                f"over parameters.max_queue_delay_ms {delay * 1000:.0f}; retry later",
                wait,
            )
        return None

    def _expire_waiting(self) -> None:
        """Refuse the requests that have waited past ``max_queue_delay_ms`` without starting."""
        delay = self.limits.max_queue_delay_s
        if delay is None or not self._waiting:
            return
        now = time.monotonic()
        expired = [s for s in self._waiting if not s.admitted and now - s.arrival > delay]
        if not expired:
            return
        self._waiting = deque(s for s in self._waiting if s.admitted or now - s.arrival <= delay)
        wait = self.predicted_wait(len(self._waiting) + 1) or delay
        for sequence in expired:
            self._deliver(
                sequence,
                Overloaded(
                    f"model '{self.name}' is overloaded: the request waited {(now - sequence.arrival) * 1000:.0f} ms "
                    f"without starting, over parameters.max_queue_delay_ms {delay * 1000:.0f}; retry later",
                    wait,
                ),
            )
        self.stats.record_rejected(len(expired))

    def abort(self, sequence_id: int) -> None:
        with self._wake:
            self._aborted.add(sequence_id)
            self._wake.notify()

    def stop(self) -> None:
        """End the step loop; sequences still held are failed. Callers drain first (the scheduler does)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # -- the engine thread ----------------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """One prefill and one decode step on a throw-away sequence: the first real request should not pay for
        the runtime's lazy set-up (kernel selection, memory pools), which can take longer than a whole request."""
        table: list[int] = []
        try:
            self.blocks.grow(table, 3)
            size = self.blocks.block_size
            self.backend.forward(StepBatch([[0, 0]], [0], [table], size, [0], [0]))
            self.backend.forward(StepBatch([[0]], [2], [table], size, [0]))
        except Exception:  # a model that cannot run fails its first request with the real error instead
            log.warning("model '%s': warm-up step failed", self.name, exc_info=True)
        finally:
            self.blocks.release(table)

    def _loop(self) -> None:
        self._warm_up()
        while True:
            with self._wake:
                while not (self._stopping or self._incoming or self._aborted or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                aborted, self._aborted = self._aborted, set()
            if aborted:
                self._drop(aborted)
            self._expire_waiting()
            try:
                self._step()
            except Exception as exc:  # a model failure fails the sequences of this step, not the engine
                log.exception("model '%s': generation step failed", self.name)
                self._forget_named_ahead()
                error = exc if isinstance(exc, ModelDockError) else BackendError(f"{type(exc).__name__}: {exc}")
                for sequence in list(self._running):
                    self._retire(sequence, error=error)
            self._flush()
            self.stats.update_queue(len(self._running), len(self._waiting), self.blocks.usage)
        error = ModelNotReady(f"model '{self.name}' was unloaded")
        for sequence in [*self._running, *self._waiting, *self._incoming]:
            self.blocks.release(sequence.block_table)
            self._deliver(sequence, error)
        self._flush()

    def _deliver(self, sequence: Sequence, item: GenerationOutput | BaseException) -> None:
        self._outgoing.append((sequence, item))

    def _flush(self) -> None:
        """Hand a step's chunks over: one wake-up of each event loop per step, not one per sequence."""
        outgoing, self._outgoing = self._outgoing, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, GenerationOutput | BaseException]]] = {}
        for sequence, item in outgoing:
            by_loop.setdefault(sequence.loop, []).append((sequence, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop closed while its requests ran
                pass

    def _drop(self, ids: set[int]) -> None:
        for sequence in [s for s in self._running if s.id in ids]:
            self._retire(sequence, reason="abort", notify=False)
        self._waiting = deque(s for s in self._waiting if s.id not in ids)
        self.stats.record_aborted(len(ids))

    def _step(self) -> None:
        started = time.perf_counter()
        self._named_ahead = []
        work = self._schedule()
        if work:
            decoding = all(count - len(s.drafts) == 1 and s.computed == s.length - 1 for s, count in work)
            kind = "decode" if decoding else "mixed"
            forward = self._run(work)
            tokens = sum(count for _, count in work)
            self.stats.record_step(kind, time.perf_counter() - started, forward, tokens)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's work: one token for every decoding sequence, then prompt tokens within the step's budget.

        Decoding sequences always run (a token each); prompts share what is left of ``max_num_batched_tokens``
        (at least one token, so prompts always progress), running ones first, then newly admitted ones.
        """
        self._reserve_decode_blocks()
        work: list[tuple[Sequence, int]] = []
        prefilling: list[Sequence] = []
        for sequence in self._running:
            if sequence.length - sequence.computed == 1:
                work.append((sequence, 1 + self._draft(sequence)))
            else:
                prefilling.append(sequence)
        budget = max(1, self.limits.max_num_batched_tokens - sum(count for _, count in work))
        for sequence in prefilling:
            if budget <= 0:
                break
            count = min(sequence.length - sequence.computed, budget)
            work.append((sequence, count))
            self._name_ahead(sequence, count)
            budget -= count
        while budget > 0 and self._waiting and len(self._running) < self.limits.max_num_seqs:
            sequence = self._waiting[0]
            tokens = sequence.length
            cached = self._cached_prefix(sequence)
            # Room for the prompt and the first generated token, so a new sequence is not preempted at once.
            needed = self.blocks.blocks_for(tokens + 1) - len(cached) + self.blocks.cost(cached)
            if not self.blocks.can_allocate(needed):
                break
            self.blocks.share(sequence.block_table, cached)
            self.blocks.grow(sequence.block_table, tokens)
            sequence.computed = sequence.named_blocks = len(cached)
            sequence.computed *= self.blocks.block_size
            if self.blocks.enable_prefix_caching:
                self.stats.record_prefix_cache(tokens, sequence.computed)
            self._waiting.popleft()
            self._running.append(sequence)
            if not sequence.admitted:
                sequence.admitted = True
                self._admissions.append(time.monotonic())
            count = min(tokens - sequence.computed, budget)
            work.append((sequence, count))
            self._name_ahead(sequence, count)
            budget -= count
        if any(s.drafts for s, _ in work) and any(s.sampling.prompt_logprobs is not None for s, _ in work):
            # A step that keeps prompt logits keeps every token's; drafts wait for a step without them.
            work = [(s, count - len(s.drafts)) for s, count in work]
            for sequence, _ in work:
                sequence.drafts = []
        return work

    def _draft(self, sequence: Sequence) -> int:
        """Propose a decoding sequence's drafts for this step (when it may speculate and the cache has room for
        them); returns how many."""
        if sequence.drafter is None or not sequence.sampler.plain_greedy:
            return 0
        # Accepted drafts and the model's next token must fit the request's and the model's limits.
        room = min(sequence.max_tokens - len(sequence.output_ids), self.limits.max_model_len - sequence.length) - 1
        drafts = sequence.drafter.propose(sequence.token_ids, room)
        if not drafts:
            return 0
        try:
            self.blocks.grow(sequence.block_table, sequence.length + len(drafts))
        except OutOfBlocks:
            return 0
        sequence.drafts = drafts
        return len(drafts)

    def _cached_prefix(self, sequence: Sequence) -> list[int]:
        """The cached blocks a sequence may start with: its longest cached start, short of its last token, which
        must run to give the logits of its next one."""
        if not self.blocks.enable_prefix_caching:
            return []
        if sequence.sampling.prompt_logprobs is not None and sequence.first_token_at is None:
            return []  # its prompt's logits are wanted, so all of it runs (as vLLM does)
        tokens = sequence.token_ids
        hashes = self.blocks.full_block_hashes(tokens, sequence.block_hashes)
        return self.blocks.cached_prefix(tokens, hashes[: (len(tokens) - 1) // self.blocks.block_size])

    def _name_ahead(self, sequence: Sequence, count: int) -> None:
        """Name the blocks this step's ``count`` prompt tokens will fill before the step runs, as vLLM does, so a
        sequence admitted later in the same step shares them instead of computing the same start again: sixteen
        requests arriving together with one system prompt compute it once, in the first step, not once per
        request until the first of them has finished a step. This is sound because the backend writes every new
        key and value of a layer into the cache before any sequence of the step attends in that layer. If the step
        fails, these names are forgotten (``_forget_named_ahead``): the blocks may hold nothing."""
        if not self.blocks.enable_prefix_caching:
            return
        before = sequence.named_blocks
        self._name_full_blocks(sequence, sequence.computed + count)
        self._named_ahead.extend(sequence.block_table[before : sequence.named_blocks])

    def _forget_named_ahead(self) -> None:
        """A step that failed computed none of the blocks named for it: no later sequence may find them."""
        self.blocks.forget(self._named_ahead)
        self._named_ahead = []

    def _name_full_blocks(self, sequence: Sequence, computed: int | None = None) -> None:
        """Name the blocks filled up to ``computed`` tokens (by default, its tokens already computed), so later
        sequences with the same start can share them."""
        full = (sequence.computed if computed is None else computed) // self.blocks.block_size
        if full <= sequence.named_blocks:
            return
        size = self.blocks.block_size
        tokens = sequence.token_ids
        hashes = self.blocks.full_block_hashes(tokens[: full * size], sequence.block_hashes)
        for index in range(sequence.named_blocks, full):
            parent = hashes[index - 1] if index else None
            block_tokens = tuple(tokens[index * size : (index + 1) * size])
            self.blocks.register(sequence.block_table[index], hashes[index], parent, block_tokens)
        sequence.named_blocks = full

    def _reserve_decode_blocks(self) -> None:
        """Give every running sequence room for its next token, preempting the newest ones if the cache is full."""
        index = 0
        while index < len(self._running):
            sequence = self._running[index]
            try:
                self.blocks.grow(sequence.block_table, sequence.length)
            except OutOfBlocks:
                victim = self._running.pop()
                self.blocks.release(victim.block_table)
                victim.computed = 0
                self._waiting.appendleft(victim)
                self.stats.record_preempted()
                continue  # retry the same sequence (unless it was the victim) with the freed blocks
            index += 1

    def _run(self, work: list[tuple[Sequence, int]]) -> float:
        """Run one step's work and advance its sequences; returns the seconds the forward pass took."""
        # A sequence whose prompt is still being prefilled in chunks has nothing to sample yet.
        rows = [row for row, (s, count) in enumerate(work) if s.computed + count - len(s.drafts) == s.length]
        verify = [row for row in rows if work[row][0].drafts]
        full = [row for row in rows if self._needs_logits(work[row][0])]
        # Sequences whose prompt log-probabilities are being worked out, chunk by chunk, until the first token.
        prompt_rows = [
            row
            for row, (s, _) in enumerate(work)
            if s.sampling.prompt_logprobs is not None and s.first_token_at is None and s.computed < len(s.prompt_ids)
        ]
        batch = StepBatch(
            token_ids=[s.step_tokens(count) for s, count in work],
            start=[s.computed for s, _ in work],
            block_tables=[s.block_table for s, _ in work],
            block_size=self.blocks.block_size,
            sample_rows=rows,
            full_rows=full,
            prompt_logit_rows=prompt_rows,
            verify_rows=verify,
        )
        started = time.perf_counter()
        result = self.backend.forward(batch)
        forward = time.perf_counter() - started
        for row, logits in zip(prompt_rows, result.prompt_logits, strict=True):
            self._add_prompt_logprobs(work[row][0], logits)
        naming = self.blocks.enable_prefix_caching
        for sequence, count in work:
            if sequence.drafts:
                continue  # what it computed depends on how many of its drafts hold (below)
            sequence.computed += count
            if naming:
                self._name_full_blocks(sequence)
        tokens = dict(zip(rows, result.argmax, strict=True))
        # Rows that need their own processing (sampling, penalties, grammars, logprobs...) choose from their logits.
        if full:
            chosen = self._sampler.choose([work[row][0].sampler for row in full], result.logits)
            for row, (token, logprobs) in zip(full, chosen, strict=True):
                tokens[row] = token
                work[row][0].token_logprobs = logprobs
        now = time.monotonic()
        checked = dict(zip(verify, result.verify_argmax, strict=True))
        for row in rows:
            sequence = work[row][0]
            if not sequence.drafts:
                self._advance(sequence, tokens[row], now)
                continue
            self._accept_drafts(sequence, checked[row], now)
        return forward

    def _accept_drafts(self, sequence: Sequence, predicted: list[int], now: float) -> None:
        """Keep the drafts the model's argmax agrees with, then its own choice after the last of them.

        ``predicted[i]`` is the argmax after the sequence's last token and the first ``i`` drafts. The KV of the
        last token and of each kept draft is now in the cache; a rejected draft's is overwritten later."""
        drafts, sequence.drafts = sequence.drafts, []
        kept = 0
        while kept < len(drafts) and drafts[kept] == predicted[kept]:
            kept += 1
        sequence.computed += 1 + kept
        self.stats.record_speculation(len(drafts), kept)
        for token in [*drafts[:kept], predicted[kept]]:
            self._advance(sequence, token, now)
            if sequence.retired:
                return
        if self.blocks.enable_prefix_caching:
            self._name_full_blocks(sequence)

    @staticmethod
    def _needs_logits(sequence: Sequence) -> bool:
        """Plain greedy rows take the argmax the backend works out; the rest need the whole row on the host."""
        return not sequence.sampler.plain_greedy

    def _add_prompt_logprobs(self, sequence: Sequence, logits: Any) -> None:
        """The prompt log-probabilities of one chunk: the logits at positions ``start..`` predict the tokens after
        them (the last chunk's last row predicts the first generated token, which is sampled instead)."""
        start = sequence.computed
        if start == 0 or sequence.prompt_logprobs is None:
            sequence.prompt_logprobs = [None]  # the first token has nothing before it
        top = sequence.sampling.prompt_logprobs or 0
        following = sequence.prompt_ids[start + 1 : start + 1 + len(logits)]
        sequence.prompt_logprobs.extend(prompt_logprobs(logits, following, top, self.token_texts))

    def _advance(self, sequence: Sequence, token: int, now: float) -> None:
        ends = sequence.end_token_ids
        sequence.output_ids.append(token)
        sequence.sampler.record(token)
        grammar = sequence.sampler.grammar
        if grammar is not None and not grammar.accept(token):
            self._retire(sequence, error=BackendError(f"token {token} broke the request's structured-output grammar"))
            return
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self.stats.record_first_token(now - sequence.arrival, len(sequence.prompt_ids))
        else:
            self.stats.record_output_token(now - (sequence.last_token_at or now))
        sequence.last_token_at = now
        reason: FinishReason | None = None
        text = ""
        if token in ends:
            reason = "stop"
        else:
            text, stopped = sequence.detokenizer.add(token)
            if stopped or (grammar is not None and grammar.terminated):
                reason = "stop"
        if reason is None and (
            len(sequence.output_ids) >= sequence.max_tokens or sequence.length >= self.limits.max_model_len
        ):
            reason = "length"
        if reason is None:
            self._deliver(sequence, self._output(sequence, text, [token]))
            return
        text += sequence.detokenizer.flush()
        self._retire(sequence, reason=reason, last=(text, [token]))

    def _output(
        self, sequence: Sequence, text: str, tokens: list[int], reason: FinishReason | None = None
    ) -> GenerationOutput:
        sampling = sequence.sampling
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = [sequence.token_logprobs] if tokens and sequence.token_logprobs is not None else []
        first = bool(tokens) and len(sequence.output_ids) == len(tokens)
        return GenerationOutput(
            text=text,
            token_ids=tokens,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=len(sequence.output_ids),
            logprobs=logprobs,
            prompt_logprobs=sequence.prompt_logprobs if first and sampling.prompt_logprobs is not None else None,
        )

    def _retire(
        self,
        sequence: Sequence,
        reason: FinishReason = "abort",
        last: tuple[str, list[int]] = ("", []),
        error: BaseException | None = None,
        notify: bool = True,
    ) -> None:
        self._running.remove(sequence)
        sequence.retired = True
        self.blocks.release(sequence.block_table)
        if error is not None:
            self._deliver(sequence, error)
        elif notify:
            self._deliver(sequence, self._output(sequence, *last, reason=reason))
        if error is None and reason != "abort":
            self.stats.record_finished()


def _put_all(items: list[tuple[Sequence, GenerationOutput | BaseException]]) -> None:
    for sequence, item in items:
        sequence.outbox.put_nowait(item)
