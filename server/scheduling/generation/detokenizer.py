"""Incremental detokenization with stop strings: new text per step, never a half character or half a stop.

Decoding token by token breaks multi-byte characters (byte-level BPE splits them across tokens) and loses the
spaces that some tokenizers attach to the following token, so each step decodes a short window: the tokens from a
few back up to the new one, and the same window without the new one; the difference is the new text. The window
moves on once its text is complete, so the cost per token stays constant however long the completion grows (a
whole-completion decode per token would be quadratic). Text that could be the start of a stop string is held back
until the next tokens show whether it is one; when a stop string completes, the text before it is the last chunk.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._token_ids: list[int] = []
        self._text = ""
        self._sent = 0
        # The window: tokens from ``_prefix`` on are decoded each step; those before ``_read`` are in ``_text``.
        self._prefix = 0
        self._read = 0
        # Past a stop string nothing more is decoded.
        self._stopped = False

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return the text that may be sent now, and whether a stop string was reached."""
        self._token_ids.append(token_id)
        self._text += self._decode_new(final=False)
        if self._stop:
            # Only a stop string that ends in the new text can be new; search from where one could start.
            search_from = max(0, self._sent - self._longest_stop)
            found = [i for s in self._stop if (i := self._text.find(s, search_from)) != -1]
            if found:
                self._text = self._text[: min(found)]
                self._stopped = True
                return self.flush(), True
        ready = len(self._text)
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, ready - self._sent), held, -1):
                if self._text[ready - size : ready] == stop[:size]:
                    held = size
                    break
        return self._take(ready - held), False

    def flush(self) -> str:
        """Everything not yet sent (at the end of a sequence nothing is held back any more)."""
        if not self._stopped:
            self._text += self._decode_new(final=True)
        return self._take(len(self._text))

    def _decode_new(self, final: bool) -> str:
        """The text the tokens past ``_read`` add; empty while they end inside a character, unless ``final``."""
        decode = self._tokenizer.decode
        before = decode(self._token_ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._token_ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""  # nothing visible yet (a special token), or a character still missing bytes
        self._prefix, self._read = self._read, len(self._token_ids)
        return after[len(before) :]

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        chunk = self._text[self._sent : end]
        self._sent = end
        return chunk
