"""Python models calling other served models (Triton's BLS) through the real server, over HTTP and gRPC."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.pipeline_models import add_add_one, add_double, python_model, tensor

X = np.array([[1.0, -2.0, 3.5, 0.25]], dtype=np.float32)

# double, then add_one, each called and waited for in turn.
SYNC_SOURCE = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        x = pb_utils.get_input_tensor_by_name(requests[0], "X").as_numpy()
        doubled = pb_utils.InferenceRequest(
            model_name="double", requested_output_names=["Y"], inputs=[pb_utils.Tensor("X", x)]
        ).exec()
        y = pb_utils.get_output_tensor_by_name(doubled, "Y")
        plus_one = pb_utils.InferenceRequest(
            model_name="add_one", model_version=1, requested_output_names=["Z"], inputs=[y]
        ).exec()
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_output_tensor_by_name(plus_one, "Z").as_numpy())])]
"""

# Both calls in flight at once: OUT = double(X) + add_one(X).
ASYNC_SOURCE = """
import asyncio

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        x = pb_utils.get_input_tensor_by_name(requests[0], "X").as_numpy()
        doubled, plus_one = await asyncio.gather(
            pb_utils.InferenceRequest(model_name="double", requested_output_names=["Y"], inputs=[pb_utils.Tensor("X", x)]).async_exec(),
            pb_utils.InferenceRequest(model_name="add_one", requested_output_names=["Z"], inputs=[pb_utils.Tensor("Y", x)]).async_exec(),
        )
        out = doubled.output_tensors()[0].as_numpy() + plus_one.output_tensors()[0].as_numpy()
        return [{"OUT": out}]
"""

# Calls a model with a tensor it refuses; MODE 0 reports the error's message as its output, MODE 1 lets it raise.
ERROR_SOURCE = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        mode = int(requests[0].get_input("MODE")[0, 0])
        wrong = pb_utils.Tensor("X", np.zeros((1, 3), dtype=np.float32))
        request = pb_utils.InferenceRequest(model_name="double", requested_output_names=["Y"], inputs=[wrong])
        if mode == 1:
            request.exec()
        try:
            request.exec()
        except pb_utils.TritonModelException as exc:
            return [{"MESSAGE": np.array([[exc.message().encode()]], dtype=object)}]
        return [{"MESSAGE": np.array([[b"no error"]], dtype=object)}]
"""

# Control flow a DAG cannot express: double until the total passes LIMIT (a data-dependent number of calls), then
# add one only when the result is odd.
LOOP_SOURCE = """
import numpy as np
import triton_python_backend_utils as pb_utils


def call(model, name, array, output):
    response = pb_utils.InferenceRequest(
        model_name=model, requested_output_names=[output], inputs=[pb_utils.Tensor(name, array)]
    ).exec()
    return pb_utils.get_output_tensor_by_name(response, output).as_numpy()


class TritonPythonModel:
    def execute(self, requests):
        x = requests[0].get_input("X")
        limit = float(requests[0].get_input("LIMIT")[0, 0])
        calls = 0
        while x.sum() <= limit:
            x = call("double", "X", x, "Y")
            calls += 1
        if int(x.sum()) % 2 == 1:
            x = call("add_one", "Y", x, "Z")
        return [{"OUT": x, "CALLS": np.array([[calls]], dtype=np.int32)}]
"""

# Recursion: COUNT = N, computed as 1 + countdown(N - 1), each level a call of the model to itself.
COUNTDOWN_SOURCE = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        n = int(requests[0].get_input("N")[0])
        if n == 0:
            return [{"COUNT": np.array([0], dtype=np.int32)}]
        inner = pb_utils.InferenceRequest(
            model_name="countdown", requested_output_names=["COUNT"],
            inputs=[pb_utils.Tensor("N", np.array([n - 1], dtype=np.int32))],
        ).exec()
        return [{"COUNT": inner.output_tensors()[0].as_numpy() + 1}]
"""


