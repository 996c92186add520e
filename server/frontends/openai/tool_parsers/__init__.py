"""Tool calls found in what a model writes: one module per model family's format, chosen by name.

A model's ``parameters.tool_call_parser`` names its format (``hermes``, ``llama3_json``, ``mistral``), as vLLM's
``--tool-call-parser`` does; ``registry`` maps the names to parser classes. Each parser splits a whole answer into
content and calls, and streams the same split as the text arrives (``ToolCallStreamer``): content until a call
begins, then each call's id and name once, then its arguments in fragments. ``forced`` reads the JSON that the
grammar imposes for ``tool_choice`` ``required`` or a named function. Part of the OpenAI front end; imports only the
standard library and ``server.errors``.
"""

from server.frontends.openai.tool_parsers.registry import TOOL_PARSERS, tool_parser
from server.frontends.openai.tool_parsers.tool_parser import (
    ExtractedToolCalls,
    StreamedDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
)

__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCalls",
    "StreamedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStreamer",
    "ToolParser",
    "tool_parser",
]
