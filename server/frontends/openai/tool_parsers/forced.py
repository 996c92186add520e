"""The calls of ``tool_choice`` ``required`` or a named function, whose shape the grammar imposes (as vLLM does):
a named function's answer is its arguments object alone; ``required`` gets a JSON array of
``{"name": ..., "parameters": {...}}``, one per call. Not in the registry: the request, not the model, picks them.
"""

from __future__ import annotations

from typing import Any

from server.frontends.openai.tool_parsers.tool_parser import PartialCall, ToolParser, object_calls, value_end


class NamedFunctionParser(ToolParser):
    """The whole answer is the arguments of the one function the client named."""

    def __init__(self, function: str) -> None:
        self.function = function

    def find_start(self, text: str) -> tuple[int, int] | None:
        return 0, 0

    def held_back(self, text: str) -> int:
        return 0

    def partial_calls(self, region: str) -> list[PartialCall]:
        start = len(region) - len(region.lstrip())
        end = value_end(region, start) if start < len(region) else None
        arguments = region[start:end] if end is not None else region[start:]
        return [PartialCall(self.function, arguments, end is not None)]


class RequiredCallsParser(ToolParser):
    """The whole answer is a JSON array of calls."""

    def find_start(self, text: str) -> tuple[int, int] | None:
        return 0, 0

    def held_back(self, text: str) -> int:
        return 0

    def partial_calls(self, region: str) -> list[PartialCall]:
        return object_calls(region, ("name",), ("parameters",))


def named_function_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The grammar of a named function's answer: its parameters' schema (an object with no properties if none)."""
    return parameters or {"type": "object", "properties": {}}


def required_calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The grammar of ``required``: an array of at least one call of a listed function with arguments matching its
    schema; at most one with ``parallel_tool_calls: false``."""
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool["function"]["name"]]},
                "parameters": named_function_schema(tool["function"].get("parameters")),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