@pytest.fixture(scope="module")
def bls_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repository = tmp_path_factory.mktemp("model_calls")
    add_double(repository, sleep_s=0.2, queue_delay_us=50_000)
    add_add_one(repository)
    python_model(repository, "bls_sync", SYNC_SOURCE, [tensor("X")], [tensor("OUT")], instance_group=[{"count": 4}])
    python_model(repository, "bls_async", ASYNC_SOURCE, [tensor("X")], [tensor("OUT")])
    python_model(
        repository,
        "bls_error",
        ERROR_SOURCE,
        [tensor("MODE", "TYPE_INT32", [1])],
        [tensor("MESSAGE", "TYPE_STRING", [1])],
    )
    python_model(
        repository,
        "bls_loop",
        LOOP_SOURCE,
        [tensor("X"), tensor("LIMIT", dims=[1])],
        [tensor("OUT"), tensor("CALLS", "TYPE_INT32", [1])],
    )
    python_model(
        repository,
        "countdown",
        COUNTDOWN_SOURCE,
        [tensor("N", "TYPE_INT32", [1])],
        [tensor("COUNT", "TYPE_INT32", [1])],
        max_batch_size=0,
        instance_group=[{"count": 3}],
    )
    return start_server(repository)


def http_client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def http_infer(server: ServerProcess, model: str, **arrays: np.ndarray) -> httpclient.InferResult:
    inputs = []
    for name, array in arrays.items():
        datatype = "INT32" if array.dtype == np.int32 else "FP32"
        item = httpclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return http_client(server).infer(model, inputs)


def grpc_infer(server: ServerProcess, model: str, **arrays: np.ndarray) -> grpcclient.InferResult:
    inputs = []
    for name, array in arrays.items():
        datatype = "INT32" if array.dtype == np.int32 else "FP32"
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return grpcclient.InferenceServerClient(server.grpc_url).infer(model, inputs)


def statistics(server: ServerProcess, model: str) -> dict[str, Any]:
    return http_client(server).get_inference_statistics(model)["model_stats"][0]


def test_sync_calls_go_through_the_called_models(bls_server: ServerProcess) -> None:
    before = statistics(bls_server, "add_one")["inference_count"]
    np.testing.assert_allclose(http_infer(bls_server, "bls_sync", X=X).as_numpy("OUT"), X * 2 + 1)
    np.testing.assert_allclose(grpc_infer(bls_server, "bls_sync", X=X).as_numpy("OUT"), X * 2 + 1)
    assert statistics(bls_server, "add_one")["inference_count"] - before == 2


def test_concurrent_callers_batch_in_the_called_model(bls_server: ServerProcess) -> None:
    before = statistics(bls_server, "double")
    rows = [X + i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: http_infer(bls_server, "bls_sync", X=x).as_numpy("OUT"), rows))
    for x, out in zip(rows, results, strict=True):
        np.testing.assert_allclose(out, x * 2 + 1)
    after = statistics(bls_server, "double")
    inferences = after["inference_count"] - before["inference_count"]
    assert inferences == 8
    # Four caller instances wait on the slow double at once, so its batcher merges their calls.
    assert after["execution_count"] - before["execution_count"] < inferences


def test_async_calls_run_concurrently(bls_server: ServerProcess) -> None:
    expected = X * 2 + (X + 1)
    np.testing.assert_allclose(http_infer(bls_server, "bls_async", X=X).as_numpy("OUT"), expected)
    np.testing.assert_allclose(grpc_infer(bls_server, "bls_async", X=X).as_numpy("OUT"), expected)


