"""The statistics extension and Prometheus metrics, read back after a known number of inferences."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import BUNDLED_REPOSITORY, SLOW_TO_LOAD, ServerProcess
from tests.scheduling.test_batching_e2e import body, grpc_request, sleepy_config, wait_for_pending, write_model

# The models of the ``bundled_repository`` fixture's copy.
BUNDLED_MODELS = {path.parent.name for path in BUNDLED_REPOSITORY.glob("*/config.yaml")} - set(SLOW_TO_LOAD)

SENT = 5
# Requests the server turns away with 400 (a wrong shape): Triton counts them as failed inferences.
REJECTED = 2


@pytest.fixture(scope="module")
def counted_server(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    """A server of its own, so no other test's requests show up in its counters."""
    server = start_server(bundled_repository)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    for i in range(SENT):
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 16], "FP32")
            tensor.set_data_from_numpy(np.full((1, 16), i, dtype=np.float32), binary_data=True)
            inputs.append(tensor)
        client.infer("simple", inputs)
    client.close()
    for _ in range(REJECTED):
        bad = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        reply = httpx.post(server.url + "/v2/models/mlp_classifier/infer", json=bad)
        assert reply.status_code == 400, reply.text
    return server


FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


def metric(text: str, name: str, model: str, version: str = "1", reason: str | None = None) -> float:
    """One sample; Triton writes the failure counter's labels as model, reason, version."""
    labels = f'model="{model}",version="{version}"'
    if reason is not None:
        labels = f'model="{model}",reason="{reason}",version="{version}"'
    match = re.search(rf"^{name}{{{labels}}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} missing from:\n{text}"
    return float(match.group(1))


def failures(text: str, model: str, version: str = "1") -> dict[str, float]:
    return {r: metric(text, "nv_inference_request_failure", model, version, r) for r in FAILURE_REASONS}


def check_simple_stats(stats: dict) -> None:
    assert stats["name"] == "simple"
    assert stats["version"] == "1"
    assert stats["inference_count"] == SENT
    assert stats["execution_count"] == SENT
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == SENT, key
        assert inference[key]["ns"] > 0, key
    assert inference["fail"]["count"] == 0
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]
    [batch] = stats["batch_stats"]
    assert batch["batch_size"] == 1
    assert batch["compute_infer"]["count"] == SENT


def test_http_statistics(counted_server: ServerProcess) -> None:
    for path in ("/v2/models/simple/stats", "/v2/models/simple/versions/1/stats"):
        reply = httpx.get(counted_server.url + path)
        assert reply.status_code == 200
        [stats] = reply.json()["model_stats"]
        check_simple_stats(stats)
    everything = httpx.get(counted_server.url + "/v2/models/stats").json()["model_stats"]
    by_name = {s["name"]: s for s in everything}
    assert set(by_name) == BUNDLED_MODELS
    assert by_name["mlp_classifier"]["inference_count"] == 0
    assert by_name["mlp_classifier"]["inference_stats"]["fail"]["count"] == REJECTED
    assert by_name["mlp_classifier"]["inference_stats"]["success"]["count"] == 0
    assert "statistics" in httpx.get(counted_server.url + "/v2").json()["extensions"]


def test_statistics_errors(counted_server: ServerProcess) -> None:
    assert httpx.get(counted_server.url + "/v2/models/nope/stats").status_code == 404
    assert httpx.get(counted_server.url + "/v2/models/simple/versions/7/stats").status_code == 404


