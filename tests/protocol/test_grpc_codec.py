"""The gRPC codec on its own: every datatype in typed and raw form, parameters, errors, configs and statistics.

Responses are read back with ``tritonclient.grpc``'s own ``InferResult`` (through the wire bytes), so the checks
are against what a real client sees, not against our own decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import json_format
from pydantic import BaseModel
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from server.config import ModelConfig, parse_model_config
from server.errors import InvalidInput
from server.protocol import grpc_codec
from server.protocol.generated import _pool
from server.protocol.generated import grpc_service_pb2 as pb
from server.protocol.shared_memory import SharedMemoryRegistry
from server.protocol.types import InferResponse

RNG = np.random.default_rng(7)
# Nothing registered: these tests send every tensor in the message.
NO_REGIONS = SharedMemoryRegistry()

# One sample per datatype, including the extremes of each integer range.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 5, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 7, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 9, 2**63 - 1]], dtype=np.int64),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 2, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 3, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 4, 2**64 - 1]], dtype=np.uint64),
    "FP16": RNG.standard_normal((2, 3)).astype(np.float16),
    "FP32": RNG.standard_normal((2, 3)).astype(np.float32),
    "FP64": RNG.standard_normal((2, 3)),
    "BYTES": np.array([[b"", b"hello", "héllo".encode()], [b"\x00\xff\xfe", b"x" * 300, b"z"]], dtype=np.object_),
}
TYPED = [d for d in SAMPLES if d != "FP16"]


def _request_with(datatype: str, array: np.ndarray, *, raw: bool) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", id="req-1")
    tensor = message.inputs.add(name="x", datatype=datatype, shape=list(array.shape))
    if raw:
        message.raw_input_contents.append(triton_grpc.serialize_byte_tensor(array).item()
                                          if datatype == "BYTES" else array.tobytes())  # fmt: skip
    else:
        getattr(tensor.contents, grpc_codec.CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return message


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("datatype", TYPED)
def test_typed_contents_decode_to_the_right_dtype(datatype: str) -> None:
    request = grpc_codec.decode_request(_request_with(datatype, SAMPLES[datatype], raw=False), NO_REGIONS)
    assert request.input_datatypes == {"x": datatype}
    _assert_same(request.inputs["x"], SAMPLES[datatype])


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_contents_decode_to_the_right_dtype(datatype: str) -> None:
    request = grpc_codec.decode_request(_request_with(datatype, SAMPLES[datatype], raw=True), NO_REGIONS)
    _assert_same(request.inputs["x"], SAMPLES[datatype])


def test_request_fields_and_parameters_are_kept() -> None:
    message = _request_with("FP32", SAMPLES["FP32"], raw=True)
    message.model_version = "3"
    message.parameters["priority"].int64_param = 2
    message.parameters["sequence_id"].uint64_param = 2**64 - 1
    message.parameters["sequence_start"].bool_param = True
    message.parameters["tag"].string_param = "t"
    message.parameters["scale"].double_param = 0.5
    message.parameters["unset"].CopyFrom(pb.InferParameter())
    wanted = message.outputs.add(name="y")
    wanted.parameters["binary_data"].bool_param = True
    message.outputs.add(name="z")

    request = grpc_codec.decode_request(message, NO_REGIONS)
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "req-1")
    assert request.parameters == {
        "priority": 2, "sequence_id": 2**64 - 1, "sequence_start": True, "tag": "t", "scale": 0.5,
    }  # fmt: skip
    assert request.priority == 2
    assert [(o.name, o.parameters) for o in request.outputs] == [("y", {"binary_data": True}), ("z", {})]


def test_parameters_round_trip() -> None:
    values = {"b": False, "i": -5, "big": 2**63, "f": 1.25, "s": "text"}
    message = pb.ModelInferResponse()
    grpc_codec.fill_parameters(message.parameters, values)
    assert message.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert message.parameters["i"].WhichOneof("parameter_choice") == "int64_param"
    assert grpc_codec.parameters_to_dict(message.parameters) == values


def _triton_result(message: pb.ModelInferResponse) -> triton_grpc.InferResult:
    return triton_grpc.InferResult(triton_service_pb2.ModelInferResponse.FromString(message.SerializeToString()))


def test_response_outputs_are_raw_and_readable_by_tritonclient() -> None:
    outputs = {f"out_{d.lower()}": array for d, array in SAMPLES.items()}
    outputs["text"] = np.array(["a", "bé"], dtype=np.object_)  # backends may return str elements
    response = InferResponse(model_name="m", model_version="2", outputs=outputs, parameters={"n": 1})
    request = grpc_codec.decode_request(_request_with("FP32", SAMPLES["FP32"], raw=True), NO_REGIONS)
    message = grpc_codec.encode_response(response, request)

    assert (message.model_name, message.model_version, message.id) == ("m", "2", "req-1")
    assert len(message.raw_output_contents) == len(message.outputs) == len(outputs)
    assert not any(o.contents.ListFields() for o in message.outputs)
    assert grpc_codec.parameters_to_dict(message.parameters) == {"n": 1}
    result = _triton_result(message)
    for datatype, array in SAMPLES.items():
        name = f"out_{datatype.lower()}"
        assert result.get_output(name).datatype == datatype
        _assert_same(result.as_numpy(name), array)
    assert result.as_numpy("text").tolist() == [b"a", "bé".encode()]


def test_tritonclients_own_request_decodes() -> None:
    """A request built by tritonclient itself (raw by default), carried over as bytes."""
    a = SAMPLES["FP32"]
    text = SAMPLES["BYTES"]
    inputs = [triton_grpc.InferInput("a", list(a.shape), "FP32"), triton_grpc.InferInput("t", [2, 3], "BYTES")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(text)
    theirs = triton_grpc._utils._get_inference_request(
        model_name="m", inputs=inputs, model_version="", request_id="r9",
        outputs=[triton_grpc.InferRequestedOutput("o")], sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=None, parameters=None,
    )  # fmt: skip
    request = grpc_codec.decode_request(pb.ModelInferRequest.FromString(theirs.SerializeToString()), NO_REGIONS)
    assert request.id == "r9" and [o.name for o in request.outputs] == ["o"]
    _assert_same(request.inputs["a"], a)
    _assert_same(request.inputs["t"], text)


# -- errors name the tensor --------------------------------------------------------------------------------------
def _two_raw_inputs() -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="first", datatype="FP32", shape=[2])
    message.inputs.add(name="second", datatype="FP32", shape=[2])
    return message


def _error(message: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        grpc_codec.decode_request(message, NO_REGIONS)
    return info.value.message


def test_too_few_raw_entries_names_the_input_without_one() -> None:
    message = _two_raw_inputs()
    message.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    assert "'second'" in _error(message) and "raw_input_contents" in _error(message)


def test_too_many_raw_entries() -> None:
    message = _two_raw_inputs()
    message.raw_input_contents.extend([b"\0" * 8] * 3)
    assert "3 entries" in _error(message)


def test_raw_size_mismatch_names_the_input() -> None:
    message = _two_raw_inputs()
    message.raw_input_contents.extend([b"\0" * 8, b"\0" * 12])
    assert "'second'" in _error(message) and "needs 8 bytes" in _error(message)


def test_typed_count_mismatch_names_the_input() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3])
    assert "'x'" in _error(message) and "4 elements, got 3" in _error(message)


def test_typed_contents_in_the_wrong_list() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int64_contents.append(1)
    assert "'x'" in _error(message) and "fp32_contents" in _error(message)


def test_fp16_cannot_be_typed() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    assert "'h'" in _error(message) and "raw_input_contents" in _error(message)


def test_typed_value_out_of_range() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="small", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    assert "'small'" in _error(message)


def test_mixing_raw_and_typed_is_refused() -> None:
    message = _two_raw_inputs()
    message.inputs[1].contents.fp32_contents.extend([1.0, 2.0])
    message.raw_input_contents.extend([b"\0" * 8, b""])
    assert "'second'" in _error(message) and "every input must be raw" in _error(message)


def test_input_without_data() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[3])
    assert "'x' has no data" in _error(message)
    empty = pb.ModelInferRequest(model_name="m")
    empty.inputs.add(name="x", datatype="FP32", shape=[0, 3])
    assert grpc_codec.decode_request(empty, NO_REGIONS).inputs["x"].shape == (0, 3)


def _in_region_r(message: pb.ModelInferRequest) -> None:
    message.inputs[0].parameters["shared_memory_region"].string_param = "r"
    message.inputs[0].parameters["shared_memory_byte_size"].int64_param = 4


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m.inputs.add(name="x", datatype="FP32", shape=[1]), "'x' appears more than once"),
        (lambda m: setattr(m.inputs[0], "datatype", "FLOAT"), "unknown datatype 'FLOAT'"),
        (lambda m: m.inputs[0].shape.__setitem__(0, -1), "negative dimension"),
        (lambda m: m.inputs[0].parameters["shared_memory_region"].__setattr__("string_param", "r"), "byte_size"),
        (_in_region_r, "input 'x': shared memory region 'r' is not registered"),
        (lambda m: (m.outputs.add(name="y"), m.outputs.add(name="y")), "'y' is requested more than once"),
    ],
    ids=["duplicate", "datatype", "shape", "shared-memory-size", "unregistered-region", "duplicate-output"],
)
def test_malformed_requests(mutate, expected: str) -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    mutate(message)
    assert expected in _error(message)


def test_no_inputs() -> None:
    assert "at least one input" in _error(pb.ModelInferRequest(model_name="m"))


def test_stream_responses_flag_the_final_one_when_asked() -> None:
    message = _request_with("FP32", SAMPLES["FP32"], raw=True)
    plain = grpc_codec.decode_request(message, NO_REGIONS)
    response = InferResponse(model_name="m", model_version="1", outputs={"y": SAMPLES["FP32"]}, final=False)
    assert "triton_final_response" not in grpc_codec.stream_response(response, plain).infer_response.parameters
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    asking = grpc_codec.decode_request(message, NO_REGIONS)
    for final in (False, True):
        response.final = final
        sent = grpc_codec.stream_response(response, asking).infer_response
        assert sent.id == "req-1" and sent.parameters["triton_final_response"].bool_param is final


def test_stream_error_carries_the_request_id() -> None:
    message = pb.ModelInferRequest(model_name="m", model_version="1", id="abc")
    error = grpc_codec.stream_error(message, "boom")
    assert error.error_message == "boom"
    assert (error.infer_response.id, error.infer_response.model_name, error.infer_response.model_version) == (
        "abc", "m", "1",
    )  # fmt: skip


# -- model config ----------------------------------------------------------------------------------------------
FULL_CONFIG = {
    "platform": "onnxruntime_onnx",
    "max_batch_size": 8,
    "input": [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3], "reshape": {"shape": [3, -1]}, "optional": True,
         "allow_ragged_batch": True},
        {"name": "t", "data_type": "TYPE_STRING", "dims": [1], "label_filename": "ignored-on-inputs.txt"},
    ],
    "output": [{"name": "y", "data_type": "TYPE_INT64", "dims": [2], "label_filename": "labels.txt"}],
    "instance_group": [{"name": "g", "count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}, {"kind": "KIND_CPU"}],
    "dynamic_batching": {
        "preferred_batch_size": [2, 4], "max_queue_delay_microseconds": 100, "preserve_ordering": True,
        "priority_levels": 2, "default_priority_level": 1,
        "default_queue_policy": {"timeout_action": "DELAY", "default_timeout_microseconds": 5,
                                 "allow_timeout_override": True, "max_queue_size": 3},
        "priority_queue_policy": {2: {"max_queue_size": 1}},
    },
    "version_policy": {"specific": {"versions": [1, 3]}},
    "parameters": {"threads": "4"},
    "default_model_filename": "m.onnx",
    "model_warmup": [
        {"name": "w", "batch_size": 2, "count": 3, "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [3],
                                                                    "random_data": True}}},
    ],
}  # fmt: skip


def test_model_config_reaches_tritonclient_intact() -> None:
    config = parse_model_config(FULL_CONFIG, "test", "full")
    ours = grpc_codec.model_config_response(config.to_json())
    theirs = triton_service_pb2.ModelConfigResponse.FromString(ours.SerializeToString()).config
    assert theirs.name == "full" and theirs.backend == "onnxruntime" and theirs.max_batch_size == 8
    assert theirs.input[0].data_type == triton_model_config_pb2.TYPE_FP32
    assert list(theirs.input[0].dims) == [-1, 3] and list(theirs.input[0].reshape.shape) == [3, -1]
    assert theirs.input[0].optional and theirs.input[0].allow_ragged_batch
    assert theirs.input[1].data_type == triton_model_config_pb2.TYPE_STRING
    assert theirs.output[0].label_filename == "labels.txt"
    assert theirs.instance_group[0].kind == triton_model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(theirs.instance_group[0].gpus) == [0, 1] and theirs.instance_group[1].count == 1
    batching = theirs.dynamic_batching
    assert list(batching.preferred_batch_size) == [2, 4] and batching.priority_levels == 2
    assert batching.default_queue_policy.timeout_action == triton_model_config_pb2.ModelQueuePolicy.DELAY
    assert batching.priority_queue_policy[2].max_queue_size == 1
    assert list(theirs.version_policy.specific.versions) == [1, 3]
    assert theirs.parameters["threads"].string_value == "4"
    assert theirs.model_warmup[0].inputs["x"].random_data and theirs.model_warmup[0].count == 3
    # The JSON tritonclient would show equals the config's own JSON, field for field where both have one.
    shown = json_format.MessageToDict(theirs, preserving_proto_field_name=True)
    assert shown["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 3


def _fields_missing_from_proto(model: type[BaseModel], descriptor, path: str, skip: frozenset[str]) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        proto_field = descriptor.fields_by_name.get(name)
        if proto_field is None:
            missing.append(f"{path}.{name}")
            continue
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            for inner in getattr(candidate, "__args__", (candidate,)):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and proto_field.message_type:
                    target = proto_field.message_type
                    if target.GetOptions().map_entry:
                        target = target.fields_by_name["value"].message_type
                    foreign = {"input": grpc_codec.OUTPUT_ONLY_FIELDS, "output": grpc_codec.INPUT_ONLY_FIELDS}
                    skip_inner = foreign.get(name, frozenset())
                    missing += _fields_missing_from_proto(inner, target, f"{path}.{name}", skip_inner)
    return missing


def test_every_config_field_exists_in_tritons_model_config() -> None:
    """A field added to ``server/config.py`` that Triton's schema lacks would break the ModelConfig RPC."""
    descriptor = _pool.POOL.FindMessageTypeByName("inference.ModelConfig")
    assert _fields_missing_from_proto(ModelConfig, descriptor, "ModelConfig", frozenset()) == []


