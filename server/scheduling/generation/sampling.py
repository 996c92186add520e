"""Choosing each sequence's next token from the model's logits, with its own sampling parameters.

A batch mixes requests with different settings, so the processing is per row: penalties first (they depend on the
row's own tokens), then temperature, top-k and top-p, then a draw from the row's own random generator. A seeded
request owns a generator seeded once, so it draws the same tokens whatever else shares its batches.
"""

from __future__ import annotations

from collections import Counter

import torch

from server.protocol.generation import SamplingParams


class SequenceSampler:
    """One sequence's sampling state: its parameters, its generator, and the counts its penalties need."""

    def __init__(self, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self._prompt_tokens = set(prompt_token_ids)
        self._output_counts: Counter[int] = Counter()

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: the row's argmax, which the engine takes for all such rows at once."""
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty

    def record(self, token_id: int) -> None:
        self._output_counts[token_id] += 1

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
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
        return logits

    def choose(self, logits: torch.Tensor, banned: list[int]) -> int:
        """The next token from one row of logits (float32, vocabulary-sized); ``banned`` ids are never chosen."""
        logits = self._penalised(logits.clone())
        if banned:
            logits[banned] = float("-inf")
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
