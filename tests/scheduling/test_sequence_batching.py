"""Sequence batching and implicit state through the real server, with tritonclient over HTTP and gRPC."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from model_repository.build import build_accumulator
from server.config import parse_model_config
from server.errors import ConfigError
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess
from tests.extensions.test_statistics_metrics import metric
from tests.repository.test_validate import validate

IDLE_US = 1_000_000
INITIAL = 100.0

CONTROL_MODEL = """
import numpy as np


class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        ready = request.get_input("R")
        rows = np.full((ready.shape[0], 1), ready.shape[0], dtype=np.int32)
        ready_rows = np.full((ready.shape[0], 1), int(ready.sum()), dtype=np.int32)
        return [
            {
                "S_OUT": request.get_input("S"),
                "E_OUT": request.get_input("E"),
                "R_OUT": ready,
                "C_OUT": request.get_input("C"),
                "ROWS": rows,
                "READY_ROWS": ready_rows,
            }
        ]
"""


UNBATCHED_MODEL = """
class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        keep = 1.0 - request.get_input("START")
        total = request.get_input("INPUT") + request.get_input("TOTAL_IN") * keep
        return [{"OUTPUT": total, "TOTAL_OUT": total.copy()}]
"""

UNBATCHED_CONFIG = """
backend: python
max_batch_size: 0
input: [{name: INPUT, data_type: TYPE_FP32, dims: [1]}]
output: [{name: OUTPUT, data_type: TYPE_FP32, dims: [1]}]
instance_group: [{count: 2, kind: KIND_CPU}]
sequence_batching:
  max_sequence_idle_microseconds: 30000000
  control_input: [{name: START, control: [{kind: CONTROL_SEQUENCE_START, fp32_false_true: [0, 1]}]}]
  state: [{input_name: TOTAL_IN, output_name: TOTAL_OUT, data_type: TYPE_FP32, dims: [1]}]
"""


def accumulator_config(**sequence_batching: Any) -> dict[str, Any]:
    """The bundled accumulator's config with some ``sequence_batching`` fields replaced."""
    config = yaml.safe_load((BUNDLED_REPOSITORY / "accumulator" / "config.yaml").read_text())
    config["sequence_batching"].update(sequence_batching)
    return config


def write_model(repository: Path, name: str, config: dict[str, Any], reset_on_start: bool = True) -> Path:
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (model_dir / "1" / "model.onnx").write_bytes(build_accumulator(reset_on_start).SerializeToString())
    return model_dir


def write_torch_accumulator(repository: Path) -> None:
    """The accumulator as a torch.export program (forward takes the state, returns the new one by name)."""
    import torch

    class Accumulator(torch.nn.Module):
        def forward(self, INPUT: torch.Tensor, INPUT_STATE: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: N803
            total = INPUT + INPUT_STATE
            return {"OUTPUT": total, "OUTPUT_STATE": total.clone()}

    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        Accumulator(),
        (torch.zeros(2, 1), torch.zeros(2, 1)),
        dynamic_shapes={"INPUT": {0: batch}, "INPUT_STATE": {0: batch}},
    )
    config = accumulator_config(control_input=[])
    config["backend"] = "pytorch"
    (repository / "torch_accumulator" / "1").mkdir(parents=True)
    (repository / "torch_accumulator" / "config.yaml").write_text(yaml.safe_dump(config))
    torch.export.save(program, str(repository / "torch_accumulator" / "1" / "model.pt2"))


