"""The KServe v2 gRPC messages, translated to and from the wire-independent types in ``server.protocol.types``.

Tensor data goes through ``tensor_codec`` exactly as on HTTP: ``raw_input_contents`` entries are raw buffers
(``deserialize_raw``), typed ``*_contents`` lists are element lists (``from_list``), and outputs always go back as
``raw_output_contents`` (``serialize_raw``), which is what Triton sends and what ``tritonclient.grpc`` reads.
Tensors in shared memory have no contents; their parameters name the region (``tensor_codec``'s shared memory
helpers, as on HTTP).
Everything that is not a tensor (metadata, configs, statistics, the repository index) is converted here too, so
the servicer only moves messages between the network and ``InferenceServer``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from google.protobuf import json_format

from server.errors import InvalidInput
from server.protocol.datatypes import WIRE_DATATYPES, wire_datatype
from server.protocol.generated import _pool
from server.protocol.generated import grpc_service_pb2 as pb
from server.protocol.generated import model_config_pb2 as config_pb
from server.protocol.limits import LIMITS
from server.protocol.load_parameters import FILE_PREFIX, parse_config_override
from server.protocol.parameters import check_output_parameters, check_request_parameters
from server.protocol.shared_memory import REGION, SharedMemoryRegistry
from server.protocol.tensor_codec import (
    check_shape,
    deserialize_raw,
    element_count,
    from_list,
    serialize_raw,
    shared_memory_input,
    shared_memory_output,
    write_shared_memory_output,
)
from server.protocol.types import InferRequest, InferResponse, RequestedOutput

# The ``InferTensorContents`` list that carries each datatype; FP16 has none and must travel raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_INT64_MAX = 2**63 - 1
# One TensorConfig type serves inputs and outputs in our schema; Triton's ModelInput and ModelOutput each lack the
# other's own fields, so those are left out of the side that has no place for them.
INPUT_ONLY_FIELDS = frozenset({"optional", "allow_ragged_batch"})
OUTPUT_ONLY_FIELDS = frozenset({"label_filename"})


# -- parameters -----------------------------------------------------------------------------------------------
def parameters_to_dict(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """An ``InferParameter`` map as plain Python values; an unset oneof is dropped rather than guessed."""
    out: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(parameter, choice)
    return out


def fill_parameters(target: MutableMapping[str, pb.InferParameter], values: Mapping[str, Any]) -> None:
    """Python values into an ``InferParameter`` map: ints that do not fit int64 become uint64, the rest text."""
    for key, value in values.items():
        parameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                parameter.uint64_param = value
            else:
                parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = value if isinstance(value, str) else str(value)


# -- inference ------------------------------------------------------------------------------------------------
def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor, datatype: str, shape: list[int]) -> Any:
    """The element list of a typed input, after checking that it is the one list its datatype allows."""
    name = tensor.name
    present = [field.name for field, _ in tensor.contents.ListFields()]
    expected = CONTENTS_FIELD.get(datatype)
    if expected is None:
        raise InvalidInput(
            f"input '{name}': {datatype} data cannot be sent in typed contents; send it in raw_input_contents"
        )
    stray = [field for field in present if field != expected]
    if stray:
        raise InvalidInput(f"input '{name}': {datatype} data belongs in contents.{expected}, got contents.{stray[0]}")
    if not present and element_count(shape) > 0:
        raise InvalidInput(f"input '{name}' has no data: set contents.{expected} or use raw_input_contents")
    return list(getattr(tensor.contents, expected))


def _check_raw_entries(message: pb.ModelInferRequest) -> None:
    """One ``raw_input_contents`` entry per input, in order, skipping inputs in shared memory as Triton does."""
    sent = [tensor for tensor in message.inputs if REGION not in tensor.parameters]
    raw = message.raw_input_contents
    if raw and len(raw) != len(sent):
        if len(raw) < len(sent):
            raise InvalidInput(
                f"input '{sent[len(raw)].name}' has no entry in raw_input_contents "
                f"({len(raw)} entries for {len(sent)} inputs; it needs one per input, in input order)"
            )
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries but the request has only {len(sent)} inputs")


def decode_request(message: pb.ModelInferRequest, shared_memory: SharedMemoryRegistry) -> InferRequest:
    """The request as an ``InferRequest``, every field checked.

    Every call's path: each access to a repeated or map field builds a wrapper object in upb (about as costly as a
    small function call), so each is read once into a local, an empty map is never walked, and a shape is read
    with one slice. The raw entries are checked against the inputs up front only when some input has parameters
    (and so may be in shared memory); otherwise one entry per input is the whole rule.
    """
    inputs = message.inputs
    count = len(inputs)
    if not count:
        raise InvalidInput("request must have at least one input")
    LIMITS.check_input_count(count)
    raw = message.raw_input_contents
    if raw and len(raw) != count or any(tensor.parameters for tensor in inputs):
        _check_raw_entries(message)
    request_parameters = message.parameters
    request = InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        parameters=parameters_to_dict(request_parameters) if request_parameters else {},
    )
    check_request_parameters(request.parameters)
    arrays = request.inputs
    datatypes = request.input_datatypes
    raw_entries = iter(raw)
    for position, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{position}] has no name")
        if name in arrays:
            raise InvalidInput(f"input '{name}' appears more than once")
        datatype = tensor.datatype
        if datatype not in WIRE_DATATYPES:
            raise InvalidInput(
                f"input '{name}': unknown datatype {datatype!r}; expected one of {sorted(WIRE_DATATYPES)}"
            )
        shape = check_shape(tensor.shape[:], name)
        tensor_parameters = tensor.parameters
        array = (
            shared_memory_input(shared_memory, parameters_to_dict(tensor_parameters), datatype, shape, name)
            if tensor_parameters
            else None
        )
        has_contents = tensor.HasField("contents") and bool(tensor.contents.ListFields())
        if array is not None:
            if has_contents:
                raise InvalidInput(f"input '{name}' is in shared memory and must not also carry contents")
        elif raw:
            if has_contents:
                raise InvalidInput(
                    f"input '{name}' has typed contents but the request uses raw_input_contents; "
                    "when raw_input_contents is used, every input must be raw"
                )
            array = deserialize_raw(datatype, shape, next(raw_entries), name)
        else:
            array = from_list(datatype, shape, _typed_contents(tensor, datatype, shape), name)
        arrays[name] = array
        datatypes[name] = datatype

    outputs = message.outputs
    if outputs:
        requested = request.outputs
        names: set[str] = set()
        for output in outputs:
            name = output.name
            if name in names:
                raise InvalidInput(f"output '{name}' is requested more than once")
            names.add(name)
            output_parameters = output.parameters
            if not output_parameters:
                requested.append(RequestedOutput(name))
                continue
            parameters = parameters_to_dict(output_parameters)
            check_output_parameters(parameters, name)
            requested.append(RequestedOutput(name, parameters, shared_memory_output(shared_memory, parameters, name)))
    return request


def encode_response(response: InferResponse, request: InferRequest | None = None) -> pb.ModelInferResponse:
    """Every output as raw bytes, in the order the model produced them; the request's id is echoed.

    Each repeated field is read once (see ``decode_request``), and shared memory placements are looked up only
    when some requested output has one.
    """
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or (request.id if request is not None else ""),
    )
    if response.parameters:
        fill_parameters(message.parameters, response.parameters)
    placements = (
        {o.name: o.shared_memory for o in request.outputs if o.shared_memory is not None}
        if request is not None and request.outputs
        else None
    )
    outputs = message.outputs
    contents = message.raw_output_contents
    for name, array in response.outputs.items():
        output = outputs.add(name=name, datatype=wire_datatype(array), shape=array.shape)
        placement = placements.get(name) if placements else None
        if placement is None:
            contents.append(serialize_raw(array))
        else:
            fill_parameters(output.parameters, write_shared_memory_output(placement, array, name))
            # An empty entry keeps raw_output_contents one per output, in output order, as Triton sends it.
            contents.append(b"")
    return message


def stream_response(response: InferResponse, request: InferRequest) -> pb.ModelStreamInferResponse:
    """A response on a stream; clients that ask for it learn which response is a request's last (Triton's flag)."""
    message = encode_response(response, request)
    if request.parameters.get("triton_enable_empty_final_response"):
        message.parameters["triton_final_response"].bool_param = response.final
    return pb.ModelStreamInferResponse(infer_response=message)


def stream_error(message: pb.ModelInferRequest, error: str) -> pb.ModelStreamInferResponse:
    """A failed request on a stream: the error plus enough of a response for the client to tell which one."""
    return pb.ModelStreamInferResponse(
        error_message=error,
        infer_response=pb.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        ),
    )


# -- metadata, config, statistics, repository ------------------------------------------------------------------
def server_metadata_response(metadata: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=metadata["name"], version=metadata["version"], extensions=list(metadata["extensions"])
    )


def model_metadata_response(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    def tensors(items: list[Mapping[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=list(t["shape"]))
            for t in items
        ]

    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=list(metadata["versions"]),
        platform=metadata["platform"],
        inputs=tensors(metadata["inputs"]),
        outputs=tensors(metadata["outputs"]),
    )


def model_config_response(config_json: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """``ModelConfig.to_json()`` (Triton's JSON config shape) as the protobuf message.

    Unknown fields are an error on purpose: a field our schema has and Triton's does not should fail the tests,
    not vanish silently from what clients see.
    """
    data = dict(config_json)
    for kind, foreign in (("input", OUTPUT_ONLY_FIELDS), ("output", INPUT_ONLY_FIELDS)):
        data[kind] = [{k: v for k, v in tensor.items() if k not in foreign} for tensor in data.get(kind, [])]
    config = json_format.ParseDict(
        data, config_pb.ModelConfig(), ignore_unknown_fields=False, descriptor_pool=_pool.POOL
    )
    return pb.ModelConfigResponse(config=config)


def model_statistics_response(statistics: Mapping[str, Any]) -> pb.ModelStatisticsResponse:
    """Triton's JSON statistics shape (``{"model_stats": [...]}``) as the protobuf message. A generating model's
    ``generation`` figures (ModelDock's own JSON field) have no place in Triton's message and stay HTTP-only."""
    models = [{k: v for k, v in model.items() if k != "generation"} for model in statistics.get("model_stats", [])]
    return json_format.ParseDict(
        {**statistics, "model_stats": models},
        pb.ModelStatisticsResponse(),
        ignore_unknown_fields=False,
        descriptor_pool=_pool.POOL,
    )


def repository_index_response(rows: list[Mapping[str, str]]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=row["name"], version=row["version"], state=row["state"], reason=row["reason"]
            )
            for row in rows
        ]
    )


def shared_memory_status_response(regions: list[Mapping[str, Any]]) -> pb.SystemSharedMemoryStatusResponse:
    """The registry's status rows as Triton's map of region name to its status."""
    message = pb.SystemSharedMemoryStatusResponse()
    for row in regions:
        message.regions[row["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**row))
    return message


def decode_load_request(
    parameters: Mapping[str, pb.ModelRepositoryParameter],
) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """A load request's config override (``parameters["config"]``) and model files (``file:<path>`` bytes)."""
    override = None
    files: dict[str, bytes] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if key == "config":
            if choice not in ("string_param", "bytes_param"):
                raise InvalidInput("load parameter 'config' must be a JSON string")
            override = parse_config_override(getattr(parameter, choice))
        elif key.startswith(FILE_PREFIX):
            if choice != "bytes_param":
                raise InvalidInput(f"load parameter '{key}' must carry the file's content as bytes_param")
            files[key] = parameter.bytes_param
    return override, files


def decode_log_settings(request: pb.LogSettingsRequest) -> dict[str, Any]:
    """The settings a ``LogSettings`` call changes; an empty request only reads them."""
    changes: dict[str, Any] = {}
    for name, value in request.settings.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"log setting '{name}' has no value")
        changes[name] = getattr(value, choice)
    return changes


def encode_log_settings(settings: Mapping[str, Any]) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    for name, value in settings.items():
        target = response.settings[name]
        if isinstance(value, bool):
            target.bool_param = value
        elif isinstance(value, int):
            target.uint32_param = value
        else:
            target.string_param = str(value)
    return response


def decode_trace_settings(request: pb.TraceSettingRequest) -> dict[str, Any]:
    """Triton's gRPC trace settings: a value list per setting; an empty list clears the setting."""
    changes: dict[str, Any] = {}
    for name, setting in request.settings.items():
        values = list(setting.value)
        changes[name] = None if not values else values if name == "trace_level" else values[0]
    return changes


def encode_trace_settings(settings: Mapping[str, Any]) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for name, value in settings.items():
        response.settings[name].value.extend(value if isinstance(value, list) else [str(value)])
    return response
