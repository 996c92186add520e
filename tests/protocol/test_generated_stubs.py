"""The generated gRPC stubs: up to date with protos/, and wire compatible with ``tritonclient.grpc``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.internal import api_implementation
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from server.protocol.generated import _pool, model_config_pb2
from server.protocol.generated import grpc_service_pb2 as service_pb2
from server.protocol.generated import grpc_service_pb2_grpc as service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED_DIR = REPO_ROOT / "server" / "protocol" / "generated"
GENERATE_SCRIPT = REPO_ROOT / "protos" / "generate.py"
HAND_WRITTEN = {"__init__.py"}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# --- the committed stubs are what protos/generate.py produces ---------------------------------------------------------


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATE_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    regenerated = {p.name for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name for p in GENERATED_DIR.iterdir() if p.is_file()} - HAND_WRITTEN
    assert regenerated >= {
        "grpc_service_pb2.py",
        "grpc_service_pb2.pyi",
        "grpc_service_pb2_grpc.py",
        "model_config_pb2.py",
        "model_config_pb2.pyi",
    }
    assert committed == regenerated, "stubs in server/protocol/generated/ differ from protos/: run protos/generate.py"
    stale = [n for n in sorted(regenerated) if (tmp_path / n).read_bytes() != (GENERATED_DIR / n).read_bytes()]
    assert not stale, (
        f"{stale} out of date: run `python protos/generate.py` (stubs are produced by the grpcio-tools version named "
        "in their first lines; a different grpcio-tools also changes them)"
    )


def test_generated_imports_are_package_relative() -> None:
    for path in GENERATED_DIR.glob("*_pb2*.py*"):
        text = path.read_text(encoding="utf-8")
        for module in ("model_config_pb2", "grpc_service_pb2"):
            assert f"\nimport {module} as" not in text, path.name
    assert service_pb2.ModelInferRequest.__module__ == "server.protocol.generated.grpc_service_pb2"
    assert service_pb2_grpc.grpc__service__pb2 is service_pb2
    assert service_pb2.model__config__pb2 is model_config_pb2


# --- living next to tritonclient in one process ------------------------------------------------------------------------


def test_imports_side_by_side_with_tritonclient_in_this_process() -> None:
    # Both are imported at module level above; they must be distinct registrations with the same full names.
    assert service_pb2.DESCRIPTOR.pool is _pool.POOL
    assert model_config_pb2.DESCRIPTOR.pool is _pool.POOL
    if api_implementation.Type() != "python":
        # (The slow pure-Python protobuf lets the default pool adopt whichever identical-named file came first.)
        assert triton_service_pb2.DESCRIPTOR.pool is not _pool.POOL
        assert service_pb2.ModelInferRequest is not triton_service_pb2.ModelInferRequest
    assert service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert triton_service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert service_pb2.DESCRIPTOR.name == triton_service_pb2.DESCRIPTOR.name == "grpc_service.proto"
    assert _pool.POOL.FindMessageTypeByName("inference.ModelConfig") is model_config_pb2.ModelConfig.DESCRIPTOR


@pytest.mark.parametrize("ours_first", [True, False], ids=["modeldock-first", "tritonclient-first"])
def test_imports_side_by_side_with_tritonclient_in_a_fresh_process(ours_first: bool) -> None:
    ours = "from server.protocol.generated import grpc_service_pb2 as ours, grpc_service_pb2_grpc, model_config_pb2\n"
    theirs = "import tritonclient.grpc\nfrom tritonclient.grpc import service_pb2 as theirs, model_config_pb2 as tmc\n"
    check = textwrap.dedent(
        """
        assert ours.DESCRIPTOR.pool is not theirs.DESCRIPTOR.pool or api_implementation.Type() == "python"
        request = theirs.ModelInferRequest(model_name="m", raw_input_contents=[b"\\x01\\x02"])
        assert ours.ModelInferRequest.FromString(request.SerializeToString()).raw_input_contents == [b"\\x01\\x02"]
        print("ok")
        """
    )
    code = "from google.protobuf.internal import api_implementation\n"
    code += (ours + theirs if ours_first else theirs + ours) + check
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_subprocess_env(), cwd=REPO_ROOT
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# --- same schema as tritonclient's ------------------------------------------------------------------------------------


def _message_descriptors(container):
    """Every message descriptor of a file (or message), nested ones included, depth first."""
    for message in container.message_types_by_name.values() if hasattr(container, "message_types_by_name") else ():
        yield message
        yield from _nested(message)


def _nested(message):
    for nested in message.nested_types:
        yield nested
        yield from _nested(nested)


def _field_signature(descriptor) -> list[tuple]:
    proto = descriptor_pb2.DescriptorProto()
    descriptor.CopyToProto(proto)
    oneofs = [o.name for o in proto.oneof_decl]
    return [
        (
            f.number,
            f.name,
            descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            f.proto3_optional,
        )
        for f in proto.field
    ]


def _enum_signature(enum) -> list[tuple[str, int]]:
    return [(v.name, v.number) for v in enum.values]


TRITON_FILES = [triton_service_pb2.DESCRIPTOR, triton_model_config_pb2.DESCRIPTOR]
TRITON_MESSAGES = [m for f in TRITON_FILES for m in _message_descriptors(f)]


@pytest.mark.parametrize("theirs", TRITON_FILES, ids=lambda f: f.name)
def test_same_messages_enums_and_package(theirs) -> None:
    ours = _pool.POOL.FindFileByName(theirs.name)
    assert ours.package == theirs.package == "inference"
    ours_proto, theirs_proto = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    ours.CopyToProto(ours_proto)
    theirs.CopyToProto(theirs_proto)
    assert ours_proto.syntax == theirs_proto.syntax == "proto3"
    assert [d.name for d in ours.dependencies] == [d.name for d in theirs.dependencies]
    assert sorted(m.full_name for m in _message_descriptors(ours)) == sorted(
        m.full_name for m in _message_descriptors(theirs)
    )
    assert sorted(ours.enum_types_by_name) == sorted(theirs.enum_types_by_name)
    for name, enum in theirs.enum_types_by_name.items():
        assert _enum_signature(ours.enum_types_by_name[name]) == _enum_signature(enum), name


@pytest.mark.parametrize("theirs", TRITON_MESSAGES, ids=lambda m: m.full_name)
def test_message_is_wire_compatible(theirs) -> None:
    ours = _pool.POOL.FindMessageTypeByName(theirs.full_name)
    assert _field_signature(ours) == _field_signature(theirs)
    assert [o.name for o in ours.oneofs] == [o.name for o in theirs.oneofs]
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry
    assert [n.full_name for n in ours.nested_types] == [n.full_name for n in theirs.nested_types]
    assert [e.full_name for e in ours.enum_types] == [e.full_name for e in theirs.enum_types]
    for enum in theirs.enum_types:
        assert _enum_signature(ours.enum_types_by_name[enum.name]) == _enum_signature(enum), enum.full_name
    # And the whole DescriptorProto (catches anything the signature above leaves out).
    ours_proto, theirs_proto = descriptor_pb2.DescriptorProto(), descriptor_pb2.DescriptorProto()
    ours.CopyToProto(ours_proto)
    theirs.CopyToProto(theirs_proto)
    assert ours_proto == theirs_proto


def test_service_matches() -> None:
    theirs = triton_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"

    def methods(service):
        return [
            (m.name, m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        ]

    assert methods(ours) == methods(theirs)
    expected = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
    }  # fmt: skip
    assert {m.name for m in ours.methods} == expected
    stream = ours.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert not any(m.client_streaming or m.server_streaming for m in ours.methods if m.name != "ModelStreamInfer")


# --- bytes round trips -------------------------------------------------------------------------------------------------


def _triton_infer_request() -> triton_service_pb2.ModelInferRequest:
    request = triton_service_pb2.ModelInferRequest(model_name="resnet", model_version="3", id="req-42")
    request.parameters["sequence_id"].uint64_param = 2**63 + 5
    request.parameters["sequence_start"].bool_param = True
    request.parameters["priority"].int64_param = -7
    request.parameters["tag"].string_param = "héllo"
    request.parameters["scale"].double_param = 0.25

    typed = [
        ("BOOL", "bool_contents", [True, False, True]),
        ("INT32", "int_contents", [-1, 0, 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), 1, 2]),
        ("UINT32", "uint_contents", [0, 2**32 - 1, 3]),
        ("UINT64", "uint64_contents", [0, 2**64 - 1, 4]),
        ("FP32", "fp32_contents", [1.5, -2.25, 3.0]),
        ("FP64", "fp64_contents", [1e300, -1e-300, 0.1]),
        ("BYTES", "bytes_contents", [b"a", b"\x00\xff", b""]),
    ]
    for datatype, field, values in typed:
        tensor = request.inputs.add(name=f"typed_{datatype.lower()}", datatype=datatype, shape=[1, len(values)])
        getattr(tensor.contents, field).extend(values)
        tensor.parameters["binary_data"].bool_param = False

    raw = np.arange(12, dtype=np.float16).reshape(3, 4)
    tensor = request.inputs.add(name="raw_fp16", datatype="FP16", shape=list(raw.shape))
    tensor.parameters["shared_memory_region"].string_param = "region0"
    request.raw_input_contents.append(raw.tobytes())
    request.raw_input_contents.append(b"\x03\x00\x00\x00abc")

    output = request.outputs.add(name="probabilities")
    output.parameters["classification"].int64_param = 3
    request.outputs.add(name="logits")
    return request


def test_infer_request_round_trip_from_tritonclient() -> None:
    theirs = _triton_infer_request()
    wire = theirs.SerializeToString(deterministic=True)

    ours = service_pb2.ModelInferRequest.FromString(wire)
    assert ours.model_name == "resnet" and ours.model_version == "3" and ours.id == "req-42"
    assert ours.parameters["sequence_id"].uint64_param == 2**63 + 5
    assert ours.parameters["sequence_start"].bool_param is True
    assert ours.parameters["priority"].int64_param == -7
    assert ours.parameters["tag"].string_param == "héllo"
    assert ours.parameters["scale"].WhichOneof("parameter_choice") == "double_param"
    assert [t.name for t in ours.inputs] == [t.name for t in theirs.inputs]
    assert list(ours.inputs[0].contents.bool_contents) == [True, False, True]
    assert list(ours.inputs[4].contents.uint64_contents) == [0, 2**64 - 1, 4]
    assert list(ours.inputs[5].contents.fp32_contents) == [1.5, -2.25, 3.0]
    assert list(ours.inputs[7].contents.bytes_contents) == [b"a", b"\x00\xff", b""]
    assert list(ours.inputs[8].shape) == [3, 4]
    assert ours.inputs[8].parameters["shared_memory_region"].string_param == "region0"
    assert np.array_equal(
        np.frombuffer(ours.raw_input_contents[0], dtype=np.float16).reshape(3, 4),
        np.arange(12, dtype=np.float16).reshape(3, 4),
    )
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    # Nothing was dropped as unknown, and the bytes come back identical.
    assert ours.SerializeToString(deterministic=True) == wire
    assert text_format.MessageToString(ours) == text_format.MessageToString(theirs)
    assert triton_service_pb2.ModelInferRequest.FromString(ours.SerializeToString()) == theirs


def test_infer_response_and_stream_response_round_trip_to_tritonclient() -> None:
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="r")
    response.parameters["triton_final_response"].bool_param = True
    out = response.outputs.add(name="y", datatype="INT64", shape=[2])
    out.contents.int64_contents.extend([5, -6])
    response.outputs.add(name="z", datatype="UINT8", shape=[3])
    response.raw_output_contents.append(b"\x01\x02\x03")
    stream = service_pb2.ModelStreamInferResponse(error_message="", infer_response=response)

    wire = stream.SerializeToString(deterministic=True)
    theirs = triton_service_pb2.ModelStreamInferResponse.FromString(wire)
    assert theirs.infer_response.outputs[0].contents.int64_contents == [5, -6]
    assert theirs.infer_response.raw_output_contents == [b"\x01\x02\x03"]
    assert theirs.infer_response.parameters["triton_final_response"].bool_param is True
    assert theirs.SerializeToString(deterministic=True) == wire


MODEL_CONFIG_TEXT = """
name: "everything"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
runtime: "libfoo.so"
version_policy { specific { versions: [1, 3] } }
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, -1, -1] reshape { shape: [1] }
        allow_ragged_batch: true optional: true }
