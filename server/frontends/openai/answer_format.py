"""What shape an answer must take and how it is read back: OpenAI's tools, tool choice and response formats turned
into the engine's ``structured_outputs`` and the model's tool-call and reasoning parsers.

Chat, completions and the Responses API share it, so ``tool_choice: required`` means the same grammar whichever
route carried it, and a bad schema is refused under the name of the field the client sent. ``required`` and a
named function are enforced by the grammar (vLLM's shapes: a JSON array of calls, or the function's arguments
alone), so their arguments always parse and match the schema; ``auto`` lets the model write freely and parses
what it wrote with the format its configuration names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidInput
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.protocol import ChatTool, NamedToolChoice, ResponseFormat, SamplingFields
from server.frontends.openai.reasoning_parsers import ReasoningParser, ReasoningStreamer, reasoning_parser
from server.frontends.openai.tool_parsers import ToolCall, ToolCallDelta, ToolCallStreamer, ToolParser, tool_parser
from server.frontends.openai.tool_parsers.forced import (
    NamedFunctionParser,
    RequiredCallsParser,
    named_function_schema,
    required_calls_schema,
)
from server.protocol.generation import StructuredOutputsParams

TOOL_CALL_PARSER = "tool_call_parser"
REASONING_PARSER = "reasoning_parser"
LOGIT_BIAS_LIMIT = 100.0


@dataclass(slots=True)
class ParsedAnswer:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(slots=True)
class AnswerDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class AnswerFormat:
    """One request's constraint on the answer and the parsers that read it.

    ``field`` names the request field the constraint came from, so an engine's ``InvalidGrammar`` is reported as
    the client's field (``response_format.json_schema``), not the engine's.
    """

    structured_outputs: StructuredOutputsParams | None = None
    field: str | None = None
    template_tools: list[dict[str, Any]] | None = None
    tools: ToolParser | None = None
    reasoning: ReasoningParser | None = None

    def parse(self, text: str) -> ParsedAnswer:
        reasoning, rest = self.reasoning.extract(text) if self.reasoning is not None else (None, text)
        if self.tools is None:
            return ParsedAnswer(reasoning, rest, [])
        extracted = self.tools.extract_tool_calls(rest)
        return ParsedAnswer(reasoning, extracted.content, extracted.tool_calls)

    def streamer(self) -> AnswerStreamer:
        return AnswerStreamer(self)

    def client_error(self, exc: InvalidInput) -> InvalidInput:
        """An engine's refusal of the grammar, worded for the field the client sent; other errors as they are."""
        # ``server.structured_output.InvalidGrammar`` (it needs xgrammar, so it is recognised by its fields).
        kind, problem = getattr(exc, "kind", None), getattr(exc, "problem", None)
        if self.field is None or kind is None or problem is None:
            return exc
        return OpenAIRequestError(f"'{self.field}': {kind} {problem}", self.field)


class AnswerStreamer:
    """One choice's text as it streams, split into reasoning, content and tool-call pieces."""

    def __init__(self, answer_format: AnswerFormat) -> None:
        self.reasoning: ReasoningStreamer | None = (
            answer_format.reasoning.streamer() if answer_format.reasoning is not None else None
        )
        self.tools: ToolCallStreamer | None = answer_format.tools.streamer() if answer_format.tools else None

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.called

    def feed(self, text: str) -> AnswerDelta:
        out = AnswerDelta()
        if self.reasoning is not None:
            split = self.reasoning.feed(text)
            out.reasoning, text = split.reasoning, split.content
        self._content(out, text, finishing=False)
        return out

    def finish(self) -> AnswerDelta:
        out = AnswerDelta()
        text = ""
        if self.reasoning is not None:
            split = self.reasoning.finish()
            out.reasoning, text = split.reasoning, split.content
        self._content(out, text, finishing=True)
        return out

    def _content(self, out: AnswerDelta, text: str, finishing: bool) -> None:
        if self.tools is None:
            out.content = text
            return
        parsed = self.tools.feed(text) if text else None
        if parsed is not None:
            out.content, out.tool_calls = parsed.content, parsed.tool_calls
        if finishing:
            out.content += self.tools.finish().content


