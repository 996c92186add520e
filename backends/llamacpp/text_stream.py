"""A completion's text as llama.cpp's tokens arrive: new text per token, never a half character or half a stop.

llama.cpp turns each token into its bytes on its own (``llama_token_to_piece``), and the pieces concatenate to the
whole text exactly, so an incremental UTF-8 decoder over the pieces gives the text without decoding any window
twice: it holds the first bytes of a character split across tokens until the rest arrive, and a byte sequence that
can never be valid comes out as U+FFFD at once, as OpenAI and vLLM send it. Text that could be the start of a stop
string is held back until the next tokens show whether it is one; when a stop string completes, the text before it
is the last chunk.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str]) -> None:
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._sent = 0
        # Past a stop string nothing more is decoded.
        self._stopped = False

    @property
    def text(self) -> str:
        return self._text

    def add(self, piece: bytes) -> tuple[str, bool]:
        """Append a token's bytes; return the text that may be sent now, and whether a stop string was reached."""
        self._text += self._decoder.decode(piece)
        if self._stop:
            # Only a stop string that ends in the new text can be new; search from where one could start.
            search_from = max(0, self._sent - self._longest_stop)
            found = [i for s in self._stop if (i := self._text.find(s, search_from)) != -1]
            if found:
                self._text = self._text[: min(found)]
                self._stopped = True
                return self._take(len(self._text)), True
        ready = len(self._text)
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, ready - self._sent), held, -1):
                if self._text[ready - size : ready] == stop[:size]:
                    held = size
                    break
        return self._take(ready - held), False

    def flush(self) -> str:
        """Everything not yet sent: at the end of a completion nothing is held back, and bytes of an unfinished
        character come out as U+FFFD."""
        if not self._stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        chunk = self._text[self._sent : end]
        self._sent = end
        return chunk
