"""``POST /v1/responses`` end to end with the ``openai`` client: plain and streamed answers, function tools, JSON
schema text formats, reasoning items, and continuing from a stored response.

The streamed events are checked as the client's own stream helper reads them (``responses.stream`` needs every
event in order to rebuild the final response), and the answer must equal chat's for the same prompt: both routes
run the same engine on the same chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import ServerProcess
from tests.frontends.test_openai_tools import GPT, THINKER, TOOLS, agent_repository, start_agent_server

FUNCTIONS: list[Any] = [{"type": "function", **tool["function"]} for tool in TOOLS]
SCHEMAS = {tool["name"]: tool["parameters"] for tool in FUNCTIONS}
QUESTION = "What is the weather in Paris?"
# Greedy and long enough to finish a forced call; plain answers stop at the budget (status "incomplete").
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 120}


@pytest.fixture(scope="module")
def agent_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    return start_agent_server(start_server, agent_repository(tmp_path_factory.mktemp("responses")))


@pytest.fixture(scope="module")
def client(agent_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_text_answer_equals_chat(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=GPT, input=QUESTION, instructions="Be brief.", temperature=0, max_output_tokens=16
    )
    chat = client.chat.completions.create(
        model=GPT,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=16,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and chat.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens, 16)
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"


def test_input_messages_and_streamed_events(client: openai.OpenAI) -> None:
    conversation: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
        {"role": "user", "content": QUESTION},
    ]
    whole = client.responses.create(model=GPT, input=conversation, temperature=0, max_output_tokens=12)
    events = list(
        client.responses.create(model=GPT, input=conversation, temperature=0, max_output_tokens=12, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text


def test_stream_helper_rebuilds_a_completed_response(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=GPT, input=QUESTION, tools=FUNCTIONS, tool_choice="required", **GREEDY
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and final.status == "completed"
    assert "".join(deltas) == "".join(call.arguments for call in calls)
    for call in calls:
        assert call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_named_function_and_a_second_turn_with_its_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=GPT, input=QUESTION, tools=FUNCTIONS, tool_choice={"type": "function", "name": "get_time"}, **GREEDY
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    # The client sends the call and its output back, as the Agents SDK does without a stored response.
    second = client.responses.create(
        model=GPT,
        input=[
            {"role": "user", "content": QUESTION},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"},
        ],
        tools=FUNCTIONS,
        tool_choice="none",
        temperature=0,
        max_output_tokens=8,
    )
    assert second.output_text
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_previous_response_id_continues_a_stored_response(client: openai.OpenAI) -> None:
    first = client.responses.create(model=GPT, input=QUESTION, temperature=0, max_output_tokens=8)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    follow = client.responses.create(
        model=GPT, input="And tomorrow?", previous_response_id=first.id, temperature=0, max_output_tokens=8
    )
    replayed = client.responses.create(
        model=GPT,
        input=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And tomorrow?"},
        ],
        temperature=0,
        max_output_tokens=8,
    )
    assert follow.previous_response_id == first.id
    assert follow.output_text == replayed.output_text
    assert follow.usage is not None and replayed.usage is not None
    assert follow.usage.input_tokens == replayed.usage.input_tokens
    unstored = client.responses.create(model=GPT, input=QUESTION, store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=GPT, input="x", previous_response_id=unstored.id, max_output_tokens=2)
    assert raised.value.body["param"] == "previous_response_id"  # type: ignore[index]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=GPT,
        input=QUESTION,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
        temperature=1.0,
        max_output_tokens=200,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_reasoning_item(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=GPT, input=QUESTION, temperature=0, max_output_tokens=10)
    thought = client.responses.create(model=THINKER, input=QUESTION, temperature=0, max_output_tokens=10)
    reasoning = [item for item in thought.output if item.type == "reasoning"]
    assert reasoning and reasoning[0].content is not None
    assert reasoning[0].content[0].text == plain.output_text
    events = list(
        client.responses.create(model=THINKER, input=QUESTION, temperature=0, max_output_tokens=10, stream=True)
    )
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")  # type: ignore[union-attr]
    assert streamed == plain.output_text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": FUNCTIONS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
            "text.format.schema",
        ),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
        ),
        ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"background": True}, "background"),
    ],
)
def test_bad_requests_are_400_naming_the_field(agent_server: ServerProcess, body: dict[str, Any], param: str) -> None:
    url = f"{agent_server.url}/v1/responses"
    response = httpx.post(url, json={"model": GPT, "input": QUESTION, "max_output_tokens": 4, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert httpx.post(url, json={"model": GPT, "input": "x", "max_output_tokens": 2}, timeout=60).status_code == 200


@pytest.mark.slow
async def test_openai_agents_sdk_runs_a_tool_and_a_typed_answer(agent_server: ServerProcess) -> None:
    """The Agents SDK streams the Responses API: a forced tool call runs the Python function, and an output type
    comes back as its pydantic object."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from pydantic import BaseModel, Field

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    calls: list[str] = []

    @function_tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a time zone."""
        calls.append(zone)
        return f"12:00 {zone}"

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        confidence: int = Field(ge=0, le=9)

    client = openai.AsyncOpenAI(base_url=f"{agent_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = OpenAIResponsesModel(model=GPT, openai_client=client)
    clock = Agent(
        name="clock",
        instructions="Tell the time.",
        tools=[get_time],
        model=model,
        tool_use_behavior="stop_on_first_tool",
        model_settings=ModelSettings(tool_choice="get_time", temperature=0, max_tokens=100),
    )
    told = await Runner.run(clock, "What time is it?", max_turns=2)
    assert len(calls) == 1 and told.final_output == f"12:00 {calls[0]}"

    judge = Agent(
        name="judge",
        instructions="Judge.",
        model=model,
        output_type=Verdict,
        model_settings=ModelSettings(temperature=1.0, max_tokens=200),
    )
    verdict = await Runner.run(judge, "Is it sunny?")
    assert isinstance(verdict.final_output, Verdict)
