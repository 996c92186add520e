"""Tool calls and reasoning end to end: the real server on the bundled tiny_gpt, the ``openai`` client, and
LangChain's ``ChatOpenAI`` as an agent framework would drive it.

The model has random weights, so what it writes freely is noise; ``tool_choice`` ``required`` and a named function
are enforced by the grammar, so even this model's calls must parse and match the function's schema. ``auto`` is
checked by making the model write a Hermes call (vLLM's ``structured_outputs.choice`` holds it to that text) and
seeing it come back parsed, whole and streamed. Schemas bound their strings: a random model never ends a free
string by itself.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

GPT = "tiny_gpt"
THINKER = "tiny_thinker"
TEMPLATED = "tiny_templated"
MODELS = (GPT, THINKER, TEMPLATED)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The forecast for a city", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 120}
# Renders the template variables a request may set, so a test can see that they reached the template.
TEMPLATE_WITH_VARIABLES = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if reasoning_effort is defined %}effort {{ reasoning_effort }}\n{% endif %}"
    "{% if style is defined %}style {{ style }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def agent_repository(root: Path) -> Path:
    """The bundled tiny_gpt (Hermes tool parser), a copy that thinks (DeepSeek-R1's reasoning parser), and a copy
    whose chat template writes the request's template variables (and no tool-call parser)."""
    repository = root / "models"
    shutil.copytree(BUNDLED_REPOSITORY / GPT, repository / GPT)
    shutil.copytree(BUNDLED_REPOSITORY / GPT, repository / THINKER)
    (repository / THINKER / "config.yaml").write_text(
        "backend: transformers\nparameters:\n  tool_call_parser: hermes\n  reasoning_parser: deepseek_r1\n"
    )
    shutil.copytree(BUNDLED_REPOSITORY / GPT, repository / TEMPLATED)
    (repository / TEMPLATED / "1" / "chat_template.jinja").write_text(TEMPLATE_WITH_VARIABLES)
    (repository / TEMPLATED / "config.yaml").write_text("backend: transformers\n")
    return repository


def start_agent_server(start_server: Callable[..., ServerProcess], repository: Path) -> ServerProcess:
    server = start_server(repository)
    deadline = time.monotonic() + 90
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in MODELS):
            return server
        time.sleep(0.2)
    raise TimeoutError(f"models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def agent_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return start_agent_server(start_server, agent_repository(tmp_path_factory.mktemp("agents")))


@pytest.fixture(scope="module")
def client(agent_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_call(name: str, arguments: str) -> dict[str, Any]:
    assert name in SCHEMAS
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return parsed  # type: ignore[no-any-return]


def joined_tool_calls(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Streamed tool-call deltas joined as a client joins them: id and name once, then argument fragments."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls


# -- grammar-forced calls ------------------------------------------------------------------------------------------
def test_required_tool_call_parses_and_matches_its_schema(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model=GPT,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            temperature=1.0,
            max_tokens=200,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert_valid_call(call.function.name, call.function.arguments)


def test_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GPT,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **GREEDY,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [call.function.name for call in choice.message.tool_calls or []] == ["get_time"]
    assert assert_valid_call("get_time", choice.message.tool_calls[0].function.arguments)["zone"] in ("UTC", "CET")


def test_parallel_tool_calls_false_allows_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model=GPT,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            seed=seed,
            temperature=1.0,
            max_tokens=200,
        )
        assert len(answer.choices[0].message.tool_calls or []) == 1


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_join_to_the_whole_answer(client: openai.OpenAI, tool_choice: Any) -> None:
    whole = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=GPT, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, stream=True, **GREEDY
        )
    )
    calls = joined_tool_calls(chunks)
    expected = whole.choices[0].message.tool_calls or []
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    for call in calls.values():
        assert_valid_call(call["name"], call["arguments"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # Arguments come in more than one fragment: they stream as the model writes them.
    fragments = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if d.function.arguments]
    assert len(fragments) > 1


# -- auto: the model's own text, parsed ------------------------------------------------------------------------------
def test_auto_parses_a_hermes_call_whole_and_streamed(client: openai.OpenAI) -> None:
    forced_text = {"structured_outputs": {"choice": [HERMES_CALL]}}
    answer = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, extra_body=forced_text, **GREEDY)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    chunks = list(
        client.chat.completions.create(
            model=GPT, messages=MESSAGES, tools=TOOLS, extra_body=forced_text, stream=True, **GREEDY
        )
    )
    [streamed] = joined_tool_calls(chunks).values()
    assert (streamed["name"], json.loads(streamed["arguments"])) == ("get_weather", {"city": "Paris", "days": 3})
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_auto_leaves_plain_text_as_content(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, tool_choice="none", **GREEDY)
    auto = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, **GREEDY)
    # The random model writes no <tool_call>, so auto answers with the same text that 'none' gives.
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].message.content == plain.choices[0].message.content
    assert auto.choices[0].finish_reason == "length"


