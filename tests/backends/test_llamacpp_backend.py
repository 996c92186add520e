"""``backend: llamacpp`` end to end: a tiny Llama written as GGUF at test time, served by the real server, talked to
with the official ``openai`` client and httpx, and checked against llama-cpp-python's own ``Llama`` on the same file.

The reference runs in this process with the settings the served model has (same ``n_ctx``, ``logits_all``), so
greedy answers, seeded samples, grammar-constrained answers and log-probabilities must agree token for token.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason='needs the llamacpp extra: pip install "modeldock[llamacpp]"')
import jsonschema  # noqa: E402
import openai  # noqa: E402

from model_repository.gguf_models import build_tiny_llama, build_tiny_llama_gguf  # noqa: E402
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

LLAMA = "tiny_llama"
ONE_SEAT = "tiny_llama_one_seat"
BAD_KEY = "tiny_llama_bad_key"
BAD_TYPE = "tiny_llama_bad_type"
N_CTX = 256
# Long enough that a request holding the one seat is still generating when the next ones arrive.
ONE_SEAT_CTX = 16384
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was",
    "ModelDock serves machine learning models",
    "What is the capital of France?",
]
SCHEMA = {
    "type": "object",
    # Letters only: the random model's stray bytes would otherwise be characters to the grammar and U+FFFD here.
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,12}$"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, gguf_file: Path) -> Path:
    repository = tmp_path_factory.mktemp("llamacpp") / "models"
    configs = {
        LLAMA: f"instance_group:\n  - count: 2\n    kind: KIND_CPU\nparameters:\n  n_ctx: {N_CTX}\n  logits_all: true\n",
        ONE_SEAT: f"parameters:\n  n_ctx: {ONE_SEAT_CTX}\n  max_queue_size: 0\n",
        BAD_KEY: "parameters:\n  n_ctxx: 256\n",
        BAD_TYPE: "parameters:\n  n_threads: many\n",
    }
    for name, parameters in configs.items():
        (repository / name / "1").mkdir(parents=True)
        shutil.copy(gguf_file, repository / name / "1" / "model.gguf")
        (repository / name / "config.yaml").write_text(f"backend: llamacpp\n{parameters}")
    return repository


def _states(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index").json()}


@pytest.fixture(scope="module")
def llama_server(start_server: Callable[..., ServerProcess], repository: Path) -> ServerProcess:
    server = start_server(repository)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = _states(server)
        if all(rows.get(name, {}).get("state") == "READY" for name in (LLAMA, ONE_SEAT)):
            return server
        time.sleep(0.2)
    raise TimeoutError(f"llamacpp models not ready: {rows}\n{server.log()}")


@pytest.fixture(scope="module")
def client(llama_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(gguf_file: Path) -> Any:
    """llama-cpp-python's own ``Llama`` on the same file, with the served model's settings."""
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=N_CTX, logits_all=True, n_threads=1, verbose=False)
    yield llama
    llama.close()


def _reference_text(reference: Any, prompt: str, max_tokens: int, **kwargs: Any) -> tuple[str, int]:
    """llama-cpp-python's ``create_completion`` (greedy unless told otherwise): its text and token count."""
    kwargs.setdefault("temperature", 0.0)
    result = reference.create_completion(prompt, max_tokens=max_tokens, **kwargs)
    return result["choices"][0]["text"], result["usage"]["completion_tokens"]


def assert_same_as_llama_cpp(ours: str, reference: Any, prompt: str, max_tokens: int, **kwargs: Any) -> None:
    """``ours`` is what ``create_completion`` answers, up to two ways of writing the same tokens.

    llama-cpp-python drops bytes that never form UTF-8 (the random model emits some), where ModelDock sends them as
    U+FFFD as OpenAI and vLLM do; and it runs past ``max_tokens`` while the last character's bytes are incomplete,
    where ModelDock stops at ``max_tokens`` (the tokens it did generate must then be the first of llama.cpp's).
    """
    theirs, their_tokens = _reference_text(reference, prompt, max_tokens, **kwargs)
    mine = ours.replace("\ufffd", "")
    if their_tokens > max_tokens:
        assert theirs.startswith(mine) and len(mine) > 0, (ours, theirs)
    else:
        assert mine == theirs, (ours, theirs)


def greedy_tokens(reference: Any, prompt: str, max_tokens: int) -> list[int]:
    """The tokens llama-cpp-python's own loop (``Llama.generate``, which ``create_completion`` runs) picks greedily,
    up to ``max_tokens`` or the end-of-generation token."""
    tokens: list[int] = []
    for token in reference.generate(reference.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0):
        tokens.append(token)
        if len(tokens) >= max_tokens or token == reference.token_eos():
            break
    return tokens