# -- statistics, repository ------------------------------------------------------------------------------------
def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


SAMPLE_STATISTICS = {
    "model_stats": [
        {
            "name": "simple",
            "version": "1",
            "last_inference": 1764049200123,
            "inference_count": 12,
            "execution_count": 5,
            "inference_stats": {
                "success": _duration(11, 9_000_000),
                "fail": _duration(1, 1000),
                "queue": _duration(11, 2_000_000),
                "compute_input": _duration(5, 300),
                "compute_infer": _duration(5, 6_000_000),
                "compute_output": _duration(5, 400),
                "cache_hit": _duration(0, 0),
                "cache_miss": _duration(0, 0),
            },
            "batch_stats": [
                {"batch_size": 1, "compute_input": _duration(2, 10), "compute_infer": _duration(2, 20),
                 "compute_output": _duration(2, 30)},
                {"batch_size": 4, "compute_input": _duration(3, 2**40), "compute_infer": _duration(3, 50),
                 "compute_output": _duration(3, 60)},
            ],
        },
        {"name": "idle", "version": "2", "last_inference": 0, "inference_count": 0, "execution_count": 0,
         "inference_stats": {}, "batch_stats": []},
    ]
}  # fmt: skip


def test_statistics_converter() -> None:
    ours = grpc_codec.model_statistics_response(SAMPLE_STATISTICS)
    theirs = triton_service_pb2.ModelStatisticsResponse.FromString(ours.SerializeToString())
    simple, idle = theirs.model_stats
    assert (simple.name, simple.version, simple.last_inference) == ("simple", "1", 1764049200123)
    assert (simple.inference_count, simple.execution_count) == (12, 5)
    assert (simple.inference_stats.success.count, simple.inference_stats.success.ns) == (11, 9_000_000)
    assert simple.inference_stats.fail.count == 1 and simple.inference_stats.queue.ns == 2_000_000
    assert [b.batch_size for b in simple.batch_stats] == [1, 4]
    assert simple.batch_stats[1].compute_input.ns == 2**40
    assert (idle.name, idle.inference_count, len(idle.batch_stats)) == ("idle", 0, 0)
    # What tritonclient's as_json shows is the dict we started from (64-bit numbers as strings, zeros omitted).
    shown = json_format.MessageToDict(theirs, preserving_proto_field_name=True)
    assert shown["model_stats"][0]["inference_stats"]["compute_infer"] == {"count": "5", "ns": "6000000"}


