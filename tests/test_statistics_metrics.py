"""The statistics extension and Prometheus metrics, read back after a known number of inferences."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import ServerProcess

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


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {model} missing from:\n{text}"
    return float(match.group(1))


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
    assert set(by_name) == {"simple", "mlp_classifier", "torch_mlp", "text_preprocessor"}
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
        assert len(client.get_inference_statistics()["model_stats"]) == 4
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
        assert metric(text, "nv_inference_request_failure", "simple") == 0
        assert metric(text, "nv_inference_pending_request_count", "simple") == 0
        assert metric(text, "nv_inference_compute_infer_duration_us", "simple") > 0
        assert metric(text, "nv_inference_request_duration_us", "simple") > 0
        assert metric(text, "nv_inference_count", "mlp_classifier") == 0
        assert metric(text, "nv_inference_request_failure", "mlp_classifier") == REJECTED
        # Triton's names exactly: counters typed as such, with no ``_total`` suffix anywhere.
        assert "# TYPE nv_inference_count counter" in text
        assert "# TYPE nv_inference_pending_request_count gauge" in text
        assert "_total" not in text
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