output { name: "y" data_type: TYPE_BF16 dims: [-1] label_filename: "labels.txt" }
batch_input { kind: BATCH_ITEM_SHAPE_FLATTEN target_name: "t" data_type: TYPE_INT32 source_input: "x" }
batch_output { target_name: "y" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "x" }
optimization {
  graph { level: 1 }
  priority: PRIORITY_MAX
  cuda { graphs: true graph_spec { batch_size: 4 input { key: "x" value { dim: [3, 8, 8] } }
         graph_lower_bound { batch_size: 1 input { key: "x" value { dim: [3, 1, 1] } } } } }
  execution_accelerators { gpu_execution_accelerator { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } } }
  input_pinned_memory { enable: true }
  gather_kernel_buffer_threshold: 1024
  eager_batching: true
}
dynamic_batching {
  preferred_batch_size: [4, 8]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5 max_queue_size: 10 }
  priority_queue_policy { key: 1 value { timeout_action: REJECT allow_timeout_override: true } }
}
instance_group { name: "g" kind: KIND_GPU count: 2 gpus: [0, 1]
                 rate_limiter { resources { name: "r" global: true count: 1 } priority: 2 }
                 secondary_devices { kind: KIND_NVDLA device_id: 1 } profile: "p" passive: true host_policy: "h" }