def test_the_called_models_error_reaches_the_caller_as_an_exception(bls_server: ServerProcess) -> None:
    caught = http_infer(bls_server, "bls_error", MODE=np.array([[0]], dtype=np.int32)).as_numpy("MESSAGE")
    message = caught[0, 0].decode()
    assert "input 'X': shape [1, 3] does not match the model's [-1, 4]" in message
    with pytest.raises(InferenceServerException) as raised:
        grpc_infer(bls_server, "bls_error", MODE=np.array([[1]], dtype=np.int32))
    assert "TritonModelException" in raised.value.message()
    assert "input 'X': shape [1, 3] does not match the model's [-1, 4]" in raised.value.message()


@pytest.mark.parametrize(
    ("start", "limit", "calls", "result"),
    [
        # 1+2+3+4 = 10 -> 20 -> 40 -> 80 (> 50 after 3 calls); 80 is even: no add_one.
        ([1.0, 2.0, 3.0, 4.0], 50.0, 3, [8.0, 16.0, 24.0, 32.0]),
        # A limit already passed makes no call, and 1+2+3+5 = 11 is odd, so add_one runs.
        ([1.0, 2.0, 3.0, 5.0], 10.0, 0, [2.0, 3.0, 4.0, 6.0]),
    ],
)
def test_loops_and_branches_a_dag_cannot_express(
    bls_server: ServerProcess, start: list[float], limit: float, calls: int, result: list[float]
) -> None:
    response = http_infer(
        bls_server, "bls_loop", X=np.array([start], dtype=np.float32), LIMIT=np.array([[limit]], dtype=np.float32)
    )
    assert int(response.as_numpy("CALLS")[0, 0]) == calls
    np.testing.assert_allclose(response.as_numpy("OUT"), [result])


def test_a_model_calling_itself_fails_fast_instead_of_waiting_forever(bls_server: ServerProcess) -> None:
    # Three instances: the outer call and two nested ones each hold one.
    result = http_infer(bls_server, "countdown", N=np.array([2], dtype=np.int32))
    assert int(result.as_numpy("COUNT")[0]) == 2
    with pytest.raises(InferenceServerException) as raised:
        http_infer(bls_server, "countdown", N=np.array([5], dtype=np.int32))
    assert "calls itself while each of its 3 instance(s) is busy waiting on such a call" in raised.value.message()
    # Nothing was left stuck: the model still answers.
    assert int(grpc_infer(bls_server, "countdown", N=np.array([1], dtype=np.int32)).as_numpy("COUNT")[0]) == 1


def test_a_call_outside_a_served_model_says_why_it_cannot_run() -> None:
    from backends.python import pb_utils

    request = pb_utils.InferenceRequest(model_name="double", inputs=[pb_utils.Tensor("X", X)], request_id="r1")
    with pytest.raises(pb_utils.TritonError, match="only from execute"):
        request.exec()
    with pytest.raises(pb_utils.TritonError, match="correlation_id"):
        pb_utils.InferenceRequest(model_name="double", correlation_id=7)


# Calls another model from initialize(): refused (the model is still loading), and the load goes on.
INIT_CALL_SOURCE = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        try:
            pb_utils.InferenceRequest(
                model_name="double", requested_output_names=["Y"],
                inputs=[pb_utils.Tensor("X", np.zeros((1, 4), dtype=np.float32))],
            ).exec()
        except pb_utils.TritonModelException as exc:
            self.message = exc.message()
        else:
            self.message = "no error"

    def execute(self, requests):
        return [{"MESSAGE": np.array([self.message.encode()], dtype=object)}]
"""


def test_calls_while_loading_are_refused_with_a_reason(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    add_double(tmp_path)
    python_model(
        tmp_path,
        "calls_in_initialize",
        INIT_CALL_SOURCE,
        [tensor("X")],
        [tensor("MESSAGE", "TYPE_STRING", [1])],
        max_batch_size=0,
    )
    server = start_server(tmp_path)
    message = http_infer(server, "calls_in_initialize", X=X[0]).as_numpy("MESSAGE")[0].decode()
    assert "cannot call other models while it loads" in message
