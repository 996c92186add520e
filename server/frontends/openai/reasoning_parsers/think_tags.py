"""Thinking between ``<think>`` and ``</think>``, as DeepSeek-R1 and Qwen3 write it.

The two differ in where the thinking starts. DeepSeek-R1's chat template ends the prompt with ``<think>``, so the
answer starts inside the thinking and often has no opening tag: everything before ``</think>`` is reasoning, and
an answer cut off before it is all reasoning. Qwen3 writes the opening tag itself (its template adds an empty pair
when ``enable_thinking`` is false), so an answer that does not open with ``<think>`` is all content.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import ConfigError

START = "<think>"
END = "</think>"


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """``starts_thinking``: whether the answer begins inside the thinking without an opening tag."""

    def __init__(self, name: str, starts_thinking: bool) -> None:
        self.name = name
        self.starts_thinking = starts_thinking

    def extract(self, text: str) -> tuple[str | None, str]:
        """A whole answer as (reasoning, content); reasoning is None when the model did not think."""
        stripped = text.lstrip()
        opened = stripped.startswith(START)
        if not opened and not self.starts_thinking:
            return None, text
        body = stripped[len(START) :] if opened else text
        reasoning, found, content = body.partition(END)
        if found:
            return reasoning, content
        return body, ""

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self)


class ReasoningStreamer:
    """The same split as ``extract``, made chunk by chunk: a tag's characters are held until it is whole."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.buffer = ""
        # "start": not yet known whether the answer opens with a tag; then "reasoning", then "content".
        self.state = "start"

    def feed(self, delta: str) -> ReasoningDelta:
        self.buffer += delta
        out = ReasoningDelta()
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if START.startswith(stripped):
                if len(stripped) < len(START):
                    return out  # blanks or part of the opening tag: wait
                self.buffer = ""
                self.state = "reasoning"
                return out
            if stripped.startswith(START):
                self.buffer = stripped[len(START) :]
                self.state = "reasoning"
            else:
                self.state = "reasoning" if self.parser.starts_thinking else "content"
        if self.state == "reasoning":
            at = self.buffer.find(END)
            if at < 0:
                keep = _partial_suffix(self.buffer, END)
                out.reasoning = self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep :]
                return out
            out.reasoning = self.buffer[:at]
            self.buffer = self.buffer[at + len(END) :]
            self.state = "content"
        out.content = self.buffer
        self.buffer = ""
        return out

    def finish(self) -> ReasoningDelta:
        """What is still held when the answer ends (part of a tag that never completed, or blanks)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning" or (self.state == "start" and self.parser.starts_thinking):
            return ReasoningDelta(reasoning=rest)
        return ReasoningDelta(content=rest)


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


REASONING_PARSERS: dict[str, ReasoningParser] = {
    "deepseek_r1": ReasoningParser("deepseek_r1", starts_thinking=True),
    "qwen3": ReasoningParser("qwen3", starts_thinking=False),
}


def reasoning_parser(name: str, model: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ConfigError(
            f"model '{model}': parameters.reasoning_parser '{name}' is not one of {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
