"""The gRPC front end end to end: the real server on free ports, the real ``tritonclient.grpc`` (sync and asyncio).

Besides the bundled ``simple`` model, the repository holds an Identity model per datatype (built here with
``onnx.helper``) and a model whose file is garbage, so every datatype, the 64 MiB message path and the
"model not ready" error are exercised against real inference.
"""

from __future__ import annotations

import json
import queue
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

if TYPE_CHECKING:
    from tests.conftest import ServerProcess

# Wire datatype -> ONNX element type of the Identity model serving it.
IDENTITY_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
RNG = np.random.default_rng(3)
LARGE_ELEMENTS = 16 * 1024 * 1024  # 64 MiB of FP32


def identity_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def sample(datatype: str, shape: tuple[int, ...] = (2, 5)) -> np.ndarray:
    if datatype == "BYTES":
        # UTF-8 only: ONNX Runtime string tensors hold text (non-UTF-8 bytes are covered by the codec tests).
        items = [b"", b"plain", "ünïcode".encode(), b"with\x00nul", b"x" * 1000]
        return np.array([items[i % len(items)] for i in range(int(np.prod(shape)))], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, shape).astype(bool)
    dtype = triton_grpc.triton_to_np_dtype(datatype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        values.flat[0], values.flat[-1] = info.min, info.max
        return values
    return RNG.standard_normal(shape).astype(dtype)


def _write_identity(root: Path, datatype: str) -> None:
    onnx_type = IDENTITY_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        identity_name(datatype),
        [helper.make_tensor_value_info("INPUT0", onnx_type, ["rows", "cols"])],
        [helper.make_tensor_value_info("OUTPUT0", onnx_type, ["rows", "cols"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    folder = root / identity_name(datatype)
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "config.yaml").write_text("backend: onnxruntime\n")


def _write_slow_counter(root: Path) -> None:
    """Y = X + trips, counted one step per Loop iteration: a model whose run time the client chooses (~1 us a trip)."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "always", "X"], ["Y"], body=body)],
        "slow_counter",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array(True), "always")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    (root / "slow_counter" / "1").mkdir(parents=True)
    (root / "slow_counter" / "1" / "model.onnx").write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def grpc_repository(tmp_path_factory: pytest.TempPathFactory, bundled_repository: Path) -> Path:
    root = tmp_path_factory.mktemp("grpc") / "models"
    shutil.copytree(bundled_repository / "simple", root / "simple")
    for datatype in IDENTITY_TYPES:
        _write_identity(root, datatype)
    _write_slow_counter(root)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    (root / "broken" / "config.yaml").write_text(
        "backend: onnxruntime\ninput: [{name: X, data_type: TYPE_FP32, dims: [1]}]\n"
        "output: [{name: Y, data_type: TYPE_FP32, dims: [1]}]\n"
    )
    return root


@pytest.fixture(scope="module")
def grpc_server(start_server: Callable[..., ServerProcess], grpc_repository: Path) -> ServerProcess:
    # Explicit control mode, so the repository tests may load and unload (poll mode refuses, as Triton does).
    return start_server(grpc_repository, "--model-control-mode", "explicit", "--load-model", "*")


@pytest.fixture
def client(grpc_server: ServerProcess):
    with triton_grpc.InferenceServerClient(url=grpc_server.grpc_url) as client:
        yield client


@pytest.fixture
def stub(grpc_server: ServerProcess):
    """tritonclient's generated stub on a raw channel, for requests tritonclient's helpers cannot build."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(grpc_server.grpc_url, options=options) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list[triton_grpc.InferInput]:
    inputs = [triton_grpc.InferInput(name, list(x.shape), "FP32") for name, x in (("INPUT0", a), ("INPUT1", b))]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def identity_input(array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    infer_input = triton_grpc.InferInput("INPUT0", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    code = info.value.status()
    return getattr(grpc.StatusCode, code.removeprefix("StatusCode.")), info.value.message()


# -- health, metadata, config --------------------------------------------------------------------------------------
def test_health_and_server_metadata(client: triton_grpc.InferenceServerClient, grpc_server: ServerProcess) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("broken")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata == httpx.get(f"{grpc_server.url}/v2").json()


@pytest.mark.parametrize("model", ["simple", "identity_bytes", "identity_fp16"])
def test_model_metadata_matches_http(
    client: triton_grpc.InferenceServerClient, grpc_server: ServerProcess, model: str
) -> None:
    ours = client.get_model_metadata(model, as_json=True)
    for tensor in ours["inputs"] + ours["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # protobuf JSON writes int64 as strings
    assert ours == httpx.get(f"{grpc_server.url}/v2/models/{model}").json()


def test_model_config(client: triton_grpc.InferenceServerClient, grpc_server: ServerProcess) -> None:
    config = client.get_model_config("simple").config
    http = httpx.get(f"{grpc_server.url}/v2/models/simple/config").json()
    assert config.name == "simple" and config.backend == "onnxruntime"
    assert config.max_batch_size == http["max_batch_size"]
    assert [(t.name, list(t.dims)) for t in config.input] == [(t["name"], t["dims"]) for t in http["input"]]
    assert [t.data_type for t in config.output] == [triton_grpc.model_config_pb2.TYPE_FP32] * 2
    assert config.instance_group[0].kind == triton_grpc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    strings = client.get_model_config("identity_bytes", as_json=True)["config"]
    assert strings["input"][0]["data_type"] == "TYPE_STRING" and strings["input"][0]["dims"] == ["-1", "-1"]


# -- inference --------------------------------------------------------------------------------------------------------
def test_infer_raw_contents(client: triton_grpc.InferenceServerClient) -> None:
    a, b = RNG.standard_normal((3, 16)).astype(np.float32), RNG.standard_normal((3, 16)).astype(np.float32)
    result = client.infer("simple", simple_inputs(a, b), request_id="raw-1")
    assert result.get_response().id == "raw-1"
    assert result.get_response().model_name == "simple" and result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)

    only = client.infer("simple", simple_inputs(a, b), outputs=[triton_grpc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in only.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(only.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_infer(client: triton_grpc.InferenceServerClient, algorithm: str) -> None:
    a, b = RNG.standard_normal((2, 16)).astype(np.float32), RNG.standard_normal((2, 16)).astype(np.float32)
    result = client.infer("simple", simple_inputs(a, b), compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


@pytest.mark.parametrize("datatype", list(IDENTITY_TYPES))
def test_every_datatype_round_trips_raw(client: triton_grpc.InferenceServerClient, datatype: str) -> None:
    data = sample(datatype)
    result = client.infer(identity_name(datatype), [identity_input(data, datatype)])
    assert result.get_output("OUTPUT0").datatype == datatype
    out = result.as_numpy("OUTPUT0")
    assert out.shape == data.shape and out.dtype == data.dtype
    assert out.tolist() == data.tolist()


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELD))
def test_every_typed_datatype_round_trips(stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str) -> None:
    data = sample(datatype)
    request = service_pb2.ModelInferRequest(model_name=identity_name(datatype), id=f"typed-{datatype}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=list(data.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    assert response.id == f"typed-{datatype}" and len(response.raw_output_contents) == 1
    out = triton_grpc.InferResult(response).as_numpy("OUTPUT0")
    assert out.dtype == data.dtype and out.tolist() == data.tolist()


def test_non_utf8_bytes_into_onnx_runtime_are_invalid(client: triton_grpc.InferenceServerClient) -> None:
    data = np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_)
    code, message = status_of(lambda: client.infer("identity_bytes", [identity_input(data, "BYTES")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'INPUT0'" in message


def test_typed_fp32_on_simple(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    a, b = RNG.standard_normal((2, 16)).astype(np.float32), RNG.standard_normal((2, 16)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="simple", model_version="1")
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        request.inputs.add(name=name, datatype="FP32", shape=[2, 16]).contents.fp32_contents.extend(array.reshape(-1))
    result = triton_grpc.InferResult(stub.ModelInfer(request))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_64_mib_tensor_round_trip(client: triton_grpc.InferenceServerClient) -> None:
    data = np.arange(LARGE_ELEMENTS, dtype=np.float32).reshape(1, LARGE_ELEMENTS)
    assert data.nbytes == 64 * 1024 * 1024
    result = client.infer("identity_fp32", [identity_input(data, "FP32")], client_timeout=60)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_message_limit_is_configurable(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> None:
    limited = start_server(bundled_repository, "--grpc-max-message-bytes", str(1024 * 1024))
    with triton_grpc.InferenceServerClient(url=limited.grpc_url) as client:
        small = np.ones((8, 16), np.float32)
        result = client.infer("simple", simple_inputs(small, small))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), small * 2)
        big = np.ones((2, 100_000), np.float32)  # two 800 kB inputs: over 1 MiB together
        inputs = [triton_grpc.InferInput(f"INPUT{i}", list(big.shape), "FP32") for i in range(2)]
        for item in inputs:
            item.set_data_from_numpy(big)
        code, _ = status_of(lambda: client.infer("simple", inputs))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- streaming --------------------------------------------------------------------------------------------------------
def test_stream_many_requests_matched_by_id(client: triton_grpc.InferenceServerClient) -> None:
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(50):
            a = np.full((1, 16), i, np.float32)
            b = RNG.standard_normal((1, 16)).astype(np.float32)
            expected[f"req-{i}"] = (a + b, a - b)
            client.async_stream_infer(
                "simple", simple_inputs(a, b), request_id=f"req-{i}", enable_empty_final_response=i % 2 == 0
            )
            if i == 25:  # one bad request in the middle must not end the stream
                bad = triton_grpc.InferInput("INPUT9", [1, 16], "FP32")
                bad.set_data_from_numpy(a)
                client.async_stream_infer("simple", [bad], request_id="bad")
    finally:
        client.stop_stream()
    received = [results.get(timeout=1) for _ in range(51)]
    errors = [error for result, error in received if error is not None]
    assert len(errors) == 1 and "INPUT9" in str(errors[0])
    seen = {}
    for result, error in received:
        if error is None:
            response = result.get_response()
            seen[response.id] = result
            # Clients that ask are told which response is a request's last; here each request has one.
            asked = int(response.id.removeprefix("req-")) % 2 == 0
            assert ("triton_final_response" in response.parameters) == asked
            assert response.parameters["triton_final_response"].bool_param == asked
    assert set(seen) == set(expected)
    for request_id, (total, difference) in expected.items():
        np.testing.assert_array_equal(seen[request_id].as_numpy("OUTPUT0"), total)
        np.testing.assert_array_equal(seen[request_id].as_numpy("OUTPUT1"), difference)


def test_stream_does_not_wait_for_earlier_requests(client: triton_grpc.InferenceServerClient) -> None:
    """A slow request first, quick ones after it on the same stream: the quick ones are answered before it."""
    x, trips = np.array([0.5], np.float32), np.array(400_000, np.int64)
    slow = [triton_grpc.InferInput("X", [1], "FP32"), triton_grpc.InferInput("trips", [], "INT64")]
    slow[0].set_data_from_numpy(x)
    slow[1].set_data_from_numpy(trips)
    order: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: order.put((result, error)))
    try:
        client.async_stream_infer("slow_counter", slow, request_id="slow")
        for i in range(5):
            quick = np.full((1, 16), i, np.float32)
            client.async_stream_infer("simple", simple_inputs(quick, quick), request_id=f"quick-{i}")
    finally:
        client.stop_stream()
    received = [order.get(timeout=1) for _ in range(6)]
    assert all(error is None for _, error in received)
    ids = [result.get_response().id for result, _ in received]
    assert ids[-1] == "slow" and sorted(ids[:-1]) == [f"quick-{i}" for i in range(5)]
    np.testing.assert_array_equal(received[-1][0].as_numpy("Y"), x + trips)


def test_stream_errors_carry_the_request_id(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    def requests():
        good = service_pb2.ModelInferRequest(model_name="simple", id="good")
        for name in ("INPUT0", "INPUT1"):
            good.inputs.add(name=name, datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 16)
        lost = service_pb2.ModelInferRequest()
        lost.CopyFrom(good)
        lost.model_name, lost.id = "no_such_model", "lost"
        yield lost
        yield good
        wrong = service_pb2.ModelInferRequest(model_name="simple", id="short")
        wrong.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 3)
        yield wrong

    responses = {r.infer_response.id: r for r in stub.ModelStreamInfer(requests())}
    assert set(responses) == {"lost", "good", "short"}
    assert "no_such_model" in responses["lost"].error_message
    assert "INPUT0" in responses["short"].error_message
    assert responses["good"].error_message == ""
    np.testing.assert_array_equal(triton_grpc.InferResult(responses["good"].infer_response).as_numpy("OUTPUT0"),
                                  np.full((1, 16), 2.0, np.float32))  # fmt: skip


# -- asyncio client ---------------------------------------------------------------------------------------------------
async def test_asyncio_client_infer_and_stream(grpc_server: ServerProcess) -> None:
    async with triton_grpc_aio.InferenceServerClient(url=grpc_server.grpc_url) as client:
        assert await client.is_server_ready()
        assert (await client.get_model_metadata("simple")).name == "simple"
        a, b = RNG.standard_normal((4, 16)).astype(np.float32), RNG.standard_normal((4, 16)).astype(np.float32)
        result = await client.infer("simple", simple_inputs(a, b), request_id="aio")
        assert result.get_response().id == "aio"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)

        wanted = {f"s{i}": np.full((1, 16), i, np.float32) for i in range(20)}

        async def requests():
            for request_id, x in wanted.items():
                yield {"model_name": "simple", "inputs": simple_inputs(x, x), "request_id": request_id}

        seen = {}
        async for result, error in client.stream_infer(requests()):
            assert error is None
            seen[result.get_response().id] = result.as_numpy("OUTPUT0")
        assert set(seen) == set(wanted)
        for request_id, x in wanted.items():
            np.testing.assert_array_equal(seen[request_id], x * 2)


# -- repository ----------------------------------------------------------------------------------------------------
def test_repository_index(client: triton_grpc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(index) == {"simple", "broken", "slow_counter", *(identity_name(d) for d in IDENTITY_TYPES)}
    assert (index["simple"].version, index["simple"].state) == ("1", "READY")
    assert index["broken"].state == "UNAVAILABLE" and "broken" in index["broken"].reason
    ready = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
    assert "broken" not in ready


def test_load_with_config_override_and_unload(client: triton_grpc.InferenceServerClient) -> None:
    model = "identity_uint16"
    data = sample("UINT16")
    client.load_model("simple")  # reloading a model that is already serving keeps it serving
    assert client.is_model_ready("simple")

    override = {"backend": "onnxruntime", "parameters": {"intra_op_thread_count": "1"}}
    client.load_model(model, config=json.dumps(override))
    config = client.get_model_config(model).config
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert client.infer(model, [identity_input(data, "UINT16")]).as_numpy("OUTPUT0").tolist() == data.tolist()

    client.unload_model(model)
    assert not client.is_model_ready(model)
    code, message = status_of(lambda: client.infer(model, [identity_input(data, "UINT16")]))
    assert code == grpc.StatusCode.UNAVAILABLE and model in message
    client.load_model(model)
    assert client.is_model_ready(model)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda c: c.load_model("no_such_model"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.unload_model("no_such_model"), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.load_model("simple", config="{not json"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.load_model("simple", config='{"max_batch_size": "lots"}'), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.load_model("broken"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["load-unknown", "unload-unknown", "bad-json", "bad-config", "broken-file"],
)
def test_repository_errors(client: triton_grpc.InferenceServerClient, call, expected: grpc.StatusCode) -> None:
    code, _ = status_of(lambda: call(client))
    assert code == expected
    assert client.is_model_ready("simple")


# -- errors -----------------------------------------------------------------------------------------------------------
def test_unknown_model_and_version_are_not_found(client: triton_grpc.InferenceServerClient) -> None:
    ones = np.ones((1, 16), np.float32)
    for call in (
        lambda: client.infer("no_such_model", simple_inputs(ones, ones)),
        lambda: client.infer("simple", simple_inputs(ones, ones), model_version="7"),
        lambda: client.get_model_metadata("no_such_model"),
        lambda: client.get_model_metadata("simple", "7"),
        lambda: client.get_model_config("no_such_model"),
        lambda: client.is_model_ready("no_such_model"),
    ):
        code, message = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND
        assert "no_such_model" in message or "7" in message


def _bad_requests() -> list[tuple[str, list[triton_grpc.InferInput], list[str], str]]:
    ones = np.ones((1, 16), np.float32)
    wrong_shape = simple_inputs(ones, np.ones((1, 15), np.float32))
    wrong_type = simple_inputs(ones, ones)
    wrong_type[1] = triton_grpc.InferInput("INPUT1", [1, 16], "INT32")
    wrong_type[1].set_data_from_numpy(np.ones((1, 16), np.int32))
    too_big_batch = simple_inputs(np.ones((9, 16), np.float32), np.ones((9, 16), np.float32))
    return [
        ("bad shape", wrong_shape, [], "INPUT1"),
        ("wrong datatype", wrong_type, [], "INPUT1"),
        ("missing input", simple_inputs(ones, ones)[:1], [], "INPUT1"),
        ("unknown input", [*simple_inputs(ones, ones), identity_input(ones, "FP32")], [], "INPUT0"),
        ("batch too large", too_big_batch, [], "INPUT0"),
        ("unknown output", simple_inputs(ones, ones), ["OUTPUT7"], "OUTPUT7"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda case: case[0])
def test_bad_inputs_are_invalid_argument_naming_the_tensor(client: triton_grpc.InferenceServerClient, case) -> None:
    _, inputs, outputs, tensor = case
    requested = [triton_grpc.InferRequestedOutput(name) for name in outputs] or None
    code, message = status_of(lambda: client.infer("simple", inputs, outputs=requested))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{tensor}'" in message


def test_malformed_messages_are_invalid_argument(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    raw_short = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        raw_short.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    raw_short.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    typed_short = service_pb2.ModelInferRequest(model_name="simple")
    typed_short.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 15)
    for request, tensor in ((raw_short, "INPUT1"), (typed_short, "INPUT0")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{tensor}'" in info.value.details()


def test_model_not_ready_is_unavailable(client: triton_grpc.InferenceServerClient) -> None:
    x = triton_grpc.InferInput("X", [1], "FP32")
    x.set_data_from_numpy(np.ones(1, np.float32))
    code, message = status_of(lambda: client.infer("broken", [x]))
    assert code == grpc.StatusCode.UNAVAILABLE and "broken" in message
    code, _ = status_of(lambda: client.get_model_metadata("broken"))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_extensions_not_offered_are_unimplemented(client: triton_grpc.InferenceServerClient) -> None:
    for call in (client.get_cuda_shared_memory_status,):
        code, message = status_of(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "not supported" in message


def test_statistics(client: triton_grpc.InferenceServerClient) -> None:
    ones = np.ones((1, 16), np.float32)
    before = client.get_inference_statistics("simple").model_stats[0].inference_count
    client.infer("simple", simple_inputs(ones, ones))
    stats = client.get_inference_statistics("simple", "1").model_stats[0]
    assert stats.name == "simple" and stats.inference_count >= before + 1
    assert stats.inference_stats.success.count >= 1
