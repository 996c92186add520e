"""N-gram speculative decoding (prompt lookup): draft tokens copied from earlier in the sequence, no second model.

Text that repeats itself (code edits, quoting the prompt, lists, templated answers) often continues the way it
continued the last time its latest few tokens appeared. The engine copies the tokens that followed that earlier
occurrence as drafts, runs them in the same forward pass as the sequence's next token, and keeps the drafts up to
the first one the model's own greedy choice disagrees with, plus that choice: one step then yields up to
``num_tokens + 1`` tokens, and exactly the tokens greedy decoding gives one step at a time.

Configured as vLLM names it, under ``parameters.speculative`` of the model config::

    parameters:
      speculative: {method: ngram, num_tokens: 4, prompt_lookup_max: 4, prompt_lookup_min: 2}
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import ConfigError


class SpeculativeConfig(BaseModel):
    """``parameters.speculative``: vLLM's field names (``num_speculative_tokens`` is taken for ``num_tokens``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Literal["ngram"]
    num_tokens: int = Field(ge=1, le=16, validation_alias="num_speculative_tokens")
    # The longest and shortest run of latest tokens looked up; longer runs are tried first (fewer, better drafts).
    prompt_lookup_max: int = Field(default=4, ge=1, le=16)
    prompt_lookup_min: int = Field(default=2, ge=1, le=16)

    @model_validator(mode="after")
    def _lookup_range(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min exceeds prompt_lookup_max")
        return self

    @classmethod
    def from_parameter(cls, model: str, raw: str | None) -> SpeculativeConfig | None:
        """The config from the parameter's text (a JSON object, which a YAML mapping becomes); None when unset."""
        if raw is None or not raw.strip():
            return None
        try:
            return cls.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"model '{model}': field 'parameters.speculative': {exc}") from None


class NgramDrafter:
    """One sequence's prompt lookup: where each recent n-gram last ended, kept up to date as tokens arrive.

    A dictionary per n-gram length instead of a search through the sequence per step: a step costs a few
    dictionary operations whatever the length of the sequence.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self._sizes = range(config.prompt_lookup_max, config.prompt_lookup_min - 1, -1)
        self._limit = config.num_tokens
        # For each n: n-gram -> the position just after its latest occurrence (not counting the sequence's end).
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}
        self._indexed = 0

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to ``min(num_tokens, limit)`` drafts to follow ``tokens``; empty when its end has not occurred before."""
        end = len(tokens)
        for position in range(max(self._indexed, 1), end):
            for n, ends in self._ends.items():
                if position >= n:
                    ends[tuple(tokens[position - n : position])] = position
        self._indexed = max(self._indexed, end)
        count = min(self._limit, limit)
        if count <= 0:
            return []
        for n in self._sizes:
            if n >= end:
                continue
            found = self._ends[n].get(tuple(tokens[end - n :]))
            if found is not None:
                return tokens[found : found + count]
        return []
