"""End to end over the OpenAI-compatible routes: the real server process, the official ``openai`` client and httpx.

The repository holds a tiny GPT-2 and a tiny BERT built at test time (random weights, trained tokenizer) beside an
ordinary ONNX model, so the tests also see that only language models are listed under ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from model_repository.language_models import build_causal_lm, build_encoder
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

GPT = "tiny_gpt"
EMBEDDER = "tiny_embedder"
ONE_SEAT = "tiny_gpt_one_seat"
ONE_SEAT_LEN = 8192
EMBED_MAX_BATCH = 4
MAX_MODEL_LEN = 1024
# Far more tokens than a client that leaves after a few chunks has seen.
LONG_ANSWER = MAX_MODEL_LEN - 64


@pytest.fixture(scope="module")
def llm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("openai") / "models"
    build_causal_lm(repository / GPT / "1", n_positions=MAX_MODEL_LEN)
    (repository / GPT / "config.yaml").write_text("backend: transformers\n")
    # One seat in its engine, so a second request waits; long enough a context that the first holds the seat.
    build_causal_lm(repository / ONE_SEAT / "1", n_positions=ONE_SEAT_LEN)
    (repository / ONE_SEAT / "config.yaml").write_text("backend: transformers\nparameters:\n  max_num_seqs: 1\n")
    build_encoder(repository / EMBEDDER / "1")
    (repository / EMBEDDER / "config.yaml").write_text(
        f"backend: transformers\nmax_batch_size: {EMBED_MAX_BATCH}\nparameters:\n  task: embed\n"
    )
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    return repository


@pytest.fixture(scope="module")
def llm_server(start_server: Callable[..., ServerProcess], llm_repository: Path) -> ServerProcess:
    server = start_server(llm_repository)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in (GPT, ONE_SEAT, EMBEDDER)):
            return server
        time.sleep(0.2)
    raise TimeoutError(f"language models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def client(llm_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def async_client(llm_server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{llm_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(llm_repository: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_repository / GPT / "1")


MESSAGES = [
    {"role": "system", "content": "You are a helpful robot."},
    {"role": "user", "content": "Tell me a story about a robot who learned to paint."},
]
# Greedy, and never stopped early by the random model happening to emit its end-of-text token.
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def chat_prompt_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- models --------------------------------------------------------------------------------------------------------
def test_models_lists_language_models_only(client: openai.OpenAI) -> None:
    listed = client.models.list()
    assert sorted(model.id for model in listed.data) == [EMBEDDER, GPT, ONE_SEAT]
    assert all(model.object == "model" and model.owned_by == "modeldock" for model in listed.data)
    assert client.models.retrieve(GPT).id == GPT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("simple")


# -- chat ----------------------------------------------------------------------------------------------------------
def test_chat_streamed_equals_whole_with_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    whole = client.chat.completions.create(model=GPT, messages=MESSAGES, max_tokens=24, **GREEDY)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == chat_prompt_tokens(tokenizer, MESSAGES)
    assert whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert whole.id.startswith("chatcmpl-")
    assert whole.model == GPT

    chunks = list(
        client.chat.completions.create(
            model=GPT, messages=MESSAGES, max_tokens=24, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    # include_usage: one last chunk with no choices and the totals.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_content_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=GPT, messages=MESSAGES, max_completion_tokens=8, **GREEDY)
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]},
    ]
    from_parts = client.chat.completions.create(model=GPT, messages=parts, max_completion_tokens=8, **GREEDY)
    assert from_parts.choices[0].message.content == plain.choices[0].message.content
    assert from_parts.usage is not None and from_parts.usage.completion_tokens == 8


def test_raw_sse_wire_format(llm_server: ServerProcess) -> None:
    body = {"model": GPT, "messages": MESSAGES, "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{llm_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-2])


async def test_async_client_chat_plain_and_streaming(async_client: openai.AsyncOpenAI) -> None:
    whole = await async_client.chat.completions.create(model=GPT, messages=MESSAGES, max_tokens=12, **GREEDY)
    stream = await async_client.chat.completions.create(
        model=GPT, messages=MESSAGES, max_tokens=12, stream=True, **GREEDY
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == whole.choices[0].message.content
    await async_client.close()


# -- completions ---------------------------------------------------------------------------------------------------
PROMPT = "Once upon a time there was a small robot"


def test_completion_streamed_equals_whole(client: openai.OpenAI, tokenizer: Any) -> None:
    whole = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=20, **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert whole.usage.completion_tokens == 20
    chunks = list(client.completions.create(model=GPT, prompt=PROMPT, max_tokens=20, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in chunks)


def test_completion_defaults_to_16_tokens_and_accepts_token_ids(client: openai.OpenAI, tokenizer: Any) -> None:
    default = client.completions.create(model=GPT, prompt=PROMPT, **GREEDY)
    assert default.usage is not None and default.usage.completion_tokens == 16
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    from_ids = client.completions.create(model=GPT, prompt=ids, **GREEDY)
    assert from_ids.choices[0].text == default.choices[0].text
    assert from_ids.usage is not None and from_ids.usage.prompt_tokens == len(ids)


def test_completion_several_prompts_and_choices(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "The weather today is"]
    singles = [client.completions.create(model=GPT, prompt=p, max_tokens=6, **GREEDY) for p in prompts]
    both = client.completions.create(model=GPT, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    expected = [singles[0].choices[0].text] * 2 + [singles[1].choices[0].text] * 2
    assert [c.text for c in both.choices] == expected
    assert both.usage is not None
    # Each prompt counted once, however many choices it has.
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)
    assert both.usage.completion_tokens == 4 * 6
    streamed = client.completions.create(model=GPT, prompt=prompts, max_tokens=6, n=2, stream=True, **GREEDY)
    texts = ["", "", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == expected


def test_completion_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=5, **GREEDY)
    echoed = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_stop_string_ends_the_completion_before_it(client: openai.OpenAI) -> None:
    full = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=30, **GREEDY).choices[0].text
    # A stop string from the middle of the greedy answer, made of printable characters.
    candidates = [m.start() for m in re.finditer(r"[A-Za-z]{2}", full) if len(full) // 4 <= m.start()]
    assert candidates, f"no usable stop string in {full!r}"
    stop = full[candidates[0] : candidates[0] + 2]
    stopped = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=30, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[: full.index(stop)]
    streamed = client.completions.create(model=GPT, prompt=PROMPT, max_tokens=30, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = client.completions.create(
            model=GPT,
            prompt=PROMPT,
            max_tokens=16,
            temperature=1.5,
            top_p=0.95,
            seed=seed,
            extra_body={"ignore_eos": True, "top_k": 50},
        )
        return response.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({first, *(sample(seed) for seed in range(1, 6))}) > 1


# -- embeddings ----------------------------------------------------------------------------------------------------
def test_embeddings_float_and_base64_agree_and_are_normalised(client: openai.OpenAI, llm_server: ServerProcess) -> None:
    texts = [f"{word} number {i}" for i, word in enumerate(["robot", "paint", "weather", "France", "fox", "dog"])]
    floats = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(texts)))
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 5)) for v in vectors}) == len(texts)
    # More texts than the model's max_batch_size: split into batches, answered in order.
    assert len(texts) > EMBED_MAX_BATCH
    single = client.embeddings.create(model=EMBEDDER, input=texts[3], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, vectors[3], atol=1e-5)

    raw = httpx.post(
        f"{llm_server.url}/v1/embeddings",
        json={"model": EMBEDDER, "input": texts, "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.array(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]], dtype=np.float32
    )
    np.testing.assert_allclose(decoded, vectors, atol=1e-6)
    assert raw["usage"]["prompt_tokens"] == floats.usage.prompt_tokens > 0
    # The client asks for base64 by default and decodes it.
    default = client.embeddings.create(model=EMBEDDER, input=texts)
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), vectors, atol=1e-6)


def test_embedding_token_usage(client: openai.OpenAI, llm_repository: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_repository / EMBEDDER / "1")
    texts = ["Hello world!", "The quick brown fox jumps over the lazy dog."]
    response = client.embeddings.create(model=EMBEDDER, input=texts)
    assert response.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)


def test_embeddings_dimensions_shortens_and_renormalises(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model=EMBEDDER, input="robot", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=EMBEDDER, input="robot", encoding_format="float", dimensions=16)
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (16,)
    np.testing.assert_allclose(vector, np.array(full[:16]) / np.linalg.norm(full[:16]), atol=1e-5)


# -- errors --------------------------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI, llm_server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no_such_model", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no_such_model", input="x")
    for path, body in [
        ("/v1/completions", {"model": "no_such_model", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "no_such_model", "messages": MESSAGES, "stream": True}),
    ]:
        response = httpx.post(f"{llm_server.url}{path}", json=body, timeout=30)
        assert response.status_code == 404
        error = error_of(response)
        assert error["code"] == "model_not_found"
        assert error["param"] == "model"
        assert "no_such_model" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"temperature": -1}, "temperature"),
        ("/v1/completions", {"top_p": 0}, "top_p"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": "a lot"}, "frequency_penalty"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"stop": [""]}, "stop"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": -5}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"top_k": -3}, "top_k"),
        ("/v1/chat/completions", {"model": EMBEDDER}, "model"),
        ("/v1/embeddings", {"model": GPT}, "model"),
        ("/v1/embeddings", {"encoding_format": "hex"}, "encoding_format"),
        ("/v1/embeddings", {"input": []}, "input"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(
    llm_server: ServerProcess, path: str, body: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"model": EMBEDDER, "input": "x"} if "embeddings" in path else {"model": GPT}
    if "chat" in path:
        base["messages"] = MESSAGES
    elif "completions" in path:
        base["prompt"] = PROMPT
    response = httpx.post(f"{llm_server.url}{path}", json={**base, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_bad_parameters_raise_bad_request_in_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=GPT, messages=MESSAGES, temperature=-0.5)
    assert "temperature" in str(raised.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=GPT, messages=MESSAGES, stream=True, top_p=2)


def test_body_that_is_not_json_is_400(llm_server: ServerProcess) -> None:
    response = httpx.post(f"{llm_server.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400
    assert "JSON" in error_of(response)["message"]


# -- client disconnects --------------------------------------------------------------------------------------------
def llm_gauge(server: ServerProcess, name: str, model: str = GPT) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def wait_for_gauge(server: ServerProcess, name: str, value: float, timeout: float = 10.0, model: str = GPT) -> float:
    deadline = time.monotonic() + timeout
    current = llm_gauge(server, name, model)
    while current != value and time.monotonic() < deadline:
        time.sleep(0.02)
        current = llm_gauge(server, name, model)
    return current


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_client_leaving_mid_stream_frees_its_sequence(llm_server: ServerProcess, path: str) -> None:
    assert wait_for_gauge(llm_server, "modeldock_llm_requests_running", 0) == 0
    aborted = llm_gauge(llm_server, "modeldock_llm_requests_aborted_total")
    generated = llm_gauge(llm_server, "modeldock_llm_generation_tokens_total")
    prompt: dict[str, Any] = {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    body = {"model": GPT, **prompt, "max_tokens": LONG_ANSWER, "stream": True, "ignore_eos": True}
    chunks = 0
    with httpx.stream("POST", f"{llm_server.url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
            if chunks == 3:
                assert llm_gauge(llm_server, "modeldock_llm_requests_running") == 1
                break
    # The connection is closed: the engine aborts the sequence instead of generating its LONG_ANSWER tokens.
    assert wait_for_gauge(llm_server, "modeldock_llm_requests_running", 0, timeout=5) == 0
    assert wait_for_gauge(llm_server, "modeldock_llm_requests_aborted_total", aborted + 1) == aborted + 1
    assert llm_gauge(llm_server, "modeldock_llm_generation_tokens_total") - generated < LONG_ANSWER / 2


async def test_async_client_closing_a_stream_frees_its_sequence(
    async_client: openai.AsyncOpenAI, llm_server: ServerProcess
) -> None:
    aborted = llm_gauge(llm_server, "modeldock_llm_requests_aborted_total")
    stream = await async_client.completions.create(
        model=GPT, prompt=PROMPT, max_tokens=LONG_ANSWER, stream=True, extra_body={"ignore_eos": True}
    )
    async for _ in stream:
        break
    await stream.close()
    gauge = await asyncio.to_thread(wait_for_gauge, llm_server, "modeldock_llm_requests_running", 0, 5)
    assert gauge == 0
    aborted_now = await asyncio.to_thread(
        wait_for_gauge, llm_server, "modeldock_llm_requests_aborted_total", aborted + 1
    )
    assert aborted_now == aborted + 1
    await async_client.close()


def test_client_leaving_before_a_whole_answer_frees_its_sequence(llm_server: ServerProcess) -> None:
    # The long-context model: its answer takes seconds, so the client surely leaves first (tiny_gpt's whole
    # LONG_ANSWER takes only about twice the client's timeout on a quiet machine).
    aborted = llm_gauge(llm_server, "modeldock_llm_requests_aborted_total", ONE_SEAT)
    body = {"model": ONE_SEAT, "prompt": PROMPT, "max_tokens": ONE_SEAT_LEN - 64, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{llm_server.url}/v1/completions", json=body, timeout=0.3)
    assert wait_for_gauge(llm_server, "modeldock_llm_requests_running", 0, timeout=5, model=ONE_SEAT) == 0
    aborted_now = wait_for_gauge(llm_server, "modeldock_llm_requests_aborted_total", aborted + 1, model=ONE_SEAT)
    assert aborted_now == aborted + 1


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_while_queued_frees_its_place(llm_server: ServerProcess, stream: bool) -> None:
    """A request still waiting for a seat in the engine is dropped when its client leaves, before any token."""
    aborted = llm_gauge(llm_server, "modeldock_llm_requests_aborted_total", ONE_SEAT)
    body = {"model": ONE_SEAT, "prompt": PROMPT, "ignore_eos": True}
    url = f"{llm_server.url}/v1/completions"
    with httpx.stream(
        "POST", url, json={**body, "max_tokens": ONE_SEAT_LEN - 64, "stream": True}, timeout=60
    ) as seated:
        assert seated.status_code == 200
        # Kept: closing the line iterator would close the connection, and the seated request with it.
        seated_lines = seated.iter_lines()
        next(seated_lines)
        # No answer (not even headers) comes while the request waits for the seat, so the client gives up.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={**body, "max_tokens": 8, "stream": stream}, timeout=httpx.Timeout(30, read=1.0))
        assert wait_for_gauge(llm_server, "modeldock_llm_requests_aborted_total", aborted + 1, model=ONE_SEAT) == (
            aborted + 1
        )
        # Gone from the queue while the seated request still runs.
        assert llm_gauge(llm_server, "modeldock_llm_requests_waiting", ONE_SEAT) == 0
        assert llm_gauge(llm_server, "modeldock_llm_requests_running", ONE_SEAT) == 1
        seated_lines.close()
    assert wait_for_gauge(llm_server, "modeldock_llm_requests_running", 0, model=ONE_SEAT) == 0


# -- API key -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_servers(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> list[ServerProcess]:
    """Two servers on a repository with just ``simple``: one given the key by flag, one by environment."""
    repository = tmp_path_factory.mktemp("keyed") / "models"
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    return [
        start_server(repository, "--openai-api-key", "s3cret-flag"),
        start_server(repository, env={"MODELDOCK_OPENAI_API_KEY": "s3cret-env"}),
    ]


@pytest.mark.parametrize(("which", "key"), [(0, "s3cret-flag"), (1, "s3cret-env")])
def test_api_key_required_when_set(keyed_servers: list[ServerProcess], which: int, key: str) -> None:
    server = keyed_servers[which]
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"}]:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")]:
            response = httpx.request(method, f"{server.url}{path}", headers=headers, json={}, timeout=10)
            assert response.status_code == 401, (headers, path)
            assert error_of(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).models.list().data == []
    # The KServe routes are not behind the key.
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


def test_api_key_not_required_when_unset(llm_server: ServerProcess) -> None:
    assert httpx.get(f"{llm_server.url}/v1/models", timeout=10).status_code == 200
    with_any_key = httpx.get(f"{llm_server.url}/v1/models", headers={"Authorization": "Bearer x"}, timeout=10)
    assert with_any_key.status_code == 200


@pytest.mark.parametrize("include_usage", [False, True])
def test_per_token_chunks_are_the_bytes_the_response_models_write(include_usage: bool) -> None:
    """The streaming fast path builds chunks from dicts; clients must not see a difference."""
    from server.frontends.openai.events import choice_event, sse
    from server.frontends.openai.protocol import (
        ChatChunkChoice,
        ChatCompletionChunk,
        ChatDelta,
        CompletionChoice,
        CompletionResponse,
    )

    exclude = None if include_usage else {"usage"}
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"}
    completion = CompletionResponse(
        id="cmpl-1", created=7, model="m", choices=[CompletionChoice(index=1, text='é "x"', finish_reason="stop")]
    )
    choice = {"index": 1, "text": 'é "x"', "logprobs": None, "finish_reason": "stop"}
    assert choice_event(head, choice, include_usage) == sse(completion.model_dump_json(exclude=exclude))

    head = {"id": "chat-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    chunk = ChatCompletionChunk(
        id="chat-1", created=7, model="m", choices=[ChatChunkChoice(index=0, delta=ChatDelta(content="hi"))]
    )
    choice = {"index": 0, "delta": {"role": None, "content": "hi"}, "logprobs": None, "finish_reason": None}
    assert choice_event(head, choice, include_usage) == sse(chunk.model_dump_json(exclude=exclude))
