"""Incremental detokenization with stop strings: new text per step, never a half character or half a stop.

Decoding token by token breaks multi-byte characters (byte-level BPE splits them across tokens), so each step
decodes the whole completion and emits what is new. Text that could be the start of a stop string is held back
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

    @property
    def text(self) -> str:
        return self._text

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return the text that may be sent now, and whether a stop string was reached."""
        self._token_ids.append(token_id)
        self._text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        if self._stop:
            # Only a stop string that ends in the new text can be new; search from where one could start.
            search_from = max(0, self._sent - self._longest_stop)
            found = [i for s in self._stop if (i := self._text.find(s, search_from)) != -1]
            if found:
                self._text = self._text[: min(found)]
                return self.flush(), True
        ready = len(self._text)
        if self._text.endswith(_REPLACEMENT):  # an incomplete character: wait for its remaining bytes
            ready = len(self._text.rstrip(_REPLACEMENT))
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, ready - self._sent), held, -1):
                if self._text[ready - size : ready] == stop[:size]:
                    held = size
                    break
        return self._take(ready - held), False

    def flush(self) -> str:
        """Everything not yet sent (at the end of a sequence nothing is held back any more)."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        chunk = self._text[self._sent : end]
        self._sent = end
        return chunk