default_model_filename: "model.onnx"
cc_model_filenames { key: "8.0" value: "a100.plan" }
metric_tags { key: "team" value: "ml" }
parameters { key: "intra_op_threads" value { string_value: "4" } }
model_warmup { name: "w" batch_size: 1 count: 2 inputs { key: "x" value { data_type: TYPE_FP32 dims: [3] random_data: true } } }
model_operations { op_library_filename: "ops.so" }
model_transaction_policy { decoupled: true }
model_repository_agents { agents { name: "checksum" parameters { key: "k" value: "v" } } }
response_cache { enable: true }
model_metrics { metric_control { metric_identifier { family: "nv_inference_request_duration" }
                                 histogram_options { buckets: [0.1, 1.0] } } }
"""

SEQUENCE_CONFIG_TEXT = """
name: "seq"
sequence_batching {
  oldest { max_candidate_sequences: 4 preferred_batch_size: [2] preserve_ordering: true }
  max_sequence_idle_microseconds: 1000
  control_input { name: "START" control { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] } }
  control_input { name: "CORRID" control { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } }
  state { input_name: "s_in" output_name: "s_out" data_type: TYPE_FP32 dims: [4]
          initial_state { name: "zeros" data_type: TYPE_FP32 dims: [4] zero_data: true } }
  iterative_sequence: true
}
"""

ENSEMBLE_CONFIG_TEXT = """
name: "pipeline"
platform: "ensemble"
version_policy { latest { num_versions: 2 } }
ensemble_scheduling {
  step { model_name: "a" model_version: -1 input_map { key: "i" value: "x" } output_map { key: "o" value: "t" } }
  step { model_name: "b" input_map { key: "i" value: "t" } output_map { key: "o" value: "y" } model_namespace: "ns" }
  max_inflight_requests: 16
}
"""


@pytest.mark.parametrize(
    "config_text",
    [MODEL_CONFIG_TEXT, SEQUENCE_CONFIG_TEXT, ENSEMBLE_CONFIG_TEXT],
    ids=["dynamic", "sequence", "ensemble"],
)
def test_model_config_round_trip(config_text: str) -> None:
    ours = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    response = service_pb2.ModelConfigResponse(config=ours)
    wire = response.SerializeToString(deterministic=True)
    theirs = triton_service_pb2.ModelConfigResponse.FromString(wire)
    assert text_format.MessageToString(theirs.config) == text_format.MessageToString(ours)
    assert theirs.SerializeToString(deterministic=True) == wire
    # The same text also parses with tritonclient's schema to the same bytes.
    assert text_format.Parse(config_text, triton_model_config_pb2.ModelConfig()).SerializeToString(
        deterministic=True
    ) == ours.SerializeToString(deterministic=True)


# --- a real tritonclient talking to a servicer built on our stubs -----------------------------------------------------


class _EchoServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers health checks, echoes inputs back as outputs and returns a fixed config."""

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelConfig(self, request, context):
        config = model_config_pb2.ModelConfig(name=request.name, max_batch_size=4)
        config.input.add(name="x", data_type=model_config_pb2.TYPE_FP32, dims=[-1])
        return service_pb2.ModelConfigResponse(config=config)

    def _echo(self, request):
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name.replace("INPUT", "OUTPUT"), datatype=tensor.datatype,
                                 shape=tensor.shape)  # fmt: skip
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    def ModelInfer(self, request, context):
        return self._echo(request)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            yield service_pb2.ModelStreamInferResponse(infer_response=self._echo(request))


@pytest.fixture
def echo_server():
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(grace=None)


def test_tritonclient_talks_to_a_servicer_on_our_stubs(echo_server: str) -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    with triton_grpc.InferenceServerClient(url=echo_server) as client:
        assert client.is_server_live()

        config = client.get_model_config("echo", as_json=True)["config"]
        assert config["name"] == "echo" and config["max_batch_size"] == 4
        assert config["input"][0]["data_type"] == "TYPE_FP32"

        infer_input = triton_grpc.InferInput("INPUT0", list(data.shape), "FP32")
        infer_input.set_data_from_numpy(data)
        result = client.infer("echo", [infer_input], request_id="7")
        assert result.get_response().id == "7"
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)

        responses = []
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        try:
            client.async_stream_infer("echo", [infer_input], request_id="s1")
        finally:
            client.stop_stream()  # waits for the stream to drain
        assert len(responses) == 1 and responses[0][1] is None
        np.testing.assert_array_equal(responses[0][0].as_numpy("OUTPUT0"), data)
