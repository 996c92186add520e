"""Structured outputs, logprobs and every request field end to end: the real server on the bundled tiny_gpt, the
``openai`` client, and transformers itself for the expected log-probabilities.

A random-weight model meets a schema only because the grammar holds it to one, so these tests see the constraint
working; schemas bound their strings, as a random model never ends a free string by itself. The last test walks
every field of the request models and sees each one change the answer, change its shape, or be refused by name:
nothing the client sends is dropped in silence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from server.frontends.openai.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from tests.conftest import ServerProcess
from tests.frontends.test_openai_tools import (
    GPT,
    MESSAGES,
    TEMPLATED,
    THINKER,
    TOOLS,
    agent_repository,
    start_agent_server,
)

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 120}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_repository(tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def agent_server(start_server: Callable[..., ServerProcess], repository: Path) -> ServerProcess:
    return start_agent_server(start_server, repository)


@pytest.fixture(scope="module")
def client(agent_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(repository: Path) -> tuple[Any, Any]:
    """The same model in transformers, for the log-probabilities the server must report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = repository / GPT / "1"
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


class Forecast(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    sunny: bool


# -- structured outputs -------------------------------------------------------------------------------------------
def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.parse(
            model=GPT, messages=MESSAGES, response_format=Forecast, seed=seed, temperature=1.0, max_tokens=150
        )
        parsed = answer.choices[0].message.parsed
        assert isinstance(parsed, Forecast), answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"


def test_json_schema_streamed_equals_whole(client: openai.OpenAI) -> None:
    schema = Forecast.model_json_schema()
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "forecast", "schema": schema, "strict": True},
    }
    # Seeded sampling: reproducible, and less given to the blank runs a schema allows than greedy decoding is.
    seeded: dict[str, Any] = {"seed": 1, "temperature": 1.0, "max_tokens": 200}
    whole = client.chat.completions.create(model=GPT, messages=MESSAGES, response_format=response_format, **seeded)
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), schema)
    chunks = client.chat.completions.create(
        model=GPT, messages=MESSAGES, response_format=response_format, stream=True, **seeded
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_json_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GPT, messages=MESSAGES, response_format={"type": "json_object"}, temperature=0, max_tokens=400
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    else:  # a random model may nest until the budget ends; what it wrote is still the start of an object
        assert (answer.choices[0].message.content or "").lstrip().startswith("{")


def test_disable_any_whitespace_keeps_greedy_json_to_its_separators(client: openai.OpenAI) -> None:
    """Greedy decoding of a random model is the case that fills ``max_tokens`` with the whitespace JSON allows;
    without it, every prompt's answer is the object, closed."""
    structured = {"json": Forecast.model_json_schema(), "disable_any_whitespace": True}
    for prompt in ("Once upon a time", "The weather:", "{"):
        answer = client.completions.create(
            model=GPT, prompt=prompt, temperature=0, max_tokens=200, extra_body={"structured_outputs": structured}
        )
        text = answer.choices[0].text
        assert answer.choices[0].finish_reason == "stop", text
        Forecast.model_validate_json(text)
        outside_strings = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
        assert not re.search(r"\s", outside_strings.replace(", ", ",").replace(": ", ":")), text


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-c]{3}-[0-9]{2}", t)),
        ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"grammar": 'root ::= "ab" | "cd" "e"'}}, lambda t: t in ("ab", "cde")),
        ({"guided_regex": "[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{4}", t)),
        ({"guided_choice": ["red", "blue"]}, lambda t: t in ("red", "blue")),
    ],
)
def test_structured_outputs_fields_in_chat_and_completions(
    client: openai.OpenAI, extra: dict[str, Any], check: Callable[[str], Any]
) -> None:
    for seed in range(2):
        chat = client.chat.completions.create(
            model=GPT, messages=MESSAGES, extra_body=extra, seed=seed, temperature=1.0, max_tokens=20
        )
        assert check(chat.choices[0].message.content or ""), chat.choices[0].message.content
        assert chat.choices[0].finish_reason == "stop"
        completion = client.completions.create(
            model=GPT, prompt="Once upon a time", extra_body=extra, seed=seed, temperature=1.0, max_tokens=20
        )
        assert check(completion.choices[0].text), completion.choices[0].text


