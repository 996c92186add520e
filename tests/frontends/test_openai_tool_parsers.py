"""Tool-call and reasoning parsers on fixed model outputs, one format at a time, whole and streamed.

What a streaming client joins (content, each call's name and argument fragments) must equal what the whole answer
holds, however the text is cut into chunks; the texts are the formats as the model families write them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.errors import ConfigError
from server.frontends.openai.answer_format import AnswerFormat, answer_format
from server.frontends.openai.protocol import ChatTool, FunctionDefinition
from server.frontends.openai.reasoning_parsers import reasoning_parser
from server.frontends.openai.tool_parsers import TOOL_PARSERS, ToolParser, tool_parser
from server.frontends.openai.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser

WEATHER = {"city": "Paris", "days": [1, 2], "note": 'braces } and "quotes" {'}


def streamed(parser: ToolParser, text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    """Content and calls as a client joins them from the deltas (the id and name must come once, first)."""
    streamer = parser.streamer()
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    pieces = [streamer.feed(text[i : i + step]) for i in range(0, len(text), step)] + [streamer.finish()]
    for piece in pieces:
        content += piece.content
        for delta in piece.tool_calls:
            if delta.index not in calls:
                assert delta.id is not None and delta.id.startswith("call_") and delta.name
                calls[delta.index] = {"id": delta.id, "name": delta.name, "arguments": ""}
            else:
                assert delta.id is None and delta.name is None
            calls[delta.index]["arguments"] += delta.arguments
    return content, [calls[i] for i in sorted(calls)]


def check(
    parser: ToolParser, text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]], stream: bool = True
) -> None:
    whole = parser.extract_tool_calls(text)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in whole.tool_calls)
    if not stream:
        return
    for step in (1, 2, 3, 7, len(text)):
        joined, streamed_calls = streamed(parser, text, step)
        assert joined == (content or ""), step
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == [
            (c.name, c.arguments) for c in whole.tool_calls
        ], step


def test_registry_has_the_vllm_names_and_refuses_others() -> None:
    assert {"hermes", "llama3_json", "mistral"} <= set(TOOL_PARSERS)
    with pytest.raises(ConfigError, match="tool_call_parser 'nope'"):
        tool_parser("nope", "m")


def test_hermes() -> None:
    parser = tool_parser("hermes", "m")
    call = json.dumps({"name": "get_weather", "arguments": WEATHER})
    text = (
        f"Let me look.\n<tool_call>\n{call}\n</tool_call>\n<tool_call>\n"
        + '{"name": "now", "arguments": {}}</tool_call>'
    )
    check(parser, text, "Let me look.\n", [("get_weather", WEATHER), ("now", {})])
    check(
        parser, "No tools needed; a < b and <tool_ is not a tag.", "No tools needed; a < b and <tool_ is not a tag.", []
    )
    # A whole answer whose call does not parse is the model's text, not a call. (A stream has sent the call's name
    # by the time its arguments go wrong, as vLLM's has: only the whole answer can take it back.)
    broken = '<tool_call>\n{"name": "f", "arguments": {"x": }\n</tool_call>'
    check(parser, broken, broken, [], stream=False)


def test_hermes_arguments_sent_as_a_json_string() -> None:
    parser = tool_parser("hermes", "m")
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    check(parser, text, None, [("f", {"a": 1})])


def test_llama3_json() -> None:
    parser = tool_parser("llama3_json", "m")
    first = json.dumps({"name": "get_weather", "parameters": WEATHER})
    check(
        parser,
        f"<|python_tag|>{first}; " + '{"name": "now", "parameters": {}}',
        None,
        [("get_weather", WEATHER), ("now", {})],
    )
    check(parser, f"  {first}", None, [("get_weather", WEATHER)])
    check(parser, "The answer is {not a call}.", "The answer is {not a call}.", [])
    check(parser, '{"key": "value"}', '{"key": "value"}', [])


def test_mistral_array_and_args_forms() -> None:
    parser = tool_parser("mistral", "m")
    array = json.dumps([{"name": "get_weather", "arguments": WEATHER}, {"name": "now", "arguments": {}}])
    check(parser, f"[TOOL_CALLS]{array}", None, [("get_weather", WEATHER), ("now", {})])
    check(parser, f"Sure. [TOOL_CALLS]{array}", "Sure. ", [("get_weather", WEATHER), ("now", {})])
    v11 = f"[TOOL_CALLS]get_weather[ARGS]{json.dumps(WEATHER)}[TOOL_CALLS]now[ARGS]{{}}"
    check(parser, v11, None, [("get_weather", WEATHER), ("now", {})])
    check(parser, "[TOOL_CALL] is not the token", "[TOOL_CALL] is not the token", [])


def test_grammar_forced_shapes() -> None:
    check(NamedFunctionParser("get_weather"), " " + json.dumps(WEATHER), None, [("get_weather", WEATHER)])
    calls = json.dumps([{"name": "get_weather", "parameters": WEATHER}, {"name": "now", "parameters": {}}])
    check(RequiredCallsParser(), calls, None, [("get_weather", WEATHER), ("now", {})])


@pytest.mark.parametrize(
    ("name", "text", "reasoning", "content"),
    [
        ("deepseek_r1", "<think>\nSo 2 + 2 is 4.</think>\n\nIt is 4.", "\nSo 2 + 2 is 4.", "\n\nIt is 4."),
        ("deepseek_r1", "The prompt opened the thinking.</think>Answer.", "The prompt opened the thinking.", "Answer."),
        ("deepseek_r1", "Cut off while thinking", "Cut off while thinking", ""),
        ("qwen3", "<think>hmm</think>Answer.", "hmm", "Answer."),
        ("qwen3", "No thinking at all.", None, "No thinking at all."),
        ("qwen3", "<think>cut off", "cut off", ""),
    ],
)
def test_think_tags_whole_and_streamed(name: str, text: str, reasoning: str | None, content: str) -> None:
    parser = reasoning_parser(name, "m")
    assert parser.extract(text) == (reasoning, content)
    for step in (1, 2, 5, len(text)):
        streamer = parser.streamer()
        got_reasoning = got_content = ""
        for piece in [streamer.feed(text[i : i + step]) for i in range(0, len(text), step)] + [streamer.finish()]:
            got_reasoning += piece.reasoning
            got_content += piece.content
        assert (got_reasoning, got_content) == (reasoning or "", content)
    with pytest.raises(ConfigError, match="reasoning_parser"):
        reasoning_parser("nope", "m")


def test_reasoning_then_a_call_then_nothing_else() -> None:
    """A thinking model's answer: thinking, then a Hermes call; the call is parsed from what follows the thinking."""
    answer = AnswerFormat(tools=tool_parser("hermes", "m"), reasoning=reasoning_parser("deepseek_r1", "m"))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text = "I should look it up.</think>\n\n" + call
    whole = answer.parse(text)
    assert (whole.reasoning, whole.content) == ("I should look it up.", None)
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [("get_weather", {"city": "Paris"})]
    for step in (1, 4, len(text)):
        streamer = answer.streamer()
        reasoning = content = arguments = ""
        for piece in [streamer.feed(text[i : i + step]) for i in range(0, len(text), step)] + [streamer.finish()]:
            reasoning += piece.reasoning
            content += piece.content
            arguments += "".join(d.arguments for d in piece.tool_calls)
        assert (reasoning, content.strip(), arguments) == ("I should look it up.", "", whole.tool_calls[0].arguments)
        assert streamer.called


def test_parallel_tool_calls_false_caps_the_required_grammar_at_one_call() -> None:
    tools = [ChatTool(function=FunctionDefinition(name="f", parameters={"type": "object"}))]
    for parallel, cap in ((None, None), (True, None), (False, 1)):
        answer = answer_format({}, "m", tools, "required", parallel)
        assert answer.structured_outputs is not None
        schema = answer.structured_outputs.json_schema
        assert isinstance(schema, dict) and schema.get("maxItems") == cap and schema["minItems"] == 1
