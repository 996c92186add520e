"""Llama 3.1+ JSON tool calls: the answer is one or more ``{"name": ..., "parameters": {...}}`` objects (``;``
between them), optionally after ``<|python_tag|>``; an answer that starts otherwise is plain content.
"""

from __future__ import annotations

from server.frontends.openai.tool_parsers.tool_parser import PartialCall, ToolParser, object_calls

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def find_start(self, text: str) -> tuple[int, int] | None:
        stripped = text.lstrip()
        at = len(text) - len(stripped)
        if stripped.startswith(PYTHON_TAG):
            return at, at + len(PYTHON_TAG)
        if stripped.startswith("{"):
            return at, at
        return None

    def held_back(self, text: str) -> int:
        # Only the start of the answer decides; until it has a character that is neither blank nor the start of
        # the tag, it may still be a call.
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0

    def partial_calls(self, region: str) -> list[PartialCall]:
        return object_calls(region, ("name",), ("parameters", "arguments"))
