"""Ensembles (``platform: ensemble``) through the real server with tritonclient over HTTP and gRPC."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.config import parse_model_config
from server.errors import ConfigError
from tests.conftest import ServerProcess
from tests.pipeline_models import add_add_one, add_double, tensor, write_model

X = np.array([[1.0, -2.0, 3.5, 0.0]], dtype=np.float32)

# X -> double -> D; D -> add_one -> E and, in parallel, D -> double -> F (the same model in two steps).
PIPELINE: dict[str, Any] = {
    "platform": "ensemble",
    "max_batch_size": 8,
    "input": [tensor("X")],
    "output": [tensor("E"), tensor("F")],
    "ensemble_scheduling": {
        "step": [
            {"model_name": "double", "model_version": -1, "input_map": {"X": "X"}, "output_map": {"Y": "D"}},
            {"model_name": "add_one", "model_version": -1, "input_map": {"Y": "D"}, "output_map": {"Z": "E"}},
            {"model_name": "double", "model_version": 1, "input_map": {"X": "D"}, "output_map": {"Y": "F"}},
        ]
    },
}


@pytest.fixture(scope="module")
def ensemble_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("ensembles")
    # Slow enough that concurrent requests queue behind a running batch and batch together.
    add_double(repository, sleep_s=0.3, queue_delay_us=50_000)
    add_add_one(repository)
    write_model(repository, "pipeline", PIPELINE)
    write_model(repository, "bad", PIPELINE)
    # Explicit mode, loading only the ensemble: its step models are loaded because it needs them.
    return start_server(repository, "--model-control-mode", "explicit", "--load-model", "pipeline")


def http_infer(
    server: ServerProcess, model: str, name: str, array: np.ndarray, **kwargs: Any
) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor_in = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor_in.set_data_from_numpy(array)
    return client.infer(model, [tensor_in], **kwargs)


def grpc_infer(server: ServerProcess, model: str, name: str, array: np.ndarray) -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor_in = grpcclient.InferInput(name, list(array.shape), "FP32")
    tensor_in.set_data_from_numpy(array)
    return client.infer(model, [tensor_in])


def test_ensemble_output_equals_running_the_steps_by_hand(ensemble_server: ServerProcess) -> None:
    doubled = http_infer(ensemble_server, "double", "X", X).as_numpy("Y")
    by_hand_e = http_infer(ensemble_server, "add_one", "Y", doubled).as_numpy("Z")
    by_hand_f = http_infer(ensemble_server, "double", "X", doubled).as_numpy("Y")
    np.testing.assert_allclose(by_hand_e, X * 2 + 1)
    np.testing.assert_allclose(by_hand_f, X * 4)

    over_http = http_infer(ensemble_server, "pipeline", "X", X)
    np.testing.assert_array_equal(over_http.as_numpy("E"), by_hand_e)
    np.testing.assert_array_equal(over_http.as_numpy("F"), by_hand_f)
    over_grpc = grpc_infer(ensemble_server, "pipeline", "X", X)
    np.testing.assert_array_equal(over_grpc.as_numpy("E"), by_hand_e)
    np.testing.assert_array_equal(over_grpc.as_numpy("F"), by_hand_f)

    only_f = http_infer(ensemble_server, "pipeline", "X", X, outputs=[httpclient.InferRequestedOutput("F")])
    assert only_f.as_numpy("E") is None
    np.testing.assert_array_equal(only_f.as_numpy("F"), by_hand_f)


def test_ensemble_metadata_and_config(ensemble_server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(ensemble_server.grpc_url)
    metadata = client.get_model_metadata("pipeline", as_json=True)
    assert metadata["platform"] == "ensemble"
    assert [i["name"] for i in metadata["inputs"]] == ["X"]
    config = client.get_model_config("pipeline", as_json=True)["config"]
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["double", "add_one", "double"]
    assert steps[1]["input_map"] == {"Y": "D"}


def statistics(server: ServerProcess, model: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    return client.get_inference_statistics(model)["model_stats"][0]


def test_concurrent_ensemble_requests_batch_inside_a_step(ensemble_server: ServerProcess) -> None:
    before_step = statistics(ensemble_server, "add_one")
    before_ensemble = statistics(ensemble_server, "pipeline")
    rows = [X + i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: http_infer(ensemble_server, "pipeline", "X", x), rows))
    for x, result in zip(rows, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("E"), x * 2 + 1)
        np.testing.assert_allclose(result.as_numpy("F"), x * 4)
    step = statistics(ensemble_server, "add_one")
    ensemble = statistics(ensemble_server, "pipeline")
    inferences = step["inference_count"] - before_step["inference_count"]
    executions = step["execution_count"] - before_step["execution_count"]
    assert inferences == 8
    # The slow first step releases requests in batches, so the later steps run fewer batches than requests.
    assert executions < inferences
    assert ensemble["inference_count"] - before_ensemble["inference_count"] == 8
    success = ensemble["inference_stats"]["success"]["count"] - before_ensemble["inference_stats"]["success"]["count"]
    assert success == 8
    double = statistics(ensemble_server, "double")
    assert double["execution_count"] < double["inference_count"]


def test_a_step_error_names_the_step(ensemble_server: ServerProcess) -> None:
    wrong_width = np.zeros((1, 5), dtype=np.float32)
    with pytest.raises(InferenceServerException) as caught:
        http_infer(ensemble_server, "pipeline", "X", wrong_width)
    assert "input 'X'" in caught.value.message()
    assert caught.value.status() == "400"


def bad(change: Callable[[dict[str, Any]], None]) -> str:
    config = copy.deepcopy(PIPELINE)
    change(config)
    return json.dumps(config)


def _steps(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["ensemble_scheduling"]["step"]


BAD_CONFIGS = {
    "unknown model": (
        lambda c: _steps(c)[1].update(model_name="no_such_model"),
        "step 1 (model 'no_such_model'): no such model",
    ),
    "produced twice": (
        lambda c: _steps(c)[2].update(output_map={"Y": "E"}),
        "step 2 (model 'double'): tensor 'E' is produced twice",
    ),
    "never produced": (
        lambda c: _steps(c)[1].update(input_map={"Y": "nowhere"}),
        "step 1 (model 'add_one'): input 'Y' reads tensor 'nowhere', which nothing produces",
    ),
    "datatype mismatch": (
        lambda c: c["input"][0].update(data_type="TYPE_INT32"),
        "step 0 (model 'double'): tensor 'X' is TYPE_INT32 where it is produced but TYPE_FP32",
    ),
    "shape mismatch": (
        lambda c: c["output"][0].update(dims=[5]),
        "step 1 (model 'add_one'): tensor 'E' has shape [-1, 4] where it is produced but [-1, 5]",
    ),
    "unknown step input": (
        lambda c: _steps(c)[1].update(input_map={"WRONG": "D"}),
        "step 1 (model 'add_one'): input_map names 'WRONG', which is not an input of the model",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_ensemble_configs_are_refused_naming_the_step(ensemble_server: ServerProcess, case: str) -> None:
    change, expected = BAD_CONFIGS[case]
    client = httpclient.InferenceServerClient(ensemble_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("bad", config=bad(change))
    assert expected in caught.value.message()
    assert not client.is_model_ready("bad")


def test_cycle_error_names_the_steps(ensemble_server: ServerProcess) -> None:
    def cycle(config: dict[str, Any]) -> None:
        # double reads F, which the third step makes from double's own output.
        _steps(config)[0]["input_map"] = {"X": "F"}
        config["output"] = [tensor("E")]

    client = grpcclient.InferenceServerClient(ensemble_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("bad", config=bad(cycle))
    message = caught.value.message()
    assert "the steps form a cycle through their tensors: step 0 (model 'double'), step 2 (model 'double')" in message


def test_ensemble_is_ready_only_while_every_step_model_is(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    add_double(tmp_path)
    add_add_one(tmp_path)
    write_model(tmp_path, "pipeline", PIPELINE)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_model_ready("pipeline")
    client.unload_model("add_one")
    assert not client.is_model_ready("pipeline")
    index = {row["name"]: row for row in client.get_model_repository_index(as_json=True)["models"]}
    assert index["pipeline"]["state"] == "UNAVAILABLE"
    assert "step model 'add_one' is not ready" in index["pipeline"]["reason"]
    with pytest.raises(InferenceServerException) as caught:
        grpc_infer(server, "pipeline", "X", X)
    assert "ensemble 'pipeline': step model 'add_one' is not ready" in caught.value.message()
    client.load_model("add_one")
    assert client.is_model_ready("pipeline")
    np.testing.assert_allclose(grpc_infer(server, "pipeline", "X", X).as_numpy("E"), X * 2 + 1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"platform": "ensemble"}, "field 'ensemble_scheduling': platform 'ensemble' needs ensemble_scheduling"),
        ({"ensemble_scheduling": PIPELINE["ensemble_scheduling"]}, "field 'ensemble_scheduling': needs platform"),
        ({**PIPELINE, "backend": "python"}, "field 'backend': an ensemble runs other models"),
        ({**PIPELINE, "ensemble_scheduling": {"step": []}}, "field 'ensemble_scheduling.step'"),
    ],
)
def test_ensemble_fields_must_agree(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_model_config(fields, "config.yaml", "pipeline")


def test_a_client_that_leaves_stops_the_pipeline(ensemble_server: ServerProcess) -> None:
    before_step = statistics(ensemble_server, "add_one")
    before_ensemble = statistics(ensemble_server, "pipeline")
    client = grpcclient.InferenceServerClient(ensemble_server.grpc_url)
    tensor_in = grpcclient.InferInput("X", list(X.shape), "FP32")
    tensor_in.set_data_from_numpy(X)
    # The first step takes 0.3 s, so the client gives up while it runs.
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("pipeline", [tensor_in], client_timeout=0.1)
    failures_before = before_ensemble["inference_stats"]["fail"]["count"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if statistics(ensemble_server, "pipeline")["inference_stats"]["fail"]["count"] > failures_before:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # long past the first step's end: a step that was going to start has started by now
    failed = statistics(ensemble_server, "pipeline")["inference_stats"]["fail"]["count"]
    assert failed - failures_before == 1
    assert statistics(ensemble_server, "add_one")["inference_count"] == before_step["inference_count"]
    text = httpx.get(f"{ensemble_server.url}/metrics", timeout=10).text
    assert 'nv_inference_request_failure{model="pipeline",reason="CANCELED",version="1"} 1.0' in text
