"""The response cache (``--cache-config local,size=N`` and ``response_cache: {enable: true}``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from server.errors import ConfigError
from server.extensions.statistics import ModelStats
from server.protocol.types import InferRequest, InferResponse, RequestedOutput
from server.scheduling.response_cache import ResponseCache, parse_cache_config
from tests.conftest import ROOT, ServerProcess
from tests.pipeline_models import add_double, tensor, write_model

X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)

# OUT = X * factor and NEG = -OUT, the factor read from the config's parameters so a reload can change it.
SCALE_SOURCE = """
import json


class TritonPythonModel:
    def initialize(self, args):
        self.factor = float(json.loads(args["model_config"])["parameters"]["factor"]["string_value"])

    def execute(self, requests):
        out = requests[0].get_input("X") * self.factor
        return [{"OUT": out, "NEG": -out}]
"""


def scaled_config(factor: float, cache: bool = True) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "python",
        "max_batch_size": 8,
        "input": [tensor("X")],
        "output": [tensor("OUT"), tensor("NEG")],
        "parameters": {"factor": str(factor)},
    }
    if cache:
        config["response_cache"] = {"enable": True}
    return config


@pytest.fixture(scope="module")
def cache_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repository = tmp_path_factory.mktemp("response_cache")
    write_model(repository, "scaled", scaled_config(2.0), {"model.py": SCALE_SOURCE})
    write_model(repository, "uncached", scaled_config(2.0, cache=False), {"model.py": SCALE_SOURCE})
    add_double(repository)
    pipeline = {
        "platform": "ensemble",
        "max_batch_size": 8,
        "input": [tensor("X")],
        "output": [tensor("Y")],
        "ensemble_scheduling": {"step": [{"model_name": "double", "input_map": {"X": "X"}, "output_map": {"Y": "Y"}}]},
        "response_cache": {"enable": True},
    }
    write_model(repository, "cached_pipeline", pipeline)
    return start_server(
        repository, "--model-control-mode", "explicit", "--load-model", "*", "--cache-config", "local,size=1048576"
    )


def http_client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def http_infer(server: ServerProcess, model: str, x: np.ndarray, outputs: list[str] | None = None) -> Any:
    item = httpclient.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    requested = [httpclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return http_client(server).infer(model, [item], outputs=requested)


def grpc_infer(server: ServerProcess, model: str, x: np.ndarray) -> Any:
    item = grpcclient.InferInput("X", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return grpcclient.InferenceServerClient(server.grpc_url).infer(model, [item])


def counts(server: ServerProcess, model: str) -> dict[str, int]:
    stats = http_client(server).get_inference_statistics(model)["model_stats"][0]
    inference = stats["inference_stats"]
    return {
        "executions": int(stats["execution_count"]),
        "inferences": int(stats["inference_count"]),
        "hits": int(inference["cache_hit"].get("count", 0)),
        "misses": int(inference["cache_miss"].get("count", 0)),
        "successes": int(inference["success"].get("count", 0)),
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


def test_a_hit_answers_without_running_the_model(cache_server: ServerProcess) -> None:
    x = X + 100
    before = counts(cache_server, "scaled")
    first = http_infer(cache_server, "scaled", x).as_numpy("OUT")
    second = grpc_infer(cache_server, "scaled", x).as_numpy("OUT")
    third = http_infer(cache_server, "scaled", x).as_numpy("OUT")
    np.testing.assert_array_equal(first, x * 2)
    np.testing.assert_array_equal(second, x * 2)
    np.testing.assert_array_equal(third, x * 2)
    change = delta(counts(cache_server, "scaled"), before)
    assert change == {"executions": 1, "inferences": 1, "hits": 2, "misses": 1, "successes": 3}
    over_grpc = grpcclient.InferenceServerClient(cache_server.grpc_url).get_inference_statistics("scaled", as_json=True)
    grpc_stats = over_grpc["model_stats"][0]["inference_stats"]
    assert int(grpc_stats["cache_hit"]["count"]) == counts(cache_server, "scaled")["hits"]
    assert int(grpc_stats["cache_hit"]["ns"]) > 0


def test_different_inputs_or_outputs_are_different_entries(cache_server: ServerProcess) -> None:
    x = X + 200
    before = counts(cache_server, "scaled")
    http_infer(cache_server, "scaled", x)
    http_infer(cache_server, "scaled", x + 1)
    only_neg = http_infer(cache_server, "scaled", x, outputs=["NEG"])
    assert only_neg.as_numpy("OUT") is None
    np.testing.assert_array_equal(only_neg.as_numpy("NEG"), -x * 2)
    wider_batch = np.concatenate([x, x])
    np.testing.assert_array_equal(http_infer(cache_server, "scaled", wider_batch).as_numpy("OUT"), wider_batch * 2)
    change = delta(counts(cache_server, "scaled"), before)
    assert change["misses"] == 4 and change["hits"] == 0 and change["executions"] == 4


def test_a_reload_drops_the_models_entries(cache_server: ServerProcess) -> None:
    x = X + 300
    client = http_client(cache_server)
    np.testing.assert_array_equal(http_infer(cache_server, "scaled", x).as_numpy("OUT"), x * 2)
    np.testing.assert_array_equal(http_infer(cache_server, "scaled", x).as_numpy("OUT"), x * 2)
    client.load_model("scaled", config=json.dumps(scaled_config(3.0)))
    try:
        before = counts(cache_server, "scaled")
        np.testing.assert_array_equal(http_infer(cache_server, "scaled", x).as_numpy("OUT"), x * 3)
        np.testing.assert_array_equal(grpc_infer(cache_server, "scaled", x).as_numpy("OUT"), x * 3)
        change = delta(counts(cache_server, "scaled"), before)
        assert change["executions"] == 1 and change["misses"] == 1 and change["hits"] == 1
        client.unload_model("scaled")
        client.load_model("scaled", config=json.dumps(scaled_config(3.0)))
        assert counts(cache_server, "scaled")["hits"] == 0  # counters start again after an unload
        http_infer(cache_server, "scaled", x)
        assert counts(cache_server, "scaled")["misses"] == 1
    finally:
        client.load_model("scaled", config=json.dumps(scaled_config(2.0)))


def test_a_model_without_response_cache_is_never_cached(cache_server: ServerProcess) -> None:
    before = counts(cache_server, "uncached")
    for _ in range(3):
        np.testing.assert_array_equal(http_infer(cache_server, "uncached", X).as_numpy("OUT"), X * 2)
    change = delta(counts(cache_server, "uncached"), before)
    assert change == {"executions": 3, "inferences": 3, "hits": 0, "misses": 0, "successes": 3}


def test_a_cached_ensemble_skips_its_steps(cache_server: ServerProcess) -> None:
    x = X + 400
    before = counts(cache_server, "double")
    for _ in range(3):
        np.testing.assert_array_equal(http_infer(cache_server, "cached_pipeline", x).as_numpy("Y"), x * 2)
    assert delta(counts(cache_server, "double"), before)["executions"] == 1
    assert counts(cache_server, "cached_pipeline")["hits"] >= 2


def test_metrics_count_hits_and_misses(cache_server: ServerProcess) -> None:
    http_infer(cache_server, "scaled", X + 500)
    http_infer(cache_server, "scaled", X + 500)
    stats = counts(cache_server, "scaled")
    text = httpx.get(f"{cache_server.url}/metrics", timeout=10).text
    assert f'nv_cache_num_hits_per_model{{model="scaled",version="1"}} {float(stats["hits"])}' in text
    assert f'nv_cache_num_misses_per_model{{model="scaled",version="1"}} {float(stats["misses"])}' in text
    assert 'nv_cache_hit_duration_per_model{model="scaled",version="1"}' in text


def response(value: float, elements: int) -> InferResponse:
    return InferResponse("m", "1", outputs={"OUT": np.full(elements, value, dtype=np.float32)})


def request(value: float) -> InferRequest:
    return InferRequest("m", inputs={"X": np.array([value], dtype=np.float32)})


def test_the_cache_evicts_the_least_recently_used_by_bytes() -> None:
    cache = ResponseCache(size_bytes=1000)
    view = cache.for_version("m", "1", ModelStats("m", "1"))
    for value in (1.0, 2.0, 3.0):
        view.store(view.lookup(request(value)), response(value, 50))  # 200 bytes of data plus the key each
    assert len(cache) == 3 and cache.used_bytes <= 1000
    assert view.lookup(request(1.0)).response is not None  # 1.0 is now the most recently used
    view.store(view.lookup(request(4.0)), response(4.0, 100))  # 400 more bytes: the oldest (2.0) must go
    assert view.lookup(request(2.0)).response is None
    assert view.lookup(request(1.0)).response is not None
    assert view.lookup(request(4.0)).response is not None
    assert cache.used_bytes <= 1000
    view.store(view.lookup(request(5.0)), response(5.0, 1000))  # larger than the whole cache: not kept
    assert view.lookup(request(5.0)).response is None
    view.drop()
    assert len(cache) == 0 and cache.used_bytes == 0


def test_keys_tell_apart_what_decides_a_response() -> None:
    cache = ResponseCache(size_bytes=1 << 20)
    first = cache.for_version("m", "1", ModelStats("m", "1"))
    reloaded = cache.for_version("m", "1", ModelStats("m", "1"))
    base = InferRequest("m", inputs={"X": np.zeros((1, 4), dtype=np.float32)})
    keys = {
        first.key(base),
        reloaded.key(base),
        first.key(InferRequest("m", inputs={"X": np.zeros((4, 1), dtype=np.float32)})),
        first.key(InferRequest("m", inputs={"X": np.zeros((1, 4), dtype=np.int32)})),
        first.key(InferRequest("m", inputs={"Y": np.zeros((1, 4), dtype=np.float32)})),
        first.key(InferRequest("m", inputs=base.inputs, outputs=[RequestedOutput("OUT")])),
        first.key(InferRequest("m", inputs=base.inputs, outputs=[RequestedOutput("OUT", {"classification": 2})])),
        first.key(InferRequest("m", inputs={"X": np.array([[b"ab", b"c"]], dtype=object)})),
        first.key(InferRequest("m", inputs={"X": np.array([[b"a", b"bc"]], dtype=object)})),
    }
    assert len(keys) == 9
    same = InferRequest("m", id="other", inputs={"X": np.zeros((1, 4), dtype=np.float32)}, parameters={"priority": 1})
    assert first.key(same) == first.key(base)


def test_cache_config_flag() -> None:
    assert parse_cache_config([]) is None
    settings = parse_cache_config(["local,size=1048576"])
    assert settings is not None and settings.size_bytes == 1048576
    for bad in ("redis,size=10", "local,size=lots", "local,capacity=10"):
        with pytest.raises(ConfigError, match="--cache-config"):
            parse_cache_config([bad])
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--cache-config", "local,size=big"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "expected local,size=<bytes>" in result.stderr