def control_config(corrid_type: str) -> dict[str, Any]:
    corrid_output = "TYPE_STRING" if corrid_type == "TYPE_STRING" else corrid_type
    return {
        "backend": "python",
        "max_batch_size": 4,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [
            {"name": "S_OUT", "data_type": "TYPE_FP32", "dims": [1]},
            {"name": "E_OUT", "data_type": "TYPE_INT32", "dims": [1]},
            {"name": "R_OUT", "data_type": "TYPE_BOOL", "dims": [1]},
            {"name": "C_OUT", "data_type": corrid_output, "dims": [1]},
            {"name": "ROWS", "data_type": "TYPE_INT32", "dims": [1]},
            {"name": "READY_ROWS", "data_type": "TYPE_INT32", "dims": [1]},
        ],
        "sequence_batching": {
            "max_sequence_idle_microseconds": 30_000_000,
            "direct": {},
            "control_input": [
                {"name": "S", "control": [{"kind": "CONTROL_SEQUENCE_START", "fp32_false_true": [-1.5, 2.5]}]},
                {"name": "E", "control": [{"kind": "CONTROL_SEQUENCE_END", "int32_false_true": [10, 20]}]},
                {"name": "R", "control": [{"kind": "CONTROL_SEQUENCE_READY", "bool_false_true": [False, True]}]},
                {"name": "C", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": corrid_type}]},
            ],
        },
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }


@pytest.fixture(scope="module")
def sequence_server(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("sequence-models")
    shutil.copytree(BUNDLED_REPOSITORY / "accumulator", repository / "accumulator")
    # One slot (max_batch_size 1, one instance): a second sequence waits until the first frees it.
    one_slot = accumulator_config(max_sequence_idle_microseconds=IDLE_US)
    one_slot["max_batch_size"] = 1
    write_model(repository, "one_slot", one_slot)
    write_model(
        repository,
        "oldest",
        accumulator_config(
            direct=None,
            oldest={
                "max_candidate_sequences": 4,
                "preferred_batch_size": [4],
                "max_queue_delay_microseconds": 2_000_000,
            },
        ),
    )
    direct_wait = accumulator_config(
        direct={"max_queue_delay_microseconds": 2_000_000, "minimum_slot_utilization": 0.5}
    )
    direct_wait["max_batch_size"] = 4
    write_model(repository, "direct_wait", direct_wait)
    from_file = accumulator_config(control_input=[])
    from_file["sequence_batching"]["state"][0]["initial_state"] = {
        "data_type": "TYPE_FP32",
        "dims": [1],
        "data_file": "hundred",
    }
    model_dir = write_model(repository, "from_file", from_file, reset_on_start=False)
    (model_dir / "initial_state").mkdir()
    (model_dir / "initial_state" / "hundred").write_bytes(np.array([INITIAL], dtype="<f4").tobytes())
    write_model(repository, "zero_start", accumulator_config(control_input=[]), reset_on_start=False)
    missing = accumulator_config(control_input=[])
    missing["sequence_batching"]["state"][0]["initial_state"] = {
        "data_type": "TYPE_FP32",
        "dims": [1],
        "data_file": "absent",
    }
    write_model(repository, "missing_file", missing, reset_on_start=False)
    wrong_type = accumulator_config()
    wrong_type["sequence_batching"]["state"][0]["data_type"] = "TYPE_FP64"
    del wrong_type["sequence_batching"]["state"][0]["initial_state"]
    write_model(repository, "wrong_state_type", wrong_type)
    write_torch_accumulator(repository)
    (repository / "unbatched" / "1").mkdir(parents=True)
    (repository / "unbatched" / "config.yaml").write_text(UNBATCHED_CONFIG)
    (repository / "unbatched" / "1" / "model.py").write_text(UNBATCHED_MODEL)
    for name, corrid_type in (("controls", "TYPE_UINT64"), ("controls_string", "TYPE_STRING")):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.yaml").write_text(yaml.safe_dump(control_config(corrid_type)))
        (repository / name / "1" / "model.py").write_text(CONTROL_MODEL)
    return start_server(repository)


def _http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)


def _grpc(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def add(client: Any, model: str, sequence_id: int | str, value: float, start: bool = False, end: bool = False) -> float:
    """One step of an accumulator sequence; the running total it returns."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    tensor = module.InferInput("INPUT", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    result = client.infer(model, [tensor], sequence_id=sequence_id, sequence_start=start, sequence_end=end)
    return float(result.as_numpy("OUTPUT")[0, 0])


def statistics(server: ServerProcess, model: str) -> dict[str, Any]:
    stats = httpx.get(f"{server.url}/v2/models/{model}/stats").json()["model_stats"][0]
    return {"inference_count": int(stats["inference_count"]), "execution_count": int(stats["execution_count"])}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_interleaved_sequences_keep_separate_state(sequence_server: ServerProcess, protocol: str) -> None:
    """Four concurrent clients, each running its own sequence; requests of all four interleave and batch."""
    steps = 8
    ids: list[int | str] = [11, 12, "alpha", "beta"] if protocol == "http" else [21, 22, "gamma", "delta"]
    totals: dict[int | str, list[float]] = {}
    errors: list[BaseException] = []

    def run(position: int, sequence_id: int | str) -> None:
        client = _http(sequence_server) if protocol == "http" else _grpc(sequence_server)
        try:
            seen = []
            for step in range(steps):
                value = float((position + 1) * (step + 1))
                seen.append(add(client, "accumulator", sequence_id, value, start=step == 0, end=step == steps - 1))
            totals[sequence_id] = seen
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(p, s)) for p, s in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for position, sequence_id in enumerate(ids):
        expected = np.cumsum([(position + 1) * (step + 1) for step in range(steps)]).tolist()
        assert totals[sequence_id] == expected


@pytest.mark.parametrize("make_client", [_http, _grpc])
def test_unknown_and_ended_sequences_are_refused(
    sequence_server: ServerProcess, make_client: Callable[[ServerProcess], Any]
) -> None:
    client = make_client(sequence_server)
    with pytest.raises(InferenceServerException) as unknown:
        add(client, "accumulator", 4242, 1.0)
    assert "4242" in str(unknown.value) and "sequence_start" in str(unknown.value)
    assert add(client, "accumulator", 4243, 2.0, start=True, end=True) == 2.0
    with pytest.raises(InferenceServerException) as ended:
        add(client, "accumulator", 4243, 1.0)
    assert "4243" in str(ended.value)
    for refused in (unknown.value, ended.value):
        assert str(refused.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), refused.status()
    # The id is free again: a new start begins a new sequence from the initial state.
    assert add(client, "accumulator", 4243, 5.0, start=True) == 5.0
    assert add(client, "accumulator", 4243, 5.0, end=True) == 10.0


def test_status_codes_of_refused_requests(sequence_server: ServerProcess) -> None:
    url = f"{sequence_server.url}/v2/models/accumulator/infer"
    body: dict[str, Any] = {"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    missing_id = httpx.post(url, json=body)
    assert missing_id.status_code == 400 and "sequence_id" in missing_id.json()["error"]
    unknown = httpx.post(url, json={**body, "parameters": {"sequence_id": 777}})
    assert unknown.status_code == 400 and "777" in unknown.json()["error"]
    bad_flag = httpx.post(url, json={**body, "parameters": {"sequence_id": 7, "sequence_start": "yes"}})
    assert bad_flag.status_code == 400 and "sequence_start" in bad_flag.json()["error"]
    bad_id = httpx.post(url, json={**body, "parameters": {"sequence_id": -3, "sequence_start": True}})
    assert bad_id.status_code == 400 and "sequence_id" in bad_id.json()["error"]
    two_rows = {"inputs": [{"name": "INPUT", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
    batch = httpx.post(url, json={**two_rows, "parameters": {"sequence_id": 8, "sequence_start": True}})
    assert batch.status_code == 400 and "batch size 1" in batch.json()["error"]
    state_in = {
        "inputs": [*body["inputs"], {"name": "INPUT_STATE", "shape": [1, 1], "datatype": "FP32", "data": [9.0]}],
        "parameters": {"sequence_id": 9, "sequence_start": True},
    }
    sent_state = httpx.post(url, json=state_in)
    assert sent_state.status_code == 400 and "INPUT_STATE" in sent_state.json()["error"]
    asked_state = httpx.post(
        url,
        json={**body, "outputs": [{"name": "OUTPUT_STATE"}], "parameters": {"sequence_id": 9, "sequence_start": True}},
    )
    assert asked_state.status_code == 400 and "OUTPUT_STATE" in asked_state.json()["error"]


def test_state_and_controls_are_not_client_tensors(sequence_server: ServerProcess) -> None:
    metadata = httpx.get(f"{sequence_server.url}/v2/models/accumulator").json()
    assert [t["name"] for t in metadata["inputs"]] == ["INPUT"]
    assert [t["name"] for t in metadata["outputs"]] == ["OUTPUT"]
    config = _grpc(sequence_server).get_model_config("accumulator", as_json=True)["config"]
    assert config["sequence_batching"]["state"][0]["input_name"] == "INPUT_STATE"
    assert config["sequence_batching"]["control_input"][0]["name"] == "START"


def test_idle_sequence_times_out_and_frees_its_slot(sequence_server: ServerProcess) -> None:
    client = _http(sequence_server)
    assert add(client, "one_slot", 1, 3.0, start=True) == 3.0
    # The only slot is taken: the second sequence waits until the first has been idle for IDLE_US.
    began = time.monotonic()
    assert add(client, "one_slot", 2, 4.0, start=True) == 4.0
    waited = time.monotonic() - began
    assert waited >= 0.5 * IDLE_US / 1e6, waited
    with pytest.raises(InferenceServerException) as timed_out:
        add(client, "one_slot", 1, 1.0)
    assert "sequence 1 " in str(timed_out.value)
    assert add(client, "one_slot", 2, 1.0, end=True) == 5.0


@pytest.mark.parametrize("model", ["oldest", "direct_wait"])
def test_concurrent_sequences_batch_together(sequence_server: ServerProcess, model: str) -> None:
    """Four sequences stepping together share executions (``oldest``: up to its preferred size; ``direct``: a
    batch waits for half the slots to be ready), and each still sums only its own inputs."""
    before = statistics(sequence_server, model)
    steps, count = 5, 4
    barrier = threading.Barrier(count)
    totals: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def run(sequence_id: int) -> None:
        client = _grpc(sequence_server) if sequence_id % 2 else _http(sequence_server)
        try:
            seen = []
            for step in range(steps):
                barrier.wait(30)
                seen.append(add(client, model, sequence_id, sequence_id * 10.0 + step, start=step == 0))
            totals[sequence_id] = seen
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i + 1,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    for sequence_id, seen in totals.items():
        assert seen == np.cumsum([sequence_id * 10.0 + step for step in range(steps)]).tolist()
    after = statistics(sequence_server, model)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == steps * count
    assert executions < inferences, (executions, inferences)
    text = httpx.get(f"http://127.0.0.1:{sequence_server.metrics_port}/metrics").text
    assert metric(text, "nv_inference_count", model) == after["inference_count"]
    assert metric(text, "nv_inference_exec_count", model) == after["execution_count"]


def test_initial_state_from_data_file_and_zero_data(sequence_server: ServerProcess) -> None:
    client = _grpc(sequence_server)
    assert add(client, "from_file", "f", 1.0, start=True) == INITIAL + 1.0
    assert add(client, "from_file", "f", 2.0) == INITIAL + 3.0
    # A new start of a running sequence begins again from the initial state.
    assert add(client, "from_file", "f", 5.0, start=True) == INITIAL + 5.0
    assert add(client, "from_file", "f", 0.0, end=True) == INITIAL + 5.0
    assert add(client, "zero_start", 5, 7.0, start=True) == 7.0
    assert add(client, "zero_start", 5, 7.0, end=True) == 14.0


@pytest.mark.parametrize(
    ("model", "field", "detail"),
    [
        ("missing_file", "sequence_batching.state[0].initial_state[0].data_file", "absent"),
        ("wrong_state_type", "sequence_batching.state[0].input_name", "TYPE_FP64"),
    ],
)
def test_bad_sequence_model_fails_the_load_naming_the_field(
    sequence_server: ServerProcess, model: str, field: str, detail: str
) -> None:
    rows = httpx.post(f"{sequence_server.url}/v2/repository/index", json={}).json()
    (row,) = [r for r in rows if r["name"] == model]
    assert row["state"] == "UNAVAILABLE"
    assert f"field '{field}'" in row["reason"] and detail in row["reason"]


def test_a_pytorch_model_keeps_state_too(sequence_server: ServerProcess) -> None:
    client = _http(sequence_server)
    assert add(client, "torch_accumulator", 3, 1.5, start=True) == 1.5
    assert add(client, "torch_accumulator", 4, 10.0, start=True) == 10.0
    assert add(client, "torch_accumulator", 3, 2.0, end=True) == 3.5
    assert add(client, "torch_accumulator", 4, 1.0, end=True) == 11.0


@pytest.mark.parametrize("make_client", [_http, _grpc])
def test_control_inputs_reach_the_model(
    sequence_server: ServerProcess, make_client: Callable[[ServerProcess], Any]
) -> None:
    client = make_client(sequence_server)
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient

    def step(model: str, sequence_id: int | str, start: bool = False, end: bool = False) -> dict[str, Any]:
        tensor = module.InferInput("INPUT", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
        result = client.infer(model, [tensor], sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        names = ("S_OUT", "E_OUT", "R_OUT", "C_OUT", "ROWS", "READY_ROWS")
        return {name: result.as_numpy(name)[0, 0] for name in names}

    base = 900 if module is httpclient else 950
    first = step("controls", base + 1, start=True)
    assert (first["S_OUT"], first["E_OUT"], first["R_OUT"], first["C_OUT"]) == (2.5, 10, True, base + 1)
    assert first["S_OUT"].dtype == np.float32 and first["E_OUT"].dtype == np.int32
    assert first["C_OUT"].dtype == np.uint64
    step("controls", base + 2, start=True)
    middle = step("controls", base + 1)
    assert (middle["S_OUT"], middle["E_OUT"], middle["R_OUT"]) == (-1.5, 10, True)
    # Direct strategy: the second sequence holds slot 1, so a batch with only its request has an empty slot 0,
    # sent to the model as a padding row with READY false.
    alone = step("controls", base + 2, end=True)
    assert (alone["E_OUT"], alone["C_OUT"], alone["ROWS"], alone["READY_ROWS"]) == (20, base + 2, 2, 1)
    last = step("controls", base + 1, end=True)
    assert (last["S_OUT"], last["E_OUT"], last["ROWS"]) == (-1.5, 20, 1)
    single = step("controls", base + 3, start=True, end=True)
    assert (single["S_OUT"], single["E_OUT"]) == (2.5, 20)
    text = step("controls_string", f"conversation-{base}", start=True, end=True)
    assert text["C_OUT"] == f"conversation-{base}".encode()
    numeric = step("controls_string", base + 4, start=True, end=True)
    assert numeric["C_OUT"] == str(base + 4).encode()
    with pytest.raises(InferenceServerException) as string_for_number:
        step("controls", "not-a-number", start=True)
    assert "CONTROL_SEQUENCE_CORRID" in str(string_for_number.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"oldest": {}}, "sequence_batching.oldest"),
        (
            {
                "control_input": [
                    {"name": "S", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0]}]}
                ]
            },
            "sequence_batching.control_input[0].control[0].int32_false_true",
        ),
        (
            {"control_input": [{"name": "C", "control": [{"kind": "CONTROL_SEQUENCE_CORRID"}]}]},
            "sequence_batching.control_input[0].control[0].data_type",
        ),
        (
            {
                "control_input": [
                    {"name": "INPUT", "control": [{"kind": "CONTROL_SEQUENCE_READY", "fp32_false_true": [0, 1]}]}
                ]
            },
            "sequence_batching.control_input[0].name",
        ),
        (
            {"state": [{"input_name": "S", "output_name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [1]}]},
            "sequence_batching.state[0].output_name",
        ),
        (
            {
                "state": [
                    {
                        "input_name": "S",
                        "output_name": "T",
                        "data_type": "TYPE_FP32",
                        "dims": [1],
                        "initial_state": {"data_type": "TYPE_INT32", "dims": [1], "zero_data": True},
                    }
                ]
            },
            "sequence_batching.state[0].initial_state[0].data_type",
        ),
        ({"max_sequence_idle_microseconds": -1}, "sequence_batching.max_sequence_idle_microseconds"),
    ],
)
def test_config_errors_name_the_file_and_field(change: dict[str, Any], field: str) -> None:
    config = accumulator_config(**change)
    with pytest.raises(ConfigError) as error:
        parse_model_config(config, "repo/accumulator/config.yaml", "accumulator")
    assert str(error.value).startswith("repo/accumulator/config.yaml: ")
    assert f"field '{field}'" in str(error.value)


def test_dynamic_and_sequence_batching_exclude_each_other() -> None:
    config = accumulator_config()
    config["dynamic_batching"] = {}
    with pytest.raises(ConfigError, match="field 'sequence_batching'"):
        parse_model_config(config, "config.yaml", "accumulator")


def test_a_model_without_batching_keeps_state_per_sequence(sequence_server: ServerProcess) -> None:
    """``max_batch_size: 0``: tensors have no batch dimension, and each instance holds one sequence at a time."""
    client = _grpc(sequence_server)

    def add_unbatched(sequence_id: int, value: float, start: bool = False) -> float:
        tensor = grpcclient.InferInput("INPUT", [1], "FP32")
        tensor.set_data_from_numpy(np.array([value], dtype=np.float32))
        result = client.infer("unbatched", [tensor], sequence_id=sequence_id, sequence_start=start)
        return float(result.as_numpy("OUTPUT")[0])

    assert add_unbatched(1, 2.0, start=True) == 2.0
    assert add_unbatched(2, 5.0, start=True) == 5.0
    assert add_unbatched(1, 3.0) == 5.0
    assert add_unbatched(2, 1.0) == 6.0


def test_validate_reports_a_missing_initial_state_file(tmp_path: Path) -> None:
    shutil.copytree(BUNDLED_REPOSITORY / "accumulator", tmp_path / "accumulator")
    config = accumulator_config()
    config["sequence_batching"]["state"][0]["initial_state"] = {"data_type": "TYPE_FP32", "dims": [1], "data_file": "x"}
    (tmp_path / "accumulator" / "config.yaml").write_text(yaml.safe_dump(config))
    result = validate(tmp_path)
    assert result.returncode != 0
    assert "sequence_batching.state[0].initial_state[0].data_file" in result.stdout, result.stdout


def test_sequence_over_a_grpc_stream(sequence_server: ServerProcess) -> None:
    """tritonclient's streaming API, as used for stateful models: one stream, the sequence's requests in order."""
    client = _grpc(sequence_server)
    totals: list[float] = []
    errors: list[Any] = []
    done = threading.Event()

    def collect(result: Any, error: Any) -> None:
        if error is not None:
            errors.append(error)
        else:
            totals.append(float(result.as_numpy("OUTPUT")[0, 0]))
        if len(totals) + len(errors) == 3:
            done.set()

    client.start_stream(callback=collect)
    try:
        for step, value in enumerate((1.0, 2.0, 4.0)):
            tensor = grpcclient.InferInput("INPUT", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.float32))
            client.async_stream_infer(
                "accumulator", [tensor], sequence_id="stream", sequence_start=step == 0, sequence_end=step == 2
            )
        assert done.wait(30)
    finally:
        client.stop_stream()
    assert not errors, errors
    assert totals == [1.0, 3.0, 7.0]
