"""Incremental detokenization with stop strings: new text per step, never a half character or half a stop.

Decoding token by token breaks multi-byte characters (byte-level BPE splits them across tokens) and loses the
spaces that some tokenizers attach to the following token, so each step decodes a short window: the tokens from a
few back up to the new one, and the same window without the new one; the difference is the new text. The window
moves on once its text is complete, so the cost per token stays constant however long the completion grows (a
whole-completion decode per token would be quadratic). Text that could be the start of a stop string is held back
until the next tokens show whether it is one; when a stop string completes, the text before it is the last chunk.

A byte-level tokenizer can emit bytes that never form valid UTF-8 (a random or badly tuned model does it often).
Decoding replaces an incomplete character at the end with one U+FFFD, and everything before it is final, so only
that last character is held back (at most three bytes of one); once a later token shows it can no longer be
completed, it goes out as U+FFFD, as OpenAI and vLLM send it. Holding back the whole window until it decodes cleanly
would send nothing at all until the end of such a completion.
"""

from __future__ import annotations

from typing import Any

from server.protocol.stop_strings import StopStringText

_REPLACEMENT = "\ufffd"
# How many tokens back a held character may have started: one of at most four bytes, at least one byte a token.
_SETTLE_LOOKBACK = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._text = StopStringText(stop)
        # The window: tokens from ``_prefix`` on are decoded each step; those before ``_read`` are in ``_text``,
        # and so are the first ``_window_sent`` characters of the window's text (None: up to ``_read``'s).
        self._prefix = 0
        self._read = 0
        self._window_sent: int | None = None

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return the text that may be sent now, and whether a stop string was reached."""
        self._token_ids.append(token_id)
        return self._text.append(self._decode_new(final=False))

    def flush(self) -> str:
        """Everything not yet sent (at the end of a sequence nothing is held back any more)."""
        if self._text.stopped:
            return self._text.finish()
        return self._text.finish(self._decode_new(final=True))

    def _decode_new(self, final: bool) -> str:
        """The text the tokens past ``_read`` add, less a character at the end that is still missing bytes (unless
        ``final``); the window moves on to the newest token boundary where the text is complete."""
        decode = self._tokenizer.decode
        after = decode(self._token_ids[self._prefix :], skip_special_tokens=True)
        sent = self._window_sent
        if sent is None:
            sent = len(decode(self._token_ids[self._prefix : self._read], skip_special_tokens=True))
        if final or not after.endswith(_REPLACEMENT):
            self._prefix, self._read, self._window_sent = self._read, len(self._token_ids), None
            return after[sent:]
        # Everything before the last character is final; that one may be the start of a character whose other
        # bytes are in tokens still to come.
        stable = len(after) - 1
        new = after[sent:stable]
        self._window_sent = max(sent, stable)
        self._settle(after)
        return new

    def _settle(self, after: str) -> None:
        """Move the window past the held tokens that no longer change: the newest boundary, a few tokens back,
        whose text ends with a whole character and stays a proper prefix of the window's text. Without this the
        window would grow for as long as every token ends inside a character, and each step decode more."""
        decode = self._tokenizer.decode
        last = len(self._token_ids)
        for cut in range(last - 1, max(self._read, last - _SETTLE_LOOKBACK - 1), -1):
            text = decode(self._token_ids[self._prefix : cut], skip_special_tokens=True)
            if not text.endswith(_REPLACEMENT) and len(text) < len(after) and after.startswith(text):
                sent = self._window_sent or 0
                self._prefix, self._read = cut, cut
                # The window now starts at ``cut``: what was sent past it is counted from there.
                self._window_sent = max(0, sent - len(text))
                return