def test_statistics_converter_rejects_unknown_fields() -> None:
    with pytest.raises(json_format.ParseError):
        grpc_codec.model_statistics_response({"model_stats": [{"name": "m", "bogus": 1}]})


def test_repository_index_and_load_parameters() -> None:
    rows = [{"name": "a", "version": "1", "state": "READY", "reason": ""},
            {"name": "b", "version": "", "state": "UNAVAILABLE", "reason": "broken"}]  # fmt: skip
    index = grpc_codec.repository_index_response(rows)
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [tuple(r.values()) for r in rows]

    request = pb.RepositoryModelLoadRequest(model_name="a")
    assert grpc_codec.decode_load_request(request.parameters) == (None, {})
    request.parameters["config"].string_param = '{"max_batch_size": 4}'
    request.parameters["file:1/model.onnx"].bytes_param = b"\0onnx"
    assert grpc_codec.decode_load_request(request.parameters) == (
        {"max_batch_size": 4},
        {"file:1/model.onnx": b"\0onnx"},
    )
    request.parameters["config"].string_param = "{not json"
    with pytest.raises(InvalidInput, match="not valid JSON"):
        grpc_codec.decode_load_request(request.parameters)
    request.parameters["config"].string_param = "[1]"
    with pytest.raises(InvalidInput, match="JSON object"):
        grpc_codec.decode_load_request(request.parameters)
    files = pb.RepositoryModelLoadRequest(model_name="a")
    files.parameters["file:1/model.onnx"].string_param = "text"
    with pytest.raises(InvalidInput, match="file:1/model.onnx"):
        grpc_codec.decode_load_request(files.parameters)
