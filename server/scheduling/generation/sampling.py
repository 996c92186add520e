"""Choosing each sequence's next token from the model's logits, with its own sampling parameters.

A batch mixes requests with different settings, so most processing is per row, in this order: the grammar mask of
constrained rows (for all of them at once, see ``server.structured_output``), then the row's penalties (they depend
on its own tokens), its ``logit_bias``, the ban on end tokens before ``min_tokens``, then temperature, top-k and
top-p, then a draw from the row's own random generator. A seeded request owns a generator seeded once, so it draws
the same tokens whatever else shares its batches.

Log-probabilities are those of the processed distribution, as vLLM's ``processed_logprobs`` are, but taken before
temperature, top-k and top-p: the log-softmax of the logits after the grammar mask, penalties, ``logit_bias`` and
the ``min_tokens`` ban. So they are the model's own log-probabilities when none of those apply (and then match a
plain ``log_softmax`` of the model's logits), a token the request forbids never appears among them, and under
greedy decoding the chosen token is the most likely one. Prompt log-probabilities are the model's raw ones: nothing
of the request applies to its prompt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from server.errors import InvalidInput
from server.protocol.generation import Logprob, SamplingParams, TokenLogprobs

if TYPE_CHECKING:  # xgrammar is imported only once a request is constrained
    from server.structured_output.matcher import GrammarMasks, SequenceGrammar


class TokenTexts:
    """Each token's text decoded on its own (as logprobs show it), remembered: a step decodes up to 21 per row."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id])  # type: ignore[attr-defined]
        return text

    def logprob(self, token_id: int, value: float) -> Logprob:
        return Logprob(token_id, self(token_id), value)


class SequenceSampler:
    """One sequence's sampling state: its parameters, its generator, its grammar, and the counts its penalties
    need. ``vocab_size`` is the width of the model's logits rows (``logit_bias`` ids are checked against it)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        vocab_size: int | None = None,
        end_token_ids: frozenset[int] = frozenset(),
        grammar: SequenceGrammar | None = None,
    ) -> None:
        self.params = params
        self.grammar = grammar
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self._prompt_tokens = set(prompt_token_ids)
        self._output_counts: Counter[int] = Counter()
        self._generated = 0
        self._end_ids = sorted(end_token_ids)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                raise InvalidInput(
                    f"logit_bias: token ids {sorted(bad)[:5]} are outside the vocabulary (0..{(vocab_size or 0) - 1})"
                )
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self._bias = ids, torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to apply: the row's argmax, which the engine takes for all such rows at once."""
        p = self.params
        return (
            p.greedy
            and p.repetition_penalty == 1.0
            and not p.presence_penalty
            and not p.frequency_penalty
            and self._bias is None
            and self.grammar is None
            and p.logprobs is None
            and self._generated >= p.min_tokens
        )

    def record(self, token_id: int) -> None:
        self._output_counts[token_id] += 1
        self._generated += 1

    def _process(self, logits: torch.Tensor, banned: Sequence[int] = ()) -> torch.Tensor:
        """Penalties, ``logit_bias``, the ``min_tokens`` ban and ``banned`` ids, in place on one row."""
        p = self.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(self._prompt_tokens | set(self._output_counts)), dtype=torch.long)
            if len(seen):
                values = logits[seen]
                logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._output_counts:
            ids = torch.tensor(list(self._output_counts), dtype=torch.long)
            counts = torch.tensor(list(self._output_counts.values()), dtype=logits.dtype)
            logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if self._bias is not None:
            logits.index_add_(0, self._bias[0], self._bias[1].to(logits.dtype))
        if banned:
            logits[list(banned)] = float("-inf")
        if self._generated < p.min_tokens and self._end_ids:
            kept = logits[self._end_ids].clone()
            logits[self._end_ids] = float("-inf")
            # A grammar that can only end now (a choice fully written) wins over min_tokens: never an empty row.
            if self.grammar is not None and bool(torch.isneginf(logits).all()):
                logits[self._end_ids] = kept
        return logits

    def _draw(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Keep the smallest prefix whose probability reaches top_p (the first token always stays).
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def choose(self, logits: torch.Tensor, banned: Sequence[int] = ()) -> int:
        """The next token from one row of logits (float32, vocabulary-sized); ``banned`` ids are never chosen."""
        return self._draw(self._process(logits.clone(), banned))

    def choose_with_logprobs(self, logits: torch.Tensor, texts: TokenTexts) -> tuple[int, TokenLogprobs | None]:
        """The next token from one row of logits (grammar mask already applied; changed in place), and its
        log-probability with the top alternatives when the request asked for them."""
        logits = self._process(logits)
        token = self._draw(logits)
        if self.params.logprobs is None:
            return token, None
        logprobs = torch.log_softmax(logits, dim=-1)
        return token, _token_logprobs(logprobs, token, self.params.logprobs, texts)


def _token_logprobs(logprobs: torch.Tensor, token: int, top: int, texts: TokenTexts) -> TokenLogprobs:
    """The chosen token's log-probability and the ``top`` most likely tokens (those the request allows)."""
    alternatives: list[Logprob] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = [
            texts.logprob(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v != float("-inf")
        ]
    return TokenLogprobs(texts.logprob(token, float(logprobs[token])), alternatives)


class StepSampler:
    """Chooses the next tokens of a step's rows that need their logits: the grammar masks of all constrained rows
    in one call, then each row's own processing and draw."""

    def __init__(self, vocab_size: int, texts: TokenTexts) -> None:
        self.texts = texts
        self._masks: GrammarMasks | None = None
        self._vocab_size = vocab_size

    def choose(
        self, samplers: Sequence[SequenceSampler], logits: torch.Tensor
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """One token (and its logprobs, if asked) per sampler; ``logits[i]`` is sampler ``i``'s row (changed)."""
        constrained = [i for i, s in enumerate(samplers) if s.grammar is not None]
        if constrained:
            if self._masks is None:
                from server.structured_output.matcher import GrammarMasks

                self._masks = GrammarMasks(self._vocab_size)
            self._masks.apply(logits, constrained, [samplers[i].grammar for i in constrained])  # type: ignore[misc]
        return [sampler.choose_with_logprobs(logits[i], self.texts) for i, sampler in enumerate(samplers)]


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], top: int, texts: TokenTexts) -> list[TokenLogprobs]:
    """Log-probabilities of prompt tokens: ``logits[i]`` is the model's row that predicts ``next_ids[i]``."""
    rows = torch.log_softmax(logits[: len(next_ids)].float(), dim=-1)
    return [_token_logprobs(rows[i], token, top, texts) for i, token in enumerate(next_ids)]