def test_tools_reach_the_chat_template(client: openai.OpenAI, agent_server: ServerProcess) -> None:
    with_tools = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, tool_choice="none", **GREEDY)
    without = client.chat.completions.create(model=GPT, messages=MESSAGES, **GREEDY)
    assert with_tools.usage is not None and without.usage is not None
    counted = httpx.post(
        f"{agent_server.url}/v1/tokenize", json={"model": GPT, "messages": MESSAGES, "tools": TOOLS}, timeout=30
    ).json()
    assert with_tools.usage.prompt_tokens == counted["count"] > without.usage.prompt_tokens


def test_a_conversation_with_calls_and_tool_results(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=GPT, messages=MESSAGES, tools=TOOLS, tool_choice="required", **GREEDY)
    calls = first.choices[0].message.tool_calls or []
    conversation: list[Any] = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"} for call in calls),
    ]
    second = client.chat.completions.create(model=GPT, messages=conversation, tools=TOOLS, tool_choice="none", **GREEDY)
    assert second.choices[0].message.content
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


# -- reasoning ------------------------------------------------------------------------------------------------------
def test_reasoning_content_whole_and_streamed(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=GPT, messages=MESSAGES, **GREEDY)
    thought = client.chat.completions.create(model=THINKER, messages=MESSAGES, **GREEDY)
    message = thought.choices[0].message.model_dump()
    # Same weights, so the same text; DeepSeek-R1's parser puts text without </think> in the thinking.
    assert message["reasoning_content"] == plain.choices[0].message.content
    assert not message["content"]
    chunks = list(client.chat.completions.create(model=THINKER, messages=MESSAGES, stream=True, **GREEDY))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == message["reasoning_content"]
    assert not "".join(d.get("content") or "" for d in deltas)


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(
    agent_server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(
        f"{agent_server.url}/v1/chat/completions", json={"model": GPT, "messages": MESSAGES, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    # The server keeps serving.
    assert (
        httpx.post(
            f"{agent_server.url}/v1/chat/completions",
            json={"model": GPT, "messages": MESSAGES, "max_tokens": 2},
            timeout=60,
        ).status_code
        == 200
    )


def test_auto_without_a_configured_parser_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_call_parser"):
        client.chat.completions.create(model=TEMPLATED, messages=MESSAGES, tools=TOOLS, max_tokens=4)


def test_template_variables_reach_the_template(client: openai.OpenAI, agent_server: ServerProcess) -> None:
    def count(**extra: Any) -> int:
        body = {"model": TEMPLATED, "messages": MESSAGES, **extra}
        return int(httpx.post(f"{agent_server.url}/v1/tokenize", json=body, timeout=30).json()["count"])

    base = client.chat.completions.create(model=TEMPLATED, messages=MESSAGES, max_tokens=2)
    effort = client.chat.completions.create(model=TEMPLATED, messages=MESSAGES, max_tokens=2, reasoning_effort="high")
    styled = client.chat.completions.create(
        model=TEMPLATED, messages=MESSAGES, max_tokens=2, extra_body={"chat_template_kwargs": {"style": "terse"}}
    )
    assert base.usage and effort.usage and styled.usage
    assert effort.usage.prompt_tokens == count(chat_template_kwargs={"reasoning_effort": "high"})
    assert styled.usage.prompt_tokens == count(chat_template_kwargs={"style": "terse"})
    assert base.usage.prompt_tokens == count() < effort.usage.prompt_tokens


# -- an agent framework -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_langchain_bind_tools_and_structured_output(agent_server: ServerProcess) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a time zone."""
        return f"12:00 {zone}"

    class Forecast(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(
        model=GPT, base_url=f"{agent_server.url}/v1", api_key="unused", temperature=0, max_tokens=120, max_retries=0
    )
    # An agent's loop: the model must call the tool, the tool runs, its result goes back, the model answers.
    with_tools = llm.bind_tools([get_time], tool_choice="get_time")
    question = HumanMessage("What time is it?")
    asked = with_tools.invoke([question])
    [call] = asked.tool_calls
    assert call["name"] == "get_time" and call["args"]["zone"] in ("UTC", "CET")
    result = get_time.invoke(call["args"])
    answered = llm.invoke([question, asked, ToolMessage(result, tool_call_id=call["id"])])
    assert isinstance(answered.content, str) and answered.content

    forecast = llm.with_structured_output(Forecast, method="json_schema").invoke("The forecast for Paris?")
    assert isinstance(forecast, Forecast) and 1 <= forecast.days <= 7 and len(forecast.city) <= 12
