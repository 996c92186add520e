"""A completion's text as it grows, sent in chunks that never end inside what may still become a stop string.

Every text engine (ModelDock's detokenizer over a transformers tokenizer, llama.cpp's byte pieces) decodes new text
its own way, but stop strings must behave the same for all of them: text that could be the start of a stop string
is held back until the next text shows whether it is one, and when a stop string completes, the text before it is
the last chunk and nothing after it is sent.
"""

from __future__ import annotations


class StopStringText:
    def __init__(self, stop: list[str]) -> None:
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def append(self, new: str) -> tuple[str, bool]:
        """Add newly decoded text; return the text that may be sent now, and whether a stop string was reached."""
        self._text += new
        if self._stop:
            # Only a stop string that ends in the new text can be new; search from where one could start.
            search_from = max(0, self._sent - self._longest_stop)
            found = [i for s in self._stop if (i := self._text.find(s, search_from)) != -1]
            if found:
                self._text = self._text[: min(found)]
                self.stopped = True
                return self._take(len(self._text)), True
        ready = len(self._text)
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, ready - self._sent), held, -1):
                if self._text[ready - size : ready] == stop[:size]:
                    held = size
                    break
        return self._take(ready - held), False

    def finish(self, rest: str = "") -> str:
        """Everything not yet sent, with ``rest`` (the decoder's last text) unless a stop string ended the text."""
        if not self.stopped:
            self._text += rest
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        chunk = self._text[self._sent : end]
        self._sent = end
        return chunk
