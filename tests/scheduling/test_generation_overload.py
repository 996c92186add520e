"""Overload answered, not queued without end: a generation engine refuses what it cannot start in time, at once,
with 429 and Retry-After (OpenAI's shape on /v1), UNAVAILABLE on gRPC, and keeps serving the requests it took."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_repository.language_models import build_causal_lm  # noqa: E402
from server.errors import Overloaded  # noqa: E402
from server.protocol.generation import GenerateRequest  # noqa: E402
from server.scheduling.generation.engine import GenerationEngine  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402
from tests.scheduling.generation_engines import greedy, make_engine  # noqa: E402

# Tokens: holds the only seat for well over the tests' delays. The tiny model decodes a token in well under a
# millisecond on a quiet machine, so it takes thousands, and a model with room for them.
LONG = 3000


@pytest.fixture(scope="module")
def long_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with room for a ``LONG`` answer."""
    return build_causal_lm(tmp_path_factory.mktemp("long-lm") / "model", n_positions=4096)


async def held(engine: GenerationEngine, sequences: int) -> None:
    """Until the engine holds ``sequences`` sequences (running or waiting): a loaded machine may take a while."""
    deadline = time.monotonic() + 30
    while engine.load < sequences:
        assert time.monotonic() < deadline, f"the engine holds {engine.load} sequences, not {sequences}"
        await asyncio.sleep(0.005)


async def run(engine: GenerationEngine, max_tokens: int) -> int:
    request = GenerateRequest("t", prompt="Hello world", sampling=greedy(max_tokens))
    return len([t async for o in engine.generate(request) for t in o.token_ids])


async def test_a_full_waiting_queue_refuses_at_once_and_the_accepted_requests_finish(long_lm_dir: Path) -> None:
    engine = make_engine(long_lm_dir, max_num_seqs="1", max_waiting_seqs="2")
    try:
        taken = [asyncio.create_task(run(engine, LONG))]
        await held(engine, 1)  # the first holds the seat
        taken += [asyncio.create_task(run(engine, 5)) for _ in range(2)]
        await held(engine, 3)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="max_waiting_seqs 2") as refused:
            await run(engine, 5)
        assert time.perf_counter() - started < 0.25  # at once: nothing is tokenized or queued
        assert refused.value.http_status == 429 and int(refused.value.retry_after) >= 1
        assert await asyncio.gather(*taken) == [LONG, 5, 5]
        assert engine.stats.rejected == 1
    finally:
        engine.stop()


async def test_a_request_that_waits_past_the_delay_is_refused_when_it_passes(long_lm_dir: Path) -> None:
    engine = make_engine(long_lm_dir, max_num_seqs="1", max_queue_delay_ms="150")
    try:
        first = asyncio.create_task(run(engine, LONG))
        await held(engine, 1)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="max_queue_delay_ms 150"):
            await run(engine, 5)
        assert 0.14 < time.perf_counter() - started < 5.0
        assert await first == LONG
    finally:
        engine.stop()


async def test_a_predicted_wait_over_the_delay_is_refused_before_it_queues(causal_lm_dir: Path) -> None:
    """After enough admissions the engine knows its rate: with one seat and answers of 40 tokens, a queue of three
    means far more than 20 ms of waiting, so a fourth request is refused without waiting at all."""
    engine = make_engine(causal_lm_dir, max_num_seqs="1", max_queue_delay_ms="20")
    try:
        for _ in range(10):
            await run(engine, 40)
        wait = engine.predicted_wait(3)
        assert wait is not None and wait > 0.02
        taken = [asyncio.create_task(run(engine, 40)) for _ in range(2)]
        await held(engine, 2)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="would wait about"):
            await run(engine, 40)
        assert time.perf_counter() - started < 0.25
        await asyncio.gather(*taken, return_exceptions=True)
    finally:
        engine.stop()


# -- end to end: the OpenAI route, the generate extension and gRPC -----------------------------------------------------
MODEL = "busy_lm"


@pytest.fixture(scope="module")
def busy_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repository = tmp_path_factory.mktemp("overload") / "models"
    build_causal_lm(repository / MODEL / "1", n_positions=4096)
    (repository / MODEL / "config.yaml").write_text(
        "backend: transformers\nparameters:\n  max_num_seqs: 1\n  max_waiting_seqs: 1\n"
    )
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=300)  # a loaded CI machine takes a while to import everything
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/v2/models/{MODEL}/ready").status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    return server


def gauge(metrics: httpx.Response, name: str) -> float:
    lines = [line for line in metrics.text.splitlines() if line.startswith(name) and f'model="{MODEL}"' in line]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.slow
async def test_openai_and_the_generate_extension_answer_429_and_a_grpc_stream_an_error(
    busy_server: ServerProcess,
) -> None:
    import openai
    import tritonclient.grpc as grpcclient

    # Long enough (several seconds each, more on a loaded machine) that the engine stays full through the checks.
    hold = 4000
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": hold, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=busy_server.url, timeout=120) as http:
        # One request runs (the only seat), one waits (the only waiting place): the engine is full.
        holders = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
        deadline = time.monotonic() + 60
        while gauge(await http.get("/metrics"), "modeldock_llm_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the second request never waited"
            await asyncio.sleep(0.05)

        client = openai.AsyncOpenAI(base_url=f"{busy_server.url}/v1", api_key="unused", max_retries=0)
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=5)
        assert time.perf_counter() - started < 1.0
        assert int(refused.value.response.headers["retry-after"]) >= 1
        error = refused.value.response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "max_waiting_seqs" in error["message"]

        generate = await http.post(f"/v2/models/{MODEL}/generate", json={"text_input": "Hi", "max_tokens": 5})
        assert generate.status_code == 429 and int(generate.headers["retry-after"]) >= 1
        assert "overloaded" in generate.json()["error"]

        results: queue.Queue = queue.Queue()
        grpc = grpcclient.InferenceServerClient(busy_server.grpc_url)
        grpc.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            text = grpcclient.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"Hi"], dtype=object))
            grpc.async_stream_infer(MODEL, [text], request_id="busy")
            result, error = await asyncio.to_thread(results.get, timeout=30)
            # A stream carries a failed request's message only (Triton's ModelStreamInferResponse.error_message).
            assert result is None and "overloaded" in error.message()
        finally:
            grpc.stop_stream()

        answers = await asyncio.gather(*holders)
        assert [a.status_code for a in answers] == [200, 200]
        assert all(a.json()["usage"]["completion_tokens"] == hold for a in answers)
    metrics = httpx.get(f"{busy_server.url}/metrics").text
    rejected = [line for line in metrics.splitlines() if line.startswith("modeldock_llm_requests_rejected")]
    assert rejected and float(rejected[0].split()[-1]) >= 3
    # Triton's failure counter names the reason: rejected, as a full queue's requests are.
    failures = [
        line
        for line in metrics.splitlines()
        if line.startswith("nv_inference_request_failure") and 'reason="REJECTED"' in line and MODEL in line
    ]
    assert failures and float(failures[0].split()[-1]) >= 3
