"""Language models through the real server: Triton's generate extension, KServe infer, gRPC decoupled streaming,
embeddings, metrics, lifecycle and validation."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from tests.conftest import ROOT, ServerProcess  # noqa: E402

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm_repository(tmp_path_factory: pytest.TempPathFactory, causal_lm_dir: Path, encoder_dir: Path) -> Path:
    repo = tmp_path_factory.mktemp("llm-repo")
    for name, folder, config in (
        ("lm", causal_lm_dir, "backend: transformers\n"),
        ("embedder", encoder_dir, "backend: transformers\nmax_batch_size: 8\ndynamic_batching: {}\n"),
    ):
        (repo / name).mkdir()
        (repo / name / "config.yaml").write_text(config)
        shutil.copytree(folder, repo / name / "1")
    return repo


@pytest.fixture(scope="module")
def llm_server(start_server: Callable[..., ServerProcess], llm_repository: Path) -> ServerProcess:
    return start_server(llm_repository, "--model-control-mode", "explicit", "--load-model", "*")


def generate(server: ServerProcess, body: dict, model: str = "lm") -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/generate", json=body, timeout=60)


def sse_events(server: ServerProcess, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/lm/generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def metric(server: ServerProcess, name: str, model: str = "lm", kind: str | None = None) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for line in text.splitlines():
        if not line.startswith(name + "{") or f'model="{model}"' not in line:
            continue
        if kind is None or f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in /metrics")


def test_config_is_completed_from_the_model_folder(llm_server: ServerProcess) -> None:
    config = httpx.get(f"{llm_server.url}/v2/models/lm/config").json()
    assert config["parameters"]["task"] == {"string_value": "generate"}
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert [t["name"] for t in config["input"]][:3] == ["text_input", "stream", "sampling_parameters"]
    assert [t["name"] for t in config["output"]] == ["text_output"]
    embedder = httpx.get(f"{llm_server.url}/v2/models/embedder/config").json()
    assert embedder["parameters"]["task"] == {"string_value": "embed"}
    assert [t["name"] for t in embedder["output"]] == ["embedding", "token_count"]


def test_generate_and_generate_stream_agree(llm_server: ServerProcess) -> None:
    body = {"text_input": PROMPT, "max_tokens": 12, "temperature": 0, "exclude_input_in_output": True}
    whole = generate(llm_server, body)
    assert whole.status_code == 200, whole.text
    data = whole.json()
    assert data["model_name"] == "lm" and data["model_version"] == "1"
    events = sse_events(llm_server, {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0}})
    assert len(events) >= 2
    assert "".join(e["text_output"] for e in events) == data["text_output"]
    # Without exclude_input_in_output the prompt comes first, as Triton's LLM backends answer.
    with_prompt = generate(llm_server, {"text_input": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    assert with_prompt["text_output"] == PROMPT + data["text_output"]


def test_generate_refuses_bad_requests_by_name(llm_server: ServerProcess) -> None:
    bad_temperature = generate(llm_server, {"text_input": PROMPT, "temperature": -2})
    assert bad_temperature.status_code == 400 and "temperature" in bad_temperature.json()["error"]
    unknown = generate(llm_server, {"text_input": PROMPT, "beam_width": 4})
    assert unknown.status_code == 400 and "beam_width" in unknown.json()["error"]
    too_long = generate(llm_server, {"text_input": "word " * 400, "max_tokens": 4})
    assert too_long.status_code == 400 and "tokens" in too_long.json()["error"]
    missing = generate(llm_server, {"max_tokens": 4})
    assert missing.status_code == 400 and "text_input" in missing.json()["error"]
    not_a_generator = generate(llm_server, {"text_input": "hi"}, model="embedder")
    assert not_a_generator.status_code == 400
    assert httpx.post(f"{llm_server.url}/v2/models/nope/generate", json={"text_input": "x"}).status_code == 404


def test_grpc_decoupled_stream_sends_one_response_per_chunk_and_flags_the_last(llm_server: ServerProcess) -> None:
    expected = generate(
        llm_server, {"text_input": PROMPT, "max_tokens": 10, "temperature": 0, "exclude_input_in_output": True}
    ).json()["text_output"]
    client = grpcclient.InferenceServerClient(llm_server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = []
        for name, datatype, value in (
            ("text_input", "BYTES", np.array([PROMPT.encode()], dtype=object)),
            ("stream", "BOOL", np.array([True])),
            ("sampling_parameters", "BYTES", np.array([b'{"max_tokens": 10, "temperature": 0}'], dtype=object)),
        ):
            tensor = grpcclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.async_stream_infer("lm", inputs, request_id="s1", enable_empty_final_response=True)
        chunks, finals = [], []
        while not finals or not finals[-1]:
            result, error = results.get(timeout=60)
            assert error is None, error
            finals.append(result.get_response().parameters["triton_final_response"].bool_param)
            chunks.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
    assert len(chunks) >= 2 and finals.count(True) == 1
    assert "".join(chunks) == expected


def test_kserve_infer_with_tritonclient_http(llm_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(llm_server.url.removeprefix("http://"))
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    params = httpclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([b'{"max_tokens": 6, "temperature": 0}'], dtype=object))
    result = client.infer("lm", [text, params])
    expected = generate(llm_server, {"text_input": PROMPT, "max_tokens": 6, "temperature": 0}).json()["text_output"]
    assert result.as_numpy("text_output")[0].decode() == expected


def test_embeddings_are_normalised_and_batched(llm_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(llm_server.url.removeprefix("http://"))
    texts = [b"hello", b"the quick brown fox jumps", b"hello"]
    tensor = httpclient.InferInput("text_input", [3, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(3, 1))
    result = client.infer("embedder", [tensor])
    vectors, counts = result.as_numpy("embedding"), result.as_numpy("token_count").ravel()
    assert vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], rtol=1e-5, atol=1e-6)
    assert counts[1] > counts[0] > 0 and counts[0] == counts[2]


def test_metrics_count_tokens_and_a_disconnected_stream_is_aborted(llm_server: ServerProcess) -> None:
    generated_before = metric(llm_server, "modeldock_llm_generation_tokens_total")
    aborted_before = metric(llm_server, "modeldock_llm_requests_aborted_total")
    prompt_before = metric(llm_server, "modeldock_llm_prompt_tokens_total")
    decode_steps = metric(llm_server, "modeldock_llm_step_seconds_count", kind="decode")
    mixed_steps = metric(llm_server, "modeldock_llm_step_seconds_count", kind="mixed")
    step_tokens = metric(llm_server, "modeldock_llm_iteration_tokens_sum")
    generate(llm_server, {"text_input": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert metric(llm_server, "modeldock_llm_generation_tokens_total") == generated_before + 5
    assert metric(llm_server, "modeldock_llm_time_to_first_token_seconds_count") >= 1
    # One step prefills the prompt (and yields the first token); four decode the rest. Each step computes the
    # prompt or one token, and the last token is never fed back.
    prompt_tokens = metric(llm_server, "modeldock_llm_prompt_tokens_total") - prompt_before
    assert metric(llm_server, "modeldock_llm_step_seconds_count", kind="mixed") == mixed_steps + 1
    assert metric(llm_server, "modeldock_llm_step_seconds_count", kind="decode") == decode_steps + 4
    assert metric(llm_server, "modeldock_llm_step_forward_seconds_count", kind="decode") == decode_steps + 4
    assert metric(llm_server, "modeldock_llm_iteration_tokens_sum") == step_tokens + prompt_tokens + 4
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 200, "ignore_eos": True}}
    with httpx.stream("POST", f"{llm_server.url}/v2/models/lm/generate_stream", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(llm_server, "modeldock_llm_requests_aborted_total") > aborted_before:
            break
        time.sleep(0.1)
    assert metric(llm_server, "modeldock_llm_requests_aborted_total") == aborted_before + 1
    assert metric(llm_server, "modeldock_llm_requests_running") == 0
    assert metric(llm_server, "modeldock_llm_kv_cache_usage_ratio") == 0
    stats = httpx.get(f"{llm_server.url}/v2/models/lm/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1


def test_statistics_json_has_the_prefix_cache_hit_rate_and_grpc_statistics_still_convert(
    llm_server: ServerProcess,
) -> None:
    """The engine's figures are in ``/v2/models/{model}/stats`` under ``generation`` (the same counters Prometheus
    shows), so a client without a scraper reads the prefix cache's hit rate; Triton's gRPC message has no place for
    them and leaves them out."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full blocks, asked twice
    for _ in range(2):
        assert generate(llm_server, {"text_input": prompt, "parameters": {"max_tokens": 2}}).status_code == 200
    engine = httpx.get(f"{llm_server.url}/v2/models/lm/stats").json()["model_stats"][0]["generation"]
    assert engine["prefix_cache_hits"] == metric(llm_server, "modeldock_llm_prefix_cache_hits_total") > 0
    assert engine["prefix_cache_queries"] == metric(llm_server, "modeldock_llm_prefix_cache_queries_total")
    assert engine["prefix_cache_hit_rate"] == pytest.approx(
        engine["prefix_cache_hits"] / engine["prefix_cache_queries"]
    )
    assert engine["running"] == 0 and engine["generation_tokens"] >= 4
    with grpcclient.InferenceServerClient(llm_server.grpc_url) as client:
        stats = client.get_inference_statistics("lm", as_json=True)
    assert stats["model_stats"][0]["name"] == "lm" and "generation" not in stats["model_stats"][0]


def test_unload_and_load_a_language_model(llm_server: ServerProcess) -> None:
    assert httpx.post(f"{llm_server.url}/v2/repository/models/lm/unload", timeout=60).status_code == 200
    assert httpx.get(f"{llm_server.url}/v2/models/lm/ready").status_code == 400
    assert generate(llm_server, {"text_input": PROMPT}).status_code in (400, 503)
    assert httpx.post(f"{llm_server.url}/v2/repository/models/lm/load", timeout=120).status_code == 200
    again = generate(llm_server, {"text_input": PROMPT, "max_tokens": 3, "temperature": 0})
    assert again.status_code == 200, again.text


def test_validate_reads_language_model_folders(llm_repository: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "server", "validate", str(llm_repository)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "repo"
    shutil.copytree(llm_repository / "lm", broken / "lm")
    (broken / "lm" / "1" / "config.json").write_text("{not json")
    bad = subprocess.run(
        [sys.executable, "-m", "server", "validate", str(broken)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0
    assert "config.json" in bad.stdout