def test_tritonclient_reads_statistics(counted_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(counted_server.url.removeprefix("http://"))
    try:
        [stats] = client.get_inference_statistics("simple")["model_stats"]
        check_simple_stats(stats)
        assert len(client.get_inference_statistics()["model_stats"]) == len(BUNDLED_MODELS)
    finally:
        client.close()


def test_metrics_on_http_and_metrics_port(counted_server: ServerProcess) -> None:
    for url in (counted_server.url + "/metrics", f"http://127.0.0.1:{counted_server.metrics_port}/metrics"):
        reply = httpx.get(url)
        assert reply.status_code == 200
        text = reply.text
        assert metric(text, "nv_inference_count", "simple") == SENT
        assert metric(text, "nv_inference_exec_count", "simple") == SENT
        assert metric(text, "nv_inference_request_success", "simple") == SENT
        assert failures(text, "simple") == dict.fromkeys(FAILURE_REASONS, 0)
        assert metric(text, "nv_inference_pending_request_count", "simple") == 0
        assert metric(text, "nv_inference_compute_infer_duration_us", "simple") > 0
        assert metric(text, "nv_inference_request_duration_us", "simple") > 0
        assert metric(text, "nv_inference_count", "mlp_classifier") == 0
        # Inputs that do not match the model are neither rejected by the scheduler nor a backend error.
        assert failures(text, "mlp_classifier") == {**dict.fromkeys(FAILURE_REASONS, 0), "OTHER": REJECTED}
        # Triton's names exactly: counters typed as such, with no ``_total`` suffix on any of Triton's metrics (the
        # language-model engine's follow vLLM's names, ``_total`` included).
        assert "# TYPE nv_inference_count counter" in text
        assert "# TYPE nv_inference_pending_request_count gauge" in text
        assert not [line for line in text.splitlines() if "nv_" in line and "_total" in line]
        assert re.search(r'^modeldock_inference_batch_size_count{model="simple",version="1"} 5\.0$', text, re.M)


def test_grpc_statistics(counted_server: ServerProcess) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{counted_server.grpc_port}")
    try:
        [stats] = client.get_inference_statistics("simple", as_json=True)["model_stats"]
    finally:
        client.close()
    # Protobuf JSON writes 64-bit integers as strings.
    assert int(stats["inference_count"]) == SENT
    assert int(stats["execution_count"]) == SENT
    assert int(stats["inference_stats"]["success"]["count"]) == SENT
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0
    assert [int(b["batch_size"]) for b in stats["batch_stats"]] == [1]


# -- timings, failures, batching and reloads against models whose batches take a known time -------------------
SLEEP_S = 0.2
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
COMPUTE = ("compute_input", "compute_infer", "compute_output")
ONE_ROW = np.ones((1, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def timed_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repository = tmp_path_factory.mktemp("timed") / "models"
    sleep_ms = int(SLEEP_S * 1000)
    # No dynamic batching: one request per execution, waiting for the single instance.
    write_model(repository, "timed_direct", sleepy_config(sleep_ms, max_batch_size=4))
    # Waits (up to 5 s) until 6 rows have arrived, then runs them as one batch.
    write_model(
        repository,
        "timed_batched",
        sleepy_config(sleep_ms, 8, max_queue_delay_microseconds=5_000_000, preferred_batch_size=[6]),
    )
    write_model(repository, "timed_failures", sleepy_config(1000, 1, default_queue_policy={"max_queue_size": 1}))
    write_model(
        repository,
        "timed_timeout",
        sleepy_config(1000, 1, default_queue_policy={"default_timeout_microseconds": 100_000}),
    )
    write_model(repository, "timed_versions", {**sleepy_config(10, 4), "version_policy": {"all": {}}})
    (repository / "timed_versions" / "2").mkdir()
    return start_server(repository, "--model-control-mode", "explicit", "--load-model", "*")


def http_stats(server: ServerProcess, model: str, version: str = "") -> list[dict[str, Any]]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/stats"
    reply = httpx.get(server.url + path, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["model_stats"]


def grpc_stats(server: ServerProcess, model: str) -> list[dict[str, Any]]:
    """The gRPC answer in the HTTP JSON's shape (the protobuf's zeros included), to compare the two exactly."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        answer = client.get_inference_statistics(model).model_stats
    finally:
        client.close()

    def duration(d: Any) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return [
        {
            "name": s.name,
            "version": s.version,
            "last_inference": s.last_inference,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {
                key: duration(getattr(s.inference_stats, key)) for key in (*DURATIONS, "cache_hit", "cache_miss")
            },
            "batch_stats": [
                {"batch_size": b.batch_size, **{key: duration(getattr(b, key)) for key in COMPUTE}}
                for b in s.batch_stats
            ],
        }
        for s in answer
    ]


def checked_stats(server: ServerProcess, model: str, version: str = "1") -> dict[str, Any]:
    """A version's statistics, after checking HTTP, gRPC and /metrics all tell the same numbers in their units."""
    [stats] = http_stats(server, model, version)
    assert [s for s in grpc_stats(server, model) if s["version"] == version] == [stats]
    text = httpx.get(server.url + "/metrics", timeout=10).text
    inference = stats["inference_stats"]
    assert metric(text, "nv_inference_request_success", model, version) == inference["success"]["count"]
    assert sum(failures(text, model, version).values()) == inference["fail"]["count"]
    assert metric(text, "nv_inference_count", model, version) == stats["inference_count"]
    assert metric(text, "nv_inference_exec_count", model, version) == stats["execution_count"]
    # Triton's request duration counts successful requests only; failed ones are in the statistics' ``fail``.
    assert metric(text, "nv_inference_request_duration_us", model, version) == inference["success"]["ns"] // 1000
    for key in ("queue", *COMPUTE):
        assert metric(text, f"nv_inference_{key}_duration_us", model, version) == inference[key]["ns"] // 1000, key
    assert metric(text, "nv_inference_pending_request_count", model, version) == 0
    return stats


async def test_durations_match_a_known_sleep(timed_server: ServerProcess) -> None:
    before_ms = time.time_ns() // 1_000_000
    async with httpx.AsyncClient(base_url=timed_server.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/v2/models/timed_direct/infer", json=body(ONE_ROW)) for _ in range(3))
        )
    after_ms = time.time_ns() // 1_000_000
    assert [r.status_code for r in replies] == [200] * 3
    stats = checked_stats(timed_server, "timed_direct")
    assert before_ms <= stats["last_inference"] <= after_ms  # milliseconds since the epoch
    assert (stats["inference_count"], stats["execution_count"]) == (3, 3)
    inference = stats["inference_stats"]
    assert {key: inference[key]["count"] for key in DURATIONS} == {**dict.fromkeys(DURATIONS, 3), "fail": 0}
    second = 1_000_000_000
    assert 3 * SLEEP_S * second <= inference["compute_infer"]["ns"] < (3 * SLEEP_S + 0.5) * second
    # One instance: the second request waits for one execution, the third for two.
    assert inference["queue"]["ns"] >= 2 * SLEEP_S * second
    assert inference["success"]["ns"] >= inference["queue"]["ns"] + inference["compute_infer"]["ns"]
    [batch] = stats["batch_stats"]
    assert batch["batch_size"] == 1
    assert batch["compute_infer"]["count"] == 3
    assert batch["compute_infer"]["ns"] == inference["compute_infer"]["ns"]


async def test_batched_requests_count_rows_and_executions(timed_server: ServerProcess) -> None:
    rows = (2, 3, 1)
    async with httpx.AsyncClient(base_url=timed_server.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(client.post("/v2/models/timed_batched/infer", json=body(np.ones((n, 4), np.float32))) for n in rows)
        )
    assert [r.status_code for r in replies] == [200] * 3
    stats = checked_stats(timed_server, "timed_batched")
    assert (stats["inference_count"], stats["execution_count"]) == (6, 1)
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 3
    # Each request is charged its whole batch's compute time; the batch statistics count the execution once.
    [batch] = stats["batch_stats"]
    assert batch["batch_size"] == 6
    assert {key: batch[key]["count"] for key in COMPUTE} == dict.fromkeys(COMPUTE, 1)
    second = 1_000_000_000
    assert SLEEP_S * second <= batch["compute_infer"]["ns"] < (SLEEP_S + 0.5) * second
    for key in COMPUTE:
        assert (inference[key]["count"], inference[key]["ns"]) == (3, 3 * batch[key]["ns"]), key
    text = httpx.get(timed_server.url + "/metrics").text
    assert re.search(r'^modeldock_inference_batch_size_count{model="timed_batched",version="1"} 1\.0$', text, re.M)


async def test_failures_by_reason(timed_server: ServerProcess) -> None:
    """Queue full and queue timeout are REJECTED, a dropped queued request CANCELED, a model error BACKEND and
    inputs that do not match the model OTHER; none of them counts as a success or an execution."""
    model = "timed_failures"
    async with httpx.AsyncClient(base_url=timed_server.url, timeout=30) as client:
        running = asyncio.create_task(client.post(f"/v2/models/{model}/infer", json=body(ONE_ROW)))
        await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(timed_server.grpc_url) as channel:
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_request(model))
            await wait_for_pending(client, model, 1)
            full = await client.post(f"/v2/models/{model}/infer", json=body(ONE_ROW))
            assert full.status_code == 503, full.text
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        await wait_for_pending(client, model, 0)
        broken = asyncio.create_task(client.post(f"/v2/models/{model}/infer", json=body(-ONE_ROW)))
        bad = await client.post(f"/v2/models/{model}/infer", json=body(np.ones((1, 3), np.float32)))
        assert bad.status_code == 400, bad.text
        assert (await running).status_code == 200
        assert (await broken).status_code == 500

        slow = asyncio.create_task(client.post("/v2/models/timed_timeout/infer", json=body(ONE_ROW)))
        await asyncio.sleep(0.2)
        late = await client.post("/v2/models/timed_timeout/infer", json=body(ONE_ROW))
        assert late.status_code == 503, late.text
        assert (await slow).status_code == 200

    text = httpx.get(timed_server.url + "/metrics").text
    assert failures(text, model) == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 1, "OTHER": 1}
    assert failures(text, "timed_timeout") == {**dict.fromkeys(FAILURE_REASONS, 0), "REJECTED": 1}
    for name, failed in ((model, 4), ("timed_timeout", 1)):
        stats = checked_stats(timed_server, name)
        inference = stats["inference_stats"]
        assert (inference["success"]["count"], inference["fail"]["count"]) == (1, failed), name
        assert (stats["inference_count"], stats["execution_count"]) == (1, 1), name
        assert inference["fail"]["ns"] > 0, name
    # The timed-out request waited its 100 ms queue timeout before it failed.
    assert http_stats(timed_server, "timed_timeout")[0]["inference_stats"]["fail"]["ns"] >= 100_000_000


def loaded_versions(server: ServerProcess) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The (model, version) pairs in ``GET /v2/models/stats`` and in ``/metrics``."""
    listed = {(s["name"], s["version"]) for s in httpx.get(server.url + "/v2/models/stats").json()["model_stats"]}
    text = httpx.get(server.url + "/metrics").text
    exposed = set(re.findall(r'^nv_inference_count{model="([^"]+)",version="([^"]+)"}', text, re.MULTILINE))
    return listed, exposed


def test_versions_reloads_and_unloads(timed_server: ServerProcess) -> None:
    """Counters are per version, keep accumulating across reloads of a loaded version, and leave the statistics
    and /metrics together when the version is unloaded (a later load starts from zero, as in Triton)."""
    model = "timed_versions"
    url = f"{timed_server.url}/v2/models/{model}"
    for version in ("1", "2", "2"):
        assert httpx.post(f"{url}/versions/{version}/infer", json=body(ONE_ROW)).status_code == 200
    counts = {s["version"]: s["inference_count"] for s in http_stats(timed_server, model)}
    assert counts == {"1": 1, "2": 2}
    assert checked_stats(timed_server, model, "2")["inference_count"] == 2

    everything = {"timed_direct", "timed_batched", "timed_failures", "timed_timeout"}
    expected = {(m, "1") for m in everything} | {(model, "1"), (model, "2")}
    assert loaded_versions(timed_server) == (expected, expected)

    load = f"{timed_server.url}/v2/repository/models/{model}/load"
    assert httpx.post(load, timeout=30).status_code == 200
    assert httpx.post(f"{url}/versions/2/infer", json=body(ONE_ROW)).status_code == 200
    assert checked_stats(timed_server, model, "2")["inference_count"] == 3
    assert checked_stats(timed_server, model, "1")["inference_count"] == 1

    # A reload that keeps only version 2: version 1 leaves both listings, version 2 keeps counting.
    config = httpx.get(f"{url}/config").json()
    config["version_policy"] = {"specific": {"versions": [2]}}
    reply = httpx.post(load, json={"parameters": {"config": json.dumps(config)}}, timeout=30)
    assert reply.status_code == 200, reply.text
    expected.discard((model, "1"))
    assert loaded_versions(timed_server) == (expected, expected)
    assert checked_stats(timed_server, model, "2")["inference_count"] == 3

    assert httpx.post(f"{timed_server.url}/v2/repository/models/{model}/unload", timeout=30).status_code == 200
    expected.discard((model, "2"))
    assert loaded_versions(timed_server) == (expected, expected)

    assert httpx.post(load, timeout=30).status_code == 200
    expected |= {(model, "1"), (model, "2")}
    assert loaded_versions(timed_server) == (expected, expected)
    assert {s["version"]: s["inference_count"] for s in http_stats(timed_server, model)} == {"1": 0, "2": 0}