# -- request fields to the answer format ----------------------------------------------------------------------------
def structured_outputs(request: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint set by ``response_format``, ``structured_outputs`` or vLLM's ``guided_*``, and the field it
    came from. More than one is refused: which should win is not for the server to guess."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    if request.response_format is not None:
        params = response_format_params(request.response_format)
        if params is not None:
            name = "response_format.json_schema.schema" if request.response_format.type == "json_schema" else ""
            found.append((params, name or "response_format"))
    if request.structured_outputs is not None:
        set_fields = request.structured_outputs.given_specs()
        if len(set_fields) != 1:
            raise OpenAIRequestError(
                "'structured_outputs': set exactly one of json, json_object, regex, choice, grammar, structural_tag",
                "structured_outputs",
            )
        found.append((request.structured_outputs, f"structured_outputs.{set_fields[0]}"))
    guided = {
        "guided_json": ("json", request.guided_json),
        "guided_regex": ("regex", request.guided_regex),
        "guided_choice": ("choice", request.guided_choice),
        "guided_grammar": ("grammar", request.guided_grammar),
    }
    for name, (key, value) in guided.items():
        if value is not None:
            found.append((StructuredOutputsParams.model_validate({key: value}), name))
    if len(found) > 1:
        names = ", ".join(name for _, name in found)
        raise OpenAIRequestError(f"only one constraint on the answer may be set; got {names}", found[1][1])
    if not found:
        return None, None
    params, name = found[0]
    if params.regex is not None:
        try:
            re.compile(params.regex)
        except re.error as exc:
            raise OpenAIRequestError(f"'{name}': the regular expression does not compile: {exc}", name) from None
    return params, name


def response_format_params(response_format: ResponseFormat) -> StructuredOutputsParams | None:
    if response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.json_schema is None:
        raise OpenAIRequestError(
            "'response_format': type 'json_schema' needs a 'json_schema' with a 'schema'", "response_format.json_schema"
        )
    schema = response_format.json_schema.json_schema
    if not schema:
        raise OpenAIRequestError(
            "'response_format.json_schema.schema' is missing or empty", "response_format.json_schema.schema"
        )
    return StructuredOutputsParams.model_validate({"json": schema})


def answer_format(
    parameters: dict[str, str],
    model: str,
    tools: list[ChatTool] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool | None,
    constraint: tuple[StructuredOutputsParams | None, str | None] = (None, None),
    tools_field: str = "tools",
) -> AnswerFormat:
    """The answer format of a request with these tools and constraint, for a model with these ``parameters``."""
    structured, source = constraint
    reasoning_name = parameters.get(REASONING_PARSER, "")
    # A grammar over the whole answer leaves no room for thinking before it, so constrained answers are not split.
    reasoning = reasoning_parser(reasoning_name, model) if reasoning_name and structured is None else None
    result = AnswerFormat(structured_outputs=structured, field=source, reasoning=reasoning)
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise OpenAIRequestError("'tool_choice' needs 'tools': there is no tool to choose", "tool_choice")
        return result
    result.template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if tool_choice == "none":
        return result
    forced = tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)
    if forced and structured is not None:
        raise OpenAIRequestError(
            f"'tool_choice' {'required' if tool_choice == 'required' else 'of a named function'} and '{source}' "
            "both constrain the answer; send one",
            "tool_choice",
        )
    if isinstance(tool_choice, NamedToolChoice):
        chosen = [tool for tool in tools if tool.function.name == tool_choice.function.name]
        if not chosen:
            names = ", ".join(tool.function.name for tool in tools)
            raise OpenAIRequestError(
                f"'tool_choice' names function '{tool_choice.function.name}', which is not in 'tools' ({names})",
                "tool_choice",
            )
        result.structured_outputs = StructuredOutputsParams.model_validate(
            {"json": named_function_schema(chosen[0].function.parameters)}
        )
        result.field = f"{tools_field}.{tools.index(chosen[0])}"
        result.tools = NamedFunctionParser(tool_choice.function.name)
        result.reasoning = None
        return result
    if tool_choice == "required":
        schema = required_calls_schema(result.template_tools, parallel_tool_calls is not False)
        result.structured_outputs = StructuredOutputsParams.model_validate({"json": schema})
        result.field = tools_field
        result.tools = RequiredCallsParser()
        result.reasoning = None
        return result
    parser_name = parameters.get(TOOL_CALL_PARSER, "")
    if not parser_name:
        raise OpenAIRequestError(
            f"model '{model}' has no parameters.tool_call_parser, so it cannot choose tools itself ('auto'); "
            "send tool_choice 'required', a named function or 'none'",
            "tool_choice",
        )
    result.tools = tool_parser(parser_name, model)
    return result


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as string keys) as the engine's, each bias within -100..100."""
    if not bias:
        return {}
    result: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise OpenAIRequestError(f"'logit_bias': key '{key}' is not a token id", "logit_bias") from None
        if token < 0:
            raise OpenAIRequestError(f"'logit_bias': token id {token} is negative", "logit_bias")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise OpenAIRequestError(f"'logit_bias': the bias of token {token} is outside -100..100", "logit_bias")
        result[token] = value
    return result


def refuse_unsupported(request: Any, refused: dict[str, str], kept: dict[str, Any]) -> None:
    """A 400 naming the first field set that this server does not do (``REFUSED`` of the request model), unless
    its value asks for what the server does anyway (``KEPT_VALUES``)."""
    for name, reason in refused.items():
        value = getattr(request, name, None)
        if value is not None and not (name in kept and value == kept[name]):
            raise OpenAIRequestError(f"'{name}' is not supported by this server: {reason}", name)
