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

from server.protocol.stop_strings import StopStringText


class TextStream:
    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = StopStringText(stop)

    def add(self, piece: bytes) -> tuple[str, bool]:
        """Append a token's bytes; return the text that may be sent now, and whether a stop string was reached."""
        return self._text.append(self._decoder.decode(piece))

    def flush(self) -> str:
        """Everything not yet sent: at the end of a completion nothing is held back, and bytes of an unfinished
        character come out as U+FFFD."""
        if self._text.stopped:
            return self._text.finish()
        return self._text.finish(self._decoder.decode(b"", final=True))
