"""The tool-call formats by the name a model's ``parameters.tool_call_parser`` gives (vLLM's names)."""

from __future__ import annotations

from server.errors import ConfigError
from server.frontends.openai.tool_parsers.hermes import HermesToolParser
from server.frontends.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from server.frontends.openai.tool_parsers.mistral import MistralToolParser
from server.frontends.openai.tool_parsers.tool_parser import ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
# Qwen 2.5 and 3 write Hermes' format; vLLM serves them under this name too.
TOOL_PARSERS["qwen"] = HermesToolParser


def tool_parser(name: str, model: str) -> ToolParser:
    """The parser named ``name``; an unknown name is the model configuration's error, named as such."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ConfigError(
            f"model '{model}': parameters.tool_call_parser '{name}' is not one of {', '.join(sorted(TOOL_PARSERS))}"
        ) from None
