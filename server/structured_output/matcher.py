"""Per-sequence grammar state, and the masking of a whole step's constrained rows at once.

Masking is the part that runs every step, so it is batched: the matchers fill rows of one preallocated bitmask
(one bit a token, 1/32 of the logits' size) and xgrammar applies it to all constrained rows of the step's logits in
one call, instead of a per-row loop over the vocabulary.
"""

from __future__ import annotations

import torch
import xgrammar as xgr


class SequenceGrammar:
    """Where one sequence stands in its grammar: which tokens may come next, and whether it has ended.

    The sequence's end tokens (EOS unless ignored, and its stop token ids) are the grammar's stop tokens: the mask
    allows them only where the grammar may end, and choosing one terminates the matcher. With no end tokens at all
    (``ignore_eos`` and no stop ids), the grammar terminates as soon as it is complete.
    """

    def __init__(self, grammar: xgr.CompiledGrammar, end_token_ids: frozenset[int] | set[int]) -> None:
        ends = sorted(end_token_ids)
        self._matcher = xgr.GrammarMatcher(
            grammar, override_stop_tokens=ends or None, terminate_without_stop_token=not ends
        )

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by the chosen token; False if the grammar does not allow it (the mask should have stopped it)."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and has ended (an end token accepted, or complete with none to wait for)."""
        return bool(self._matcher.is_terminated())


class GrammarMasks:
    """The bitmask buffer of one engine, applied to the constrained rows of each step's logits."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor, rows: list[int], grammars: list[SequenceGrammar]) -> None:
        """Set every token ``grammars[i]`` does not allow next to -inf in ``logits[rows[i]]`` (in place)."""
        if not rows:
            return
        height = logits.shape[0]
        if self._bitmask.shape[0] < height:
            self._bitmask = xgr.allocate_token_bitmask(max(height, 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[:height]
        for row, grammar in zip(rows, grammars, strict=True):
            grammar.fill_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)
