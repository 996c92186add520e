"""Model lifecycle end to end: poll mode, reloads under traffic, failed reloads, unload draining, explicit control."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Self

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.lifecycle_models import (
    SLOW_FEATURES,
    add_simple,
    add_slow_identity,
    add_version,
    append_config,
    check_simple_output,
    index,
    infer_simple,
    model_ready,
    wait_for,
)

POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.3")


def test_model_copied_in_is_served_and_removed_model_is_unloaded(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    server = start_server(repository, *POLL)
    assert not index(server.url)

    add_simple(tmp_path / "staging")
    shutil.copytree(tmp_path / "staging" / "simple", repository / "dropped")
    wait_for(lambda: model_ready(server.url, "dropped"), what="the copied model to load")
    check_simple_output(infer_simple(None, server.url, "dropped"))

    shutil.rmtree(repository / "dropped")
    wait_for(lambda: not model_ready(server.url, "dropped"), what="the removed model to unload")
    response = infer_simple(None, server.url, "dropped")
    assert response.status_code == 503 and "dropped" in response.json()["error"]
    assert index(server.url)[("dropped", "")]["state"] == "UNAVAILABLE"


class TrafficLoop:
    """Client threads sending ``simple`` requests back to back, recording every outcome."""

    def __init__(self, url: str, model: str, threads: int = 2) -> None:
        self.url = url
        self.model = model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[tuple[float, int, str]] = []  # (finish time, status, error text)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self.stop.is_set():
                response = infer_simple(client, self.url, self.model)
                error = "" if response.status_code == 200 else response.text
                if not error:
                    try:
                        check_simple_output(response)
                    except AssertionError as exc:
                        error = f"wrong output: {exc}"
                with self.lock:
                    self.outcomes.append((time.monotonic(), response.status_code, error))

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def between(self, start: float, end: float) -> list[tuple[float, int, str]]:
        with self.lock:
            return [o for o in self.outcomes if start <= o[0] <= end]

    def failures(self) -> list[tuple[float, int, str]]:
        with self.lock:
            return [o for o in self.outcomes if o[2]]


def test_config_change_reloads_without_dropping_requests(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    model_dir = add_simple(repository)
    server = start_server(repository, *POLL)

    def max_batch_size() -> int:
        return httpx.get(f"{server.url}/v2/models/simple/config", timeout=10).json()["max_batch_size"]

    config_path = model_dir / "config.yaml"
    original = config_path.read_text()
    # Reloads between the direct scheduler and the dynamic batcher, so both drain their share of the traffic.
    batching = "dynamic_batching:\n  max_queue_delay_microseconds: 2000\n"
    with TrafficLoop(server.url, "simple", threads=3) as traffic:
        time.sleep(0.5)
        for size, extra in ((4, ""), (6, batching), (8, "")):
            started = time.monotonic()
            config_path.write_text(original.replace("max_batch_size: 8", f"max_batch_size: {size}") + extra)
            wait_for(lambda size=size: max_batch_size() == size, what=f"the reload to max_batch_size {size}")
            time.sleep(0.3)
            assert traffic.between(started, time.monotonic()), "no request completed across the reload"
    assert traffic.failures() == []
    assert len(traffic.outcomes) > 20
    assert "changed on disk; loading" in server.log()

    # Poll mode owns what is loaded: the load/unload API refuses, as Triton's does.
    response = httpx.post(f"{server.url}/v2/repository/models/simple/unload", timeout=10)
    assert response.status_code == 400 and "explicit" in response.json()["error"]
    assert model_ready(server.url, "simple")


def test_failed_reload_keeps_the_old_version_serving(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    model_dir = add_simple(repository)
    server = start_server(repository, *POLL)

    # A new version whose model file is corrupt: version 1 keeps serving, the index says why 2 is not.
    (model_dir / "2").mkdir()
    (model_dir / "2" / "model.onnx").write_bytes(b"this is not an onnx file")
    wait_for(lambda: "version 2" in index(server.url)[("simple", "1")]["reason"], what="the failed load in the index")
    row = index(server.url)[("simple", "1")]
    assert row["state"] == "READY" and "ONNX Runtime cannot load" in row["reason"]
    response = infer_simple(None, server.url)
    check_simple_output(response)
    assert response.json()["model_version"] == "1"

    # A broken config is the same: the error shows, the old load serves on.
    shutil.rmtree(model_dir / "2")
    append_config(model_dir, "max_batchsize: 4\n")
    wait_for(lambda: "max_batchsize" in index(server.url)[("simple", "1")]["reason"], what="the config error")
    check_simple_output(infer_simple(None, server.url))

    # Fixing it clears the error.
    add_simple(tmp_path / "fixed")
    shutil.copy(tmp_path / "fixed" / "simple" / "config.yaml", model_dir / "config.yaml")
    wait_for(lambda: index(server.url)[("simple", "1")]["reason"] == "", what="the error to clear")
    check_simple_output(infer_simple(None, server.url))


def test_unload_under_load_drains_in_flight_requests(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_slow_identity(repository)
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "slow")
    data = np.random.default_rng(0).standard_normal((64, SLOW_FEATURES)).astype(np.float32)
    outcomes: list[tuple[float, float, str]] = []  # (start, end, error or "")
    lock = threading.Lock()
    stop = threading.Event()

    def send() -> None:
        client = triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
        while not stop.is_set():
            tensor = triton_http.InferInput("x", list(data.shape), "FP32")
            tensor.set_data_from_numpy(data, binary_data=True)
            start = time.monotonic()
            try:
                result = client.infer("slow", [tensor])
                np.testing.assert_array_equal(result.as_numpy("y"), data)
                error = ""
            except InferenceServerException as exc:
                error = f"{exc.status()} {exc.message()}"
            with lock:
                outcomes.append((start, time.monotonic(), error))
        client.close()

    threads = [threading.Thread(target=send, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(outcomes) >= 6, what="traffic to start")
    control = triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    unload_start = time.monotonic()
    control.unload_model("slow")
    unload_end = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    before = [o for o in outcomes if o[1] < unload_start]
    overlapping = [o for o in outcomes if o[0] < unload_start < o[1]]
    after = [o for o in outcomes if o[0] > unload_end]
    assert before and all(not o[2] for o in before)
    # Requests accepted before the unload finish normally: the unload waits for them.
    assert any(not o[2] for o in overlapping), overlapping
    assert after and all(o[2] for o in after)
    for _, _, error in outcomes:
        if error:
            assert error.startswith("503") and "slow" in error, error
    assert not control.is_model_ready("slow")
    control.close()


def test_explicit_mode_load_unload_and_config_override(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "simple")
    add_simple(repository, "other")
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "simple")
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))

    states = {row["name"]: row["state"] for row in client.get_model_repository_index()}
    assert states == {"simple": "READY", "other": "UNAVAILABLE"}
    assert not client.is_model_ready("other")

    client.load_model("other")
    assert client.is_model_ready("other")
    check_simple_output(infer_simple(None, server.url, "other"))
    assert client.get_model_config("other")["max_batch_size"] == 8

    # Triton's config override replaces the whole config; what it leaves out is auto-completed from the model.
    client.load_model("other", config=json.dumps({"backend": "onnxruntime", "max_batch_size": 2}))
    assert client.get_model_config("other")["max_batch_size"] == 2
    check_simple_output(infer_simple(None, server.url, "other"))

    client.unload_model("other", unload_dependents=True)
    assert not client.is_model_ready("other")
    assert {r["name"]: r["state"] for r in client.get_model_repository_index()}["other"] == "UNAVAILABLE"
    assert [r["name"] for r in client.get_model_repository_index(query_params=None) if r["state"] == "READY"] == [
        "simple"
    ]
    ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert [row["name"] for row in ready_only] == ["simple"]

    with pytest.raises(InferenceServerException) as missing:
        client.load_model("no_such_model")
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as missing:
        client.unload_model("no_such_model")
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as bad:
        client.load_model("other", config=json.dumps({"max_batch_size": "lots"}))
    assert bad.value.status() == "400" and "max_batch_size" in bad.value.message()
    assert not client.is_model_ready("other")
    assert client.is_model_ready("simple")
    client.close()


def test_version_policies(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "latest_two", versions=(1, 2, 3))
    append_config(repository / "latest_two", "version_policy:\n  latest:\n    num_versions: 2\n")
    add_simple(repository, "every", versions=(1, 2, 3))
    append_config(repository / "every", "version_policy:\n  all: {}\n")
    add_simple(repository, "chosen", versions=(1, 2, 3))
    append_config(repository / "chosen", "version_policy:\n  specific:\n    versions: [1, 3]\n")
    newest = add_simple(repository, "newest", versions=(1,))
    server = start_server(repository, *POLL)

    def versions(model: str) -> list[str]:
        return httpx.get(f"{server.url}/v2/models/{model}", timeout=10).json()["versions"]

    def served_by(model: str, version: str = "") -> str:
        response = infer_simple(None, server.url, model, version)
        check_simple_output(response)
        return response.json()["model_version"]

    assert versions("latest_two") == ["2", "3"]
    assert versions("every") == ["1", "2", "3"]
    assert versions("chosen") == ["1", "3"]
    assert [served_by("every", v) for v in ("1", "2", "3")] == ["1", "2", "3"]
    assert served_by("latest_two") == "3" and served_by("latest_two", "2") == "2"
    assert served_by("chosen") == "3" and served_by("chosen", "1") == "1"
    assert infer_simple(None, server.url, "chosen", "2").status_code == 404
    assert infer_simple(None, server.url, "latest_two", "1").status_code == 404

    # With the default latest:1 policy a new version folder takes over and the old one is unloaded.
    assert versions("newest") == ["1"]
    add_version(newest, 2)
    wait_for(lambda: versions("newest") == ["2"], what="version 2 to replace version 1")
    assert served_by("newest") == "2"
    assert infer_simple(None, server.url, "newest", "1").status_code == 404


def test_repository_control_over_grpc(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "simple")
    add_simple(repository, "other")
    explicit = start_server(repository, "--model-control-mode", "explicit", "--load-model", "simple")
    client = triton_grpc.InferenceServerClient(explicit.grpc_url)
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states == {"simple": "READY", "other": "UNAVAILABLE"}
    client.load_model("other", config=json.dumps({"backend": "onnxruntime", "max_batch_size": 3}))
    assert client.get_model_config("other").config.max_batch_size == 3
    check_simple_output(infer_simple(None, explicit.url, "other"))
    client.unload_model("other")
    assert not client.is_model_ready("other")
    client.close()

    polled = start_server(repository, *POLL)
    client = triton_grpc.InferenceServerClient(polled.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        client.unload_model("simple")
    assert refused.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
    assert "explicit" in refused.value.message()
    assert client.is_model_ready("simple")
    client.close()