# -- the GGUF file ----------------------------------------------------------------------------------------------
def test_gguf_file_is_the_transformers_model(reference: Any) -> None:
    """The writer's tensor names and rotary permutation are right: llama.cpp tokenizes as the Hugging Face tokenizer
    does, computes the same logits (to float16 KV-cache precision) and decodes greedily to the same tokens."""
    import numpy as np
    import torch

    model, tokenizer = build_tiny_llama()
    for prompt in PROMPTS[:2]:
        ids = reference.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        reference.reset()
        reference.eval(ids)
        assert np.abs(reference.scores[: len(ids)] - logits).max() < 0.05
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
        assert greedy_tokens(reference, prompt, 16) == expected


# -- plain, streaming, chat ------------------------------------------------------------------------------------------
def test_model_is_listed_and_ready(client: openai.OpenAI, llama_server: ServerProcess) -> None:
    assert {LLAMA, ONE_SEAT} <= {model.id for model in client.models.list().data}
    config = httpx.get(f"{llama_server.url}/v2/models/{LLAMA}/config").json()
    assert config["backend"] == "llamacpp"
    assert [t["name"] for t in config["output"]] == ["text_output"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_llama_cpp(client: openai.OpenAI, reference: Any, prompt: str) -> None:
    answer = client.completions.create(model=LLAMA, prompt=prompt, max_tokens=24, temperature=0)
    assert_same_as_llama_cpp(answer.choices[0].text, reference, prompt, 24)
    tokens = greedy_tokens(reference, prompt, 24)
    expected = reference.detokenize([t for t in tokens if t != reference.token_eos()]).decode(errors="replace")
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == len(tokens)
    assert answer.usage.prompt_tokens == len(reference.tokenize(prompt.encode(), add_bos=False, special=True))


def test_stop_string_ends_the_answer_as_llama_cpp_does(client: openai.OpenAI, reference: Any) -> None:
    full, _ = _reference_text(reference, PROMPTS[1], max_tokens=40)
    stop = next(full[i : i + 2] for i in range(len(full) // 2, len(full)) if full[i : i + 2].isascii())
    answer = client.completions.create(model=LLAMA, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop])
    assert_same_as_llama_cpp(answer.choices[0].text, reference, PROMPTS[1], 40, stop=[stop])
    assert answer.choices[0].text.replace("\ufffd", "") == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_streaming_sends_the_answer_token_by_token(client: openai.OpenAI, reference: Any) -> None:
    chunks = list(
        client.completions.create(
            model=LLAMA,
            prompt=PROMPTS[0],
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert_same_as_llama_cpp("".join(texts), reference, PROMPTS[0], 32)
    assert len([t for t in texts if t]) > 16  # many small chunks, not one at the end
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32


def test_chat_renders_the_gguf_chat_template(client: openai.OpenAI, reference: Any) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Hello world!"}]
    formatter = Jinja2ChatFormatter(
        template=reference.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    prompt = formatter(messages=messages).prompt
    assert prompt.endswith("<|assistant|>")
    answer = client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=20, temperature=0)
    assert_same_as_llama_cpp(answer.choices[0].message.content, reference, prompt, 20)


def test_generate_extension_answers_as_llama_cpp(llama_server: ServerProcess, reference: Any) -> None:
    response = httpx.post(
        f"{llama_server.url}/v2/models/{LLAMA}/generate",
        json={"text_input": PROMPTS[2], "parameters": {"max_tokens": 16, "temperature": 0}},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    text = response.json()["text_output"]
    assert text.startswith(PROMPTS[2])
    assert_same_as_llama_cpp(text[len(PROMPTS[2]) :], reference, PROMPTS[2], 16)


# -- sampling ------------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_llama_cpp_s(client: openai.OpenAI, reference: Any) -> None:
    settings = {"temperature": 1.0, "top_p": 1.0}
    first = client.completions.create(model=LLAMA, prompt=PROMPTS[3], seed=7, max_tokens=24, **settings)
    second = client.completions.create(model=LLAMA, prompt=PROMPTS[3], seed=7, max_tokens=24, **settings)
    assert first.choices[0].text == second.choices[0].text
    assert_same_as_llama_cpp(first.choices[0].text, reference, PROMPTS[3], 24, seed=7, top_k=0, min_p=0.0, **settings)


def test_logit_bias_forces_a_token(client: openai.OpenAI, reference: Any) -> None:
    token = reference.tokenize(b" fox", add_bos=False)[0]
    answer = client.completions.create(
        model=LLAMA, prompt=PROMPTS[0], max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    piece = reference.detokenize([token]).decode()
    assert answer.choices[0].text == piece * 4


def test_logprobs_are_llama_cpp_s(client: openai.OpenAI, reference: Any) -> None:
    result = reference.create_completion(PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=2)
    expected = result["choices"][0]["logprobs"]["token_logprobs"]
    answer = client.completions.create(model=LLAMA, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    got = answer.choices[0].logprobs
    assert len(got.token_logprobs) == len(expected)
    for value, reference_value in zip(got.token_logprobs, expected, strict=True):
        assert math.isclose(value, reference_value, abs_tol=1e-3)
    assert all(len(top) == 2 for top in got.top_logprobs)


def test_echoed_prompt_logprobs_are_llama_cpp_s(client: openai.OpenAI, reference: Any) -> None:
    import numpy as np

    ids = reference.tokenize(PROMPTS[2].encode(), add_bos=False, special=True)
    reference.reset()
    reference.eval(ids)
    logits = reference.scores[: len(ids)].astype(np.float64)
    logprobs = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    expected = [logprobs[i - 1, ids[i]] for i in range(1, len(ids))]
    answer = client.completions.create(
        model=LLAMA, prompt=PROMPTS[2], max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    got = answer.choices[0].logprobs.token_logprobs
    assert got[0] is None
    assert np.allclose(got[1 : len(ids)], expected, atol=1e-3)


def test_min_tokens_holds_the_end_back(client: openai.OpenAI, reference: Any) -> None:
    eos = reference.token_eos()
    # Bias the end token so it would come first; min_tokens must still hold it back for 5 tokens.
    answer = client.completions.create(
        model=LLAMA,
        prompt=PROMPTS[0],
        max_tokens=20,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 5},
    )
    assert answer.usage.completion_tokens == 6
    assert answer.choices[0].finish_reason == "stop"


# -- structured outputs --------------------------------------------------------------------------------------------
def test_json_schema_output_matches_the_schema_and_llama_cpp(client: openai.OpenAI, reference: Any) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    prompt = "Describe a person as JSON:"
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    answer = client.completions.create(
        model=LLAMA, prompt=prompt, max_tokens=120, temperature=0, extra_body={"structured_outputs": {"json": SCHEMA}}
    )
    text = answer.choices[0].text
    assert_same_as_llama_cpp(text, reference, prompt, 120, grammar=grammar)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_disable_any_whitespace_gives_compact_json_as_llama_cpp_would(client: openai.OpenAI, reference: Any) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    from backends.llamacpp.sampling import structured_output_grammar
    from server.protocol.generation import StructuredOutputsParams

    prompt = "Describe a person as JSON:"
    structured = {"json": SCHEMA, "disable_any_whitespace": True}
    compact = structured_output_grammar(StructuredOutputsParams.model_validate(structured))
    assert 'space ::= ""' in compact
    answer = client.completions.create(
        model=LLAMA, prompt=prompt, max_tokens=120, temperature=0, extra_body={"structured_outputs": structured}
    )
    text = answer.choices[0].text
    assert_same_as_llama_cpp(text, reference, prompt, 120, grammar=LlamaGrammar.from_string(compact, verbose=False))
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == json.dumps(json.loads(text), separators=(",", ":"))  # the names are letters only: no escapes


def test_response_format_json_schema_through_chat(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=LLAMA,
        messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)


def test_streamed_grammar_output_is_the_same(client: openai.OpenAI) -> None:
    request = {
        "model": LLAMA,
        "prompt": "JSON:",
        "max_tokens": 120,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"json": SCHEMA}},
    }
    whole = client.completions.create(**request).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **request) if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_choice_and_gbnf_grammar(client: openai.OpenAI) -> None:
    choices = ["red", "green", "blue"]
    answer = client.completions.create(
        model=LLAMA,
        prompt="Pick a colour:",
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert answer.choices[0].text in choices
    answer = client.completions.create(
        model=LLAMA,
        prompt="Say yes or no:",
        max_tokens=10,
        temperature=0,
        extra_body={"structured_outputs": {"grammar": 'root ::= ("yes" | "no") "!"'}},
    )
    assert answer.choices[0].text in ("yes!", "no!")


# -- bad requests and bad configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
        ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}, "json"),
    ],
)
def test_unsupported_or_broken_constraints_are_400(client: openai.OpenAI, extra: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=LLAMA, prompt="x", max_tokens=4, extra_body=extra)
    assert field in str(caught.value)
    # The instance keeps serving.
    assert client.completions.create(model=LLAMA, prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_bad_requests_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="logits_all"):
        client.completions.create(model=ONE_SEAT, prompt="x", max_tokens=4, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=LLAMA, prompt="x", max_tokens=2, logit_bias={"99999": 5})
    with pytest.raises(openai.BadRequestError, match="n_ctx"):
        client.completions.create(model=LLAMA, prompt="x", max_tokens=N_CTX + 1)
    with pytest.raises(openai.BadRequestError, match="tokens"):
        client.completions.create(model=LLAMA, prompt="fox " * N_CTX, max_tokens=4)


def test_bad_parameters_are_refused_naming_the_field(llama_server: ServerProcess) -> None:
    rows = _states(llama_server)
    assert rows[BAD_KEY]["state"] == "UNAVAILABLE"
    assert "parameters.n_ctxx" in rows[BAD_KEY]["reason"]
    assert rows[BAD_TYPE]["state"] == "UNAVAILABLE"
    assert "parameters.n_threads" in rows[BAD_TYPE]["reason"]


# -- concurrency, overload, abort ----------------------------------------------------------------------------------
def test_two_instances_serve_concurrent_clients(llama_server: ServerProcess, reference: Any) -> None:

    async def ask_all() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as async_client:

            async def ask(prompt: str) -> tuple[str, str]:
                answer = await async_client.completions.create(model=LLAMA, prompt=prompt, max_tokens=48, temperature=0)
                return prompt, answer.choices[0].text

            return await asyncio.gather(*(ask(p) for p in PROMPTS * 3))

    for prompt, text in asyncio.run(ask_all()):
        assert_same_as_llama_cpp(text, reference, prompt, 48)


def test_full_queue_is_refused_at_once_and_a_client_that_leaves_frees_the_seat(llama_server: ServerProcess) -> None:
    url = f"{llama_server.url}/v1/completions"
    long_request = {
        "model": ONE_SEAT,
        "prompt": "Once upon a time",
        "max_tokens": ONE_SEAT_CTX - 64,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    aborted_before = _metric(llama_server, "modeldock_llm_requests_aborted_total", ONE_SEAT)
    generated_before = _metric(llama_server, "modeldock_llm_generation_tokens_total", ONE_SEAT)
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=long_request) as holding:
        assert holding.status_code == 200
        lines = holding.iter_lines()  # kept: a dropped iterator would close the connection
        next(lines)  # the seat is taken: the first chunk came
        started = time.monotonic()
        refused = http.post(url, json={"model": ONE_SEAT, "prompt": "x", "max_tokens": 2})
        assert refused.status_code in (429, 503), refused.text
        assert "max_queue_size" in refused.text
        assert time.monotonic() - started < 2.0
    # The stream was closed after its first chunk: the seat frees once the server sees the client gone.
    deadline = time.monotonic() + 60
    while (answer := httpx.post(url, json={"model": ONE_SEAT, "prompt": "x", "max_tokens": 2}, timeout=60)).status_code:
        if answer.status_code == 200:
            break
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while _metric(llama_server, "modeldock_llm_requests_aborted_total", ONE_SEAT) <= aborted_before:
        assert time.monotonic() < deadline, "the abandoned request was not counted as aborted"
        time.sleep(0.1)
    # It stopped generating when its client left, far short of the tokens it asked for.
    generated = _metric(llama_server, "modeldock_llm_generation_tokens_total", ONE_SEAT) - generated_before - 2
    assert 0 < generated < long_request["max_tokens"] / 2


# -- metrics -------------------------------------------------------------------------------------------------------
def _metric(server: ServerProcess, name: str, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_tokens(client: openai.OpenAI, llama_server: ServerProcess) -> None:
    before = _metric(llama_server, "modeldock_llm_generation_tokens_total", LLAMA)
    prompt_before = _metric(llama_server, "modeldock_llm_prompt_tokens_total", LLAMA)
    first_before = _metric(llama_server, "modeldock_llm_time_to_first_token_seconds_count", LLAMA)
    answer = client.completions.create(model=LLAMA, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert _metric(llama_server, "modeldock_llm_generation_tokens_total", LLAMA) - before == (
        answer.usage.completion_tokens
    )
    assert _metric(llama_server, "modeldock_llm_prompt_tokens_total", LLAMA) - prompt_before == (
        answer.usage.prompt_tokens
    )
    assert _metric(llama_server, "modeldock_llm_time_to_first_token_seconds_count", LLAMA) - first_before == 1


# -- without the extra ---------------------------------------------------------------------------------------------
def test_without_llama_cpp_the_model_is_unavailable_with_the_pip_command(
    start_server: Callable[..., ServerProcess], tmp_path: Path, gguf_file: Path
) -> None:
    hidden = tmp_path / "hide"
    (hidden / "llama_cpp").mkdir(parents=True)
    (hidden / "llama_cpp" / "__init__.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    repository = tmp_path / "models"
    (repository / LLAMA / "1").mkdir(parents=True)
    shutil.copy(gguf_file, repository / LLAMA / "1" / "model.gguf")
    (repository / LLAMA / "config.yaml").write_text("backend: llamacpp\n")
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    server = start_server(repository, env={"PYTHONPATH": str(hidden)})
    rows = _states(server)
    assert rows[LLAMA]["state"] == "UNAVAILABLE"
    assert 'pip install "modeldock[llamacpp]"' in rows[LLAMA]["reason"]
    assert rows["simple"]["state"] == "READY"
