"""Hermes and Qwen: each call a JSON object between ``<tool_call>`` and ``</tool_call>``, after any text.

I'll look that up.<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
"""

from __future__ import annotations

from server.frontends.openai.tool_parsers.tool_parser import (
    PartialCall,
    ToolParser,
    partial_marker_suffix,
    read_call_object,
)

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def find_start(self, text: str) -> tuple[int, int] | None:
        at = text.find(START)
        return None if at < 0 else (at, at)

    def held_back(self, text: str) -> int:
        return partial_marker_suffix(text, (START,))

    def partial_calls(self, region: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        for block in region.split(START)[1:]:
            body = block.split(END, 1)[0]
            brace = body.find("{")
            if brace < 0:
                # An opened block with no object yet: a call still to come, unless the block was closed empty.
                if END not in block:
                    calls.append(PartialCall(None, "", False))
                    break
                continue
            call, end = read_call_object(body, brace, ("name",), ("arguments", "parameters"))
            calls.append(call)
            if end is None:
                break
        return calls
