"""The engine's ``TokenLogprobs`` in OpenAI's shapes: chat's ``logprobs.content`` entries, completions' parallel
lists with text offsets, and vLLM's ``prompt_logprobs``.

A log-probability of minus infinity (a token masked by a grammar or a -100 bias) has no JSON spelling; it is sent
as -9999.0, as vLLM sends it.
"""

from __future__ import annotations

import math

from server.frontends.openai.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
)
from server.protocol.generation import Logprob, TokenLogprobs

FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _top(candidate: Logprob) -> TopLogprob:
    return TopLogprob(token=candidate.token, logprob=finite(candidate.logprob), bytes=list(candidate.token.encode()))


def chat_logprobs(entries: list[TokenLogprobs], top: int) -> ChatLogprobs:
    """One entry per generated token; ``top`` alternatives each (the engine's, at most as many as asked)."""
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=entry.chosen.token,
                logprob=finite(entry.chosen.logprob),
                bytes=list(entry.chosen.token.encode()),
                top_logprobs=[_top(candidate) for candidate in entry.top[:top]],
            )
            for entry in entries
        ]
    )


class CompletionLogprobsBuilder:
    """Completions' logprobs for one choice, built chunk by chunk so streamed chunks carry their own tokens with
    offsets counted from the start of the choice's text (the echoed prompt included)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.offset = 0

    def add(self, entries: list[TokenLogprobs | None], first_tokens: list[str] | None = None) -> CompletionLogprobs:
        """``first_tokens`` gives the text of entries that are None (a prompt's first token has no logprob)."""
        out = CompletionLogprobs()
        for i, entry in enumerate(entries):
            if entry is None:
                token = first_tokens[i] if first_tokens is not None and i < len(first_tokens) else ""
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                token = entry.chosen.token
                out.tokens.append(token)
                out.token_logprobs.append(finite(entry.chosen.logprob))
                tops: dict[str, float] = {}
                for candidate in entry.top[: self.top]:
                    tops.setdefault(candidate.token, finite(candidate.logprob))
                out.top_logprobs.append(tops)
            out.text_offset.append(self.offset)
            self.offset += len(token)
        return out


def prompt_logprobs(entries: list[TokenLogprobs | None]) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, its own and the top candidates' logprobs by token id."""
    shaped: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            shaped.append(None)
            continue
        candidates = {
            str(c.token_id): PromptLogprob(logprob=finite(c.logprob), rank=rank, decoded_token=c.token)
            for rank, c in enumerate(entry.top, start=1)
        }
        chosen = entry.chosen
        candidates.setdefault(
            str(chosen.token_id), PromptLogprob(logprob=finite(chosen.logprob), rank=None, decoded_token=chosen.token)
        )
        shaped.append(candidates)
    return shaped