def test_grammar_that_cannot_finish_ends_with_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GPT, messages=MESSAGES, extra_body={"structured_outputs": {"regex": "a{50}"}}, temperature=0, max_tokens=5
    )
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        # Valid for Python, refused by the grammar engine: its error still names the client's field.
        ({"structured_outputs": {"regex": "(?=a)a"}}, "structured_outputs.regex"),
        ({"guided_regex": "(?=a)a"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"jsonn": {}}}, "structured_outputs.jsonn"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "big",
                        "schema": {
                            "type": "object",
                            "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(1000)},
                        },
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(
    agent_server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    url = f"{agent_server.url}/v1/chat/completions"
    response = httpx.post(url, json={"model": GPT, "messages": MESSAGES, "max_tokens": 4, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert httpx.post(url, json={"model": GPT, "messages": MESSAGES, "max_tokens": 2}, timeout=60).status_code == 200


# -- logprobs -------------------------------------------------------------------------------------------------------
def reference_logprobs(reference: tuple[Any, Any], ids: list[int]) -> Any:
    import torch

    _, model = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_completion_logprobs_match_transformers(client: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    tokenizer, _ = reference
    prompt = "Once upon a time there was a small robot"
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer = client.completions.create(
        model=GPT, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True, extra_body={"ignore_eos": True}
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert answer.choices[0].text.startswith(prompt)
    count = len(prompt_ids) + 6
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == count
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    generated = tokenizer(answer.choices[0].text[len(prompt) :], add_special_tokens=False)["input_ids"]
    expected = reference_logprobs(reference, prompt_ids + generated)
    ids = prompt_ids + generated
    for position in range(1, count):
        want = float(expected[position - 1, ids[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(want, abs=2e-3), position
        top = logprobs.top_logprobs[position]
        assert top is not None and len(top) <= 3
        assert max(top.values()) == pytest.approx(float(expected[position - 1].max()), abs=2e-3)
    # Greedy: each generated token is the most likely one, so its logprob is the best of its top list.
    for position in range(len(prompt_ids), count):
        top = logprobs.top_logprobs[position]
        assert top is not None and logprobs.token_logprobs[position] == pytest.approx(max(top.values()), abs=1e-5)
    # Offsets point at each token's text in the choice's text.
    text = answer.choices[0].text
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        if "\ufffd" not in token:
            assert text[offset : offset + len(token)] == token


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 4,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(model=GPT, messages=MESSAGES, **options)
    content = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert content is not None and len(content) == 8
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 4
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(model=GPT, messages=MESSAGES, stream=True, **options)
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_streamed_equal_whole(client: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(model=GPT, prompt="Once upon a time", **options).choices[0]
    assert whole.logprobs is not None
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    offsets: list[int] = []
    text = ""
    for chunk in client.completions.create(model=GPT, prompt="Once upon a time", stream=True, **options):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens or []
                token_logprobs += choice.logprobs.token_logprobs or []
                offsets += choice.logprobs.text_offset or []
    assert text == whole.text
    assert (tokens, token_logprobs, offsets) == (
        whole.logprobs.tokens,
        whole.logprobs.token_logprobs,
        whole.logprobs.text_offset,
    )


def test_prompt_logprobs_in_vllm_shape(client: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    tokenizer, _ = reference
    prompt = "Hello world"
    ids = tokenizer(prompt)["input_ids"]
    answer = client.completions.create(model=GPT, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    entries = answer.choices[0].model_dump()["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    expected = reference_logprobs(reference, ids)
    for position in range(1, len(ids)):
        chosen = entries[position][str(ids[position])]
        assert chosen["logprob"] == pytest.approx(float(expected[position - 1, ids[position]]), abs=2e-3)


def test_logit_bias_changes_the_answer(client: openai.OpenAI, reference: tuple[Any, Any]) -> None:
    tokenizer, _ = reference
    forced = tokenizer.convert_tokens_to_ids("robot") if "robot" in tokenizer.get_vocab() else 100
    plain = client.completions.create(
        model=GPT, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    biased = client.completions.create(
        model=GPT,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert biased.choices[0].text == tokenizer.decode([forced] * 4) != plain.choices[0].text


def test_n_choices(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=GPT, messages=MESSAGES, n=3, seed=7, temperature=1.0, max_tokens=8)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1


# -- tokenize -------------------------------------------------------------------------------------------------------
def test_tokenize_and_detokenize(agent_server: ServerProcess, reference: tuple[Any, Any]) -> None:
    tokenizer, _ = reference
    url = agent_server.url
    body = httpx.post(
        f"{url}/v1/tokenize", json={"model": GPT, "prompt": "Hello world", "return_token_strs": True}
    ).json()
    assert body["tokens"] == tokenizer("Hello world")["input_ids"]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = httpx.post(f"{url}/v1/tokenize", json={"model": GPT, "messages": MESSAGES}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    back = httpx.post(f"{url}/v1/detokenize", json={"model": GPT, "tokens": body["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    bad = httpx.post(f"{url}/v1/detokenize", json={"model": GPT, "tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    missing = httpx.post(f"{url}/v1/tokenize", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404


# -- every field used or refused ------------------------------------------------------------------------------------
REFUSED = "refused"
CHANGES = "changes"
SAME = "same"
TOOL = TOOLS[1]
EOS = 0  # <|endoftext|>, the tokenizer's first special token
SPACE = 100


MISSING = "missing"
# Placeholders filled in when the test runs: the text of the SPACE token, and the id of an earlier response.
STOP_TEXT = "STOP_TEXT"
PREVIOUS = "PREVIOUS"


# field -> (body changes, expectation, reference changes): the expectation compares the answer with the request
# without the field (the reference: the base body with ``reference`` changes), or checks the answer's shape, or
# wants a 400 naming the field. ``SAME`` is for fields that by their nature do not change an answer.
CHAT_FIELDS: dict[str, tuple[dict[str, Any], Any, dict[str, Any]]] = {
    "model": ({"model": THINKER}, CHANGES, {}),
    "messages": ({"messages": [{"role": "user", "content": "Hello world!"}]}, CHANGES, {}),
    "temperature": ({"temperature": 1.5, "seed": 1}, CHANGES, {}),
    "top_p": ({"temperature": 1.0, "seed": 3, "top_p": 1e-6}, CHANGES, {"temperature": 1.0, "seed": 3}),
    "top_k": ({"temperature": 1.0, "seed": 3, "top_k": 1}, CHANGES, {"temperature": 1.0, "seed": 3}),
    "seed": ({"temperature": 1.0, "seed": 4}, CHANGES, {"temperature": 1.0, "seed": 5}),
    "stop": ({"logit_bias": {str(SPACE): 100}, "stop": [STOP_TEXT]}, CHANGES, {"logit_bias": {str(SPACE): 100}}),
    # Penalties act once a token repeats: long enough an answer that the greedy one does.
    "presence_penalty": ({"max_tokens": 32, "presence_penalty": 2.0}, CHANGES, {"max_tokens": 32}),
    "frequency_penalty": ({"max_tokens": 32, "frequency_penalty": 2.0}, CHANGES, {"max_tokens": 32}),
    "repetition_penalty": ({"max_tokens": 32, "repetition_penalty": 3.0}, CHANGES, {"max_tokens": 32}),
    "logit_bias": ({"logit_bias": {str(SPACE): 100}}, CHANGES, {}),
    "min_tokens": (
        {"ignore_eos": False, "logit_bias": {str(EOS): 100}, "min_tokens": 3},
        CHANGES,
        {"ignore_eos": False, "logit_bias": {str(EOS): 100}},
    ),
    "ignore_eos": (
        {"ignore_eos": True, "logit_bias": {str(EOS): 100}},
        CHANGES,
        {"ignore_eos": False, "logit_bias": {str(EOS): 100}},
    ),
    "stop_token_ids": (
        {"logit_bias": {str(SPACE): 100}, "stop_token_ids": [SPACE]},
        CHANGES,
        {"logit_bias": {str(SPACE): 100}},
    ),
    "max_tokens": ({"max_tokens": 3}, CHANGES, {}),
    "max_completion_tokens": ({"max_completion_tokens": 3}, CHANGES, {}),
    "n": ({"n": 2}, (lambda a: len(a["choices"]) == 2), {}),
    "stream": ({"stream": True}, (lambda a: a["streamed"]), {}),
    "stream_options": (
        {"stream": True, "stream_options": {"include_usage": True}},
        (lambda a: a["usage"] is not None),
        {},
    ),
    "response_format": ({"response_format": {"type": "json_object"}}, CHANGES, {}),
    "structured_outputs": ({"structured_outputs": {"choice": ["yes", "no"]}}, CHANGES, {}),
    "guided_json": (
        {"guided_json": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}},
        CHANGES,
        {},
    ),
    "guided_regex": ({"guided_regex": "[xyz]{4}"}, CHANGES, {}),
    "guided_choice": ({"guided_choice": ["left", "right"]}, CHANGES, {}),
    "guided_grammar": ({"guided_grammar": 'root ::= "hi"'}, CHANGES, {}),
    "prompt_logprobs": ({"prompt_logprobs": 1}, (lambda a: a.get("prompt_logprobs") is not None), {}),
    "logprobs": ({"logprobs": True}, (lambda a: a["choices"][0]["logprobs"] is not None), {}),
    "top_logprobs": ({"top_logprobs": 2}, REFUSED, {}),
    "tools": ({"tools": [TOOL]}, CHANGES, {}),
    "tool_choice": ({"tools": [TOOL], "tool_choice": "required"}, CHANGES, {"tools": [TOOL]}),
    # The required grammar's cap on calls: see test_parallel_tool_calls_false_allows_one_call.
    "parallel_tool_calls": ({"parallel_tool_calls": False}, SAME, {}),
    "reasoning_effort": ({"model": TEMPLATED, "reasoning_effort": "high"}, CHANGES, {"model": TEMPLATED}),
    "chat_template_kwargs": (
        {"model": TEMPLATED, "chat_template_kwargs": {"style": "x"}},
        CHANGES,
        {"model": TEMPLATED},
    ),
    "add_generation_prompt": ({"add_generation_prompt": False}, CHANGES, {}),
    "continue_final_message": (
        {
            "add_generation_prompt": False,
            "continue_final_message": True,
            "messages": [*MESSAGES, {"role": "assistant", "content": "It is"}],
        },
        CHANGES,
        {"messages": [*MESSAGES, {"role": "assistant", "content": "It is"}]},
    ),
    "user": ({"user": "someone"}, SAME, {}),
    "metadata": ({"metadata": {"k": "v"}}, SAME, {}),
    "store": ({"store": True}, SAME, {}),
    "service_tier": ({"service_tier": "auto"}, SAME, {}),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, SAME, {}),
    "safety_identifier": ({"safety_identifier": "s"}, SAME, {}),
    "prediction": ({"prediction": {"type": "content", "content": "x"}}, SAME, {}),
    "min_p": ({"min_p": 0.1}, REFUSED, {}),
    "use_beam_search": ({"use_beam_search": True}, REFUSED, {}),
    "include_stop_str_in_output": ({"include_stop_str_in_output": True}, REFUSED, {}),
    "skip_special_tokens": ({"skip_special_tokens": False}, REFUSED, {}),
    "truncate_prompt_tokens": ({"truncate_prompt_tokens": 4}, REFUSED, {}),
    "functions": ({"functions": [TOOL["function"]]}, REFUSED, {}),
    "function_call": ({"function_call": "auto"}, REFUSED, {}),
    "audio": ({"audio": {"voice": "alloy", "format": "wav"}}, REFUSED, {}),
    "modalities": ({"modalities": ["text", "audio"]}, REFUSED, {}),
    "web_search_options": ({"web_search_options": {}}, REFUSED, {}),
    "verbosity": ({"verbosity": "low"}, REFUSED, {}),
    "best_of": ({"best_of": 2}, REFUSED, {}),
    "echo": ({"echo": True}, REFUSED, {}),
}
COMPLETION_ONLY = {
    "prompt": ({"prompt": "Hello world!"}, CHANGES, {}),
    "echo": ({"echo": True}, CHANGES, {}),
    "logprobs": ({"logprobs": 2}, (lambda a: a["choices"][0]["logprobs"] is not None), {}),
    "suffix": ({"suffix": "the end"}, REFUSED, {}),
    "best_of": ({"best_of": 3}, REFUSED, {}),
    "prompt_logprobs": ({"prompt_logprobs": 1}, (lambda a: a["choices"][0].get("prompt_logprobs") is not None), {}),
}
COMPLETION_FIELDS = {
    name: CHAT_FIELDS[name] for name in CompletionRequest.model_fields if name in CHAT_FIELDS
} | COMPLETION_ONLY
COMPLETION_FIELDS["model"] = ({"model": "no_such_model"}, MISSING, {})
RESPONSES_FIELDS: dict[str, tuple[dict[str, Any], Any, dict[str, Any]]] = {
    "model": ({"model": THINKER}, CHANGES, {}),
    "input": ({"input": "Hello world!"}, CHANGES, {}),
    "instructions": ({"instructions": "Be brief."}, CHANGES, {}),
    "tools": ({"tools": [{"type": "function", **TOOL["function"]}]}, CHANGES, {}),
    "tool_choice": (
        {"tools": [{"type": "function", **TOOL["function"]}], "tool_choice": "required"},
        CHANGES,
        {"tools": [{"type": "function", **TOOL["function"]}]},
    ),
    "parallel_tool_calls": ({"parallel_tool_calls": False}, SAME, {}),
    "text": ({"text": {"format": {"type": "json_object"}}}, CHANGES, {}),
    "max_output_tokens": ({"max_output_tokens": 3}, CHANGES, {}),
    "temperature": ({"temperature": 1.5}, CHANGES, {}),
    # Near-zero top_p makes a hot sampler greedy: the same answer as temperature 0.
    "top_p": ({"temperature": 1.5, "top_p": 1e-9}, SAME, {}),
    "stream": ({"stream": True}, (lambda a: a["streamed"]), {}),
    "store": ({"store": False}, (lambda a: a["store"] is False), {}),
    "previous_response_id": ({"previous_response_id": PREVIOUS}, CHANGES, {}),
    "reasoning": ({"model": TEMPLATED, "reasoning": {"effort": "high"}}, CHANGES, {"model": TEMPLATED}),
    "metadata": ({"metadata": {"k": "v"}}, SAME, {}),
    "user": ({"user": "someone"}, SAME, {}),
    "service_tier": ({"service_tier": "auto"}, SAME, {}),
    "safety_identifier": ({"safety_identifier": "s"}, SAME, {}),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, SAME, {}),
    "stream_options": ({"stream_options": {"include_obfuscation": False}}, SAME, {}),
    "include": ({"include": ["message.output_text.logprobs"]}, REFUSED, {}),
    "truncation": ({"truncation": "auto"}, REFUSED, {}),
    "background": ({"background": True}, REFUSED, {}),
    "max_tool_calls": ({"max_tool_calls": 1}, REFUSED, {}),
    "prompt": ({"prompt": {"id": "pmpt_1"}}, REFUSED, {}),
    "conversation": ({"conversation": "conv_1"}, REFUSED, {}),
    "top_logprobs": ({"top_logprobs": 2}, REFUSED, {}),
}


def answer_of(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The status and a comparable answer: the JSON body, or for a stream its joined text and last usage."""
    if not body.get("stream"):
        response = httpx.post(url + path, json=body, timeout=120)
        answer = response.json()
        answer["streamed"] = False
        return response.status_code, answer
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    usage = [e["usage"] for e in events if e.get("usage")]
    return response.status_code, {"streamed": True, "events": len(events), "usage": usage[-1] if usage else None}


def comparable(path: str, answer: dict[str, Any]) -> Any:
    if "responses" in path:
        return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in answer["output"]]
    return (
        [{k: v for k, v in c.items() if k != "message"} | {"message": _message(c)} for c in answer["choices"]],
        answer["usage"]["completion_tokens"],
    )


def _message(choice: dict[str, Any]) -> Any:
    message = choice.get("message")
    if message is None:
        return None
    return {k: v for k, v in message.items() if k != "tool_calls"} | {
        "tool_calls": [c["function"] for c in message.get("tool_calls") or []]
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "model", "fields", "base"),
    [
        (
            "/v1/chat/completions",
            ChatCompletionRequest,
            CHAT_FIELDS,
            {"model": GPT, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        ),
        (
            "/v1/completions",
            CompletionRequest,
            COMPLETION_FIELDS,
            {"model": GPT, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        ),
        (
            "/v1/responses",
            ResponsesRequest,
            RESPONSES_FIELDS,
            {"model": GPT, "input": "Once upon a time", "max_output_tokens": 8, "temperature": 0},
        ),
    ],
)
def test_every_request_field_is_used_or_refused(
    agent_server: ServerProcess,
    reference: tuple[Any, Any],
    path: str,
    model: type[BaseModel],
    fields: dict[str, Any],
    base: dict[str, Any],
) -> None:
    assert set(fields) == set(model.model_fields), "a request field without a probe here"
    url = agent_server.url
    status, first = answer_of(url, path, base)
    assert status == 200, first
    placeholders = {STOP_TEXT: [reference[0].decode([SPACE])], PREVIOUS: first.get("id")}
    for name, (change, expectation, reference_change) in fields.items():
        body = {**base, **change}
        for key, value in change.items():
            if value == PREVIOUS:
                body[key] = placeholders[PREVIOUS]
            elif value == [STOP_TEXT]:
                body[key] = placeholders[STOP_TEXT]
        status, answer = answer_of(url, path, body)
        if expectation in (REFUSED, MISSING):
            assert status == (400 if expectation == REFUSED else 404), (name, answer)
            assert answer["error"]["param"] == name, (name, answer)
            continue
        assert status == 200, (name, answer)
        if callable(expectation):
            assert expectation(answer), (name, answer)
            if "responses" in path and name == "store":
                got = httpx.get(f"{url}/v1/responses/{answer['id']}", timeout=30)
                assert got.status_code == 404
            continue
        status, reference = answer_of(url, path, {**base, **reference_change})
        assert status == 200, (name, reference)
        if expectation == SAME:
            assert comparable(path, answer) == comparable(path, reference), name
        else:
            assert comparable(path, answer) != comparable(path, reference), name
