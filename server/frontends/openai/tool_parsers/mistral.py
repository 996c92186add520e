"""Mistral: calls after the ``[TOOL_CALLS]`` token, either a JSON array of ``{"name", "arguments"}`` objects (the
v3 tokenizers) or ``name[ARGS]{...}`` per call, each behind its own ``[TOOL_CALLS]`` (v11 and later).
"""

from __future__ import annotations

from server.frontends.openai.tool_parsers.tool_parser import (
    PartialCall,
    ToolParser,
    object_calls,
    partial_marker_suffix,
    skip_whitespace,
    value_end,
)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"

    def find_start(self, text: str) -> tuple[int, int] | None:
        at = text.find(TOOL_CALLS)
        return None if at < 0 else (at, at + len(TOOL_CALLS))

    def held_back(self, text: str) -> int:
        return partial_marker_suffix(text, (TOOL_CALLS,))

    def partial_calls(self, region: str) -> list[PartialCall]:
        if region.lstrip()[:1] in ("[", "{"):
            return object_calls(region, ("name",), ("arguments",))
        calls: list[PartialCall] = []
        for piece in region.split(TOOL_CALLS):
            name, found, rest = piece.partition(ARGS)
            if not found:
                # The name is whole only once ``[ARGS]`` follows it.
                calls.append(PartialCall(None, "", False))
                break
            start = skip_whitespace(rest, 0)
            end = value_end(rest, start)
            arguments = rest[start:end] if end is not None else rest[start:]
            calls.append(PartialCall(name.strip(), arguments, end is not None))
            if end is None:
                break
        return calls
