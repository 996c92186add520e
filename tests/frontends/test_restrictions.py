"""Restricted API groups (Triton's ``--http-restricted-api`` / ``--grpc-restricted-protocol``) against the real
server, with the real ``tritonclient`` sending (or not sending) the header through its ``headers`` argument."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from server.frontends.restrictions import (
    ApiGroup,
    RequiredHeader,
    Restrictions,
    RestrictionSpecError,
    grpc_group,
    http_group,
)
from server.protocol.generated import grpc_service_pb2 as pb
from tests.conftest import ServerProcess


# Fresh dicts each time: tritonclient adds its own headers to the dict it is given.
def admin() -> dict[str, str]:
    return {"admin-key": "admin-value"}


def infer() -> dict[str, str]:
    return {"infer-key": "infer-value"}


HTTP_INFER_REFUSAL = "This API is restricted, expecting header 'infer-key'"
GRPC_INFER_REFUSAL = "This protocol is restricted, expecting header 'infer-key'"


@pytest.fixture(scope="module")
def restricted(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    return start_server(
        bundled_repository,
        "--model-control-mode=explicit",
        "--load-model=simple",
        "--http-restricted-api=model-repository,logging:admin-key=admin-value",
        "--http-restricted-api=inference:infer-key=infer-value",
        "--grpc-restricted-protocol=model-repository:admin-key=admin-value",
        "--grpc-restricted-protocol=inference,health:infer-key=infer-value",
    )


def _inputs(module: object) -> tuple[list[object], np.ndarray]:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]  # type: ignore[attr-defined]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    return inputs, a


def test_http_inference_needs_its_header(restricted: ServerProcess) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{restricted.http_port}")
    inputs, a = _inputs(triton_http)
    with pytest.raises(InferenceServerException, match=HTTP_INFER_REFUSAL):
        client.infer("simple", inputs)
    with pytest.raises(InferenceServerException, match=HTTP_INFER_REFUSAL):
        client.infer("simple", inputs, headers={"infer-key": "infer-valuX"})
    with pytest.raises(InferenceServerException, match=HTTP_INFER_REFUSAL):
        client.infer("simple", inputs, headers=admin())  # another group's header opens nothing here
    result = client.infer("simple", inputs, headers=infer())
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    # Header names are case-insensitive over HTTP.
    result = client.infer("simple", inputs, headers={"Infer-Key": "infer-value"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - a)
    # Groups not restricted stay open.
    assert client.is_server_live() and client.is_model_ready("simple")
    assert client.get_model_metadata("simple")["name"] == "simple"


def test_http_refusal_is_403_naming_the_header(restricted: ServerProcess) -> None:
    refused = httpx.post(f"{restricted.url}/v2/repository/index", json={})
    assert refused.status_code == 403
    assert refused.json() == {"error": "This API is restricted, expecting header 'admin-key'"}
    assert httpx.get(f"{restricted.url}/v2/logging").status_code == 403
    assert httpx.get(f"{restricted.url}/v2/logging", headers=admin()).status_code == 200
    # The refusal comes before the body is read or the model looked up.
    assert httpx.post(f"{restricted.url}/v2/models/nope/infer", content=b"{").status_code == 403
    assert httpx.post(f"{restricted.url}/v2/models/simple/versions/1/infer", content=b"{").status_code == 403


def test_http_model_repository_needs_the_admin_header(restricted: ServerProcess) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{restricted.http_port}")
    with pytest.raises(InferenceServerException, match="expecting header 'admin-key'"):
        client.unload_model("simple")
    with pytest.raises(InferenceServerException, match="expecting header 'admin-key'"):
        client.get_model_repository_index(headers=infer())
    assert client.is_model_ready("simple")
    names = {row["name"] for row in client.get_model_repository_index(headers=admin())}
    assert "simple" in names
    client.load_model("simple", headers=admin())
    assert client.is_model_ready("simple")


def test_grpc_inference_and_health_need_their_header(restricted: ServerProcess) -> None:
    client = triton_grpc.InferenceServerClient(restricted.grpc_url)
    inputs, a = _inputs(triton_grpc)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("simple", inputs)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert GRPC_INFER_REFUSAL in refused.value.message()
    with pytest.raises(InferenceServerException, match=GRPC_INFER_REFUSAL):
        client.infer("simple", inputs, headers={"infer-key": "wrong"})
    result = client.infer("simple", inputs, headers=infer())
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    with pytest.raises(InferenceServerException, match=GRPC_INFER_REFUSAL):
        client.is_server_live()
    assert client.is_server_live(headers=infer())
    # Metadata and configuration are not restricted.
    assert client.get_model_metadata("simple").name == "simple"
    assert client.get_model_config("simple").config.name == "simple"


def test_grpc_stream_is_refused_without_the_header(restricted: ServerProcess) -> None:
    stub_channel = grpc.insecure_channel(restricted.grpc_url)
    from tritonclient.grpc import service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(stub_channel)
    request = pb.ModelInferRequest(model_name="simple")
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert GRPC_INFER_REFUSAL in refused.value.details()
    stub_channel.close()


def test_grpc_model_repository_needs_the_admin_header(restricted: ServerProcess) -> None:
    client = triton_grpc.InferenceServerClient(restricted.grpc_url)
    with pytest.raises(InferenceServerException, match="expecting header 'admin-key'"):
        client.unload_model("simple")
    with pytest.raises(InferenceServerException, match="expecting header 'admin-key'"):
        client.get_model_repository_index(headers=infer())
    index = client.get_model_repository_index(headers=admin())
    assert "simple" in {model.name for model in index.models}


def test_unrestricted_server_needs_no_header(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/repository/index", json={})
    assert response.status_code == 200


def test_every_grpc_method_belongs_to_a_group() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert grpc_group(f"/inference.GRPCInferenceService/{method.name}") is not None, method.name


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v2", ApiGroup.METADATA),
        ("/v2/health/live", ApiGroup.HEALTH),
        ("/v2/models/m/ready", ApiGroup.HEALTH),
        ("/v2/models/m/versions/2/ready", ApiGroup.HEALTH),
        ("/v2/models/m", ApiGroup.METADATA),
        ("/v2/models/m/config", ApiGroup.MODEL_CONFIG),
        ("/v2/models/m/infer", ApiGroup.INFERENCE),
        ("/v2/models/m/versions/1/infer", ApiGroup.INFERENCE),
        ("/v2/models/stats", ApiGroup.STATISTICS),
        ("/v2/models/m/stats", ApiGroup.STATISTICS),
        ("/metrics", ApiGroup.STATISTICS),
        ("/v2/repository/index", ApiGroup.MODEL_REPOSITORY),
        ("/v2/repository/models/m/load", ApiGroup.MODEL_REPOSITORY),
        ("/v2/systemsharedmemory/status", ApiGroup.SHARED_MEMORY),
        ("/v2/cudasharedmemory/region/r/register", ApiGroup.SHARED_MEMORY),
        ("/v2/logging", ApiGroup.LOGGING),
        ("/v2/trace/setting", ApiGroup.TRACE),
        ("/v2/models/m/trace/setting", ApiGroup.TRACE),
        ("/v1/chat/completions", ApiGroup.INFERENCE),
        ("/docs", None),
    ],
)
def test_http_routes_map_to_triton_groups(path: str, group: ApiGroup | None) -> None:
    assert http_group(path) == group


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("inference", "expected <group>"),
        ("inference:key", "expected <group>"),
        (":key=value", "expected <group>"),
        ("inference:=value", "expected <group>"),
        ("inferance:key=value", "unknown API group 'inferance'"),
    ],
)
def test_malformed_specs_are_refused(spec: str, fragment: str) -> None:
    with pytest.raises(RestrictionSpecError, match=fragment):
        Restrictions.parse([spec])


def test_a_group_may_be_restricted_once() -> None:
    with pytest.raises(RestrictionSpecError, match="'health' is restricted more than once"):
        Restrictions.parse(["health:a=1", "metadata,health:b=2"])


def test_values_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("server.frontends.restrictions.hmac.compare_digest", recording)
    header = RequiredHeader("key", b"secret")
    assert header.admits("secret") and header.admits(b"secret")
    assert not header.admits("secreT") and not header.admits(None)
    assert compared == [(b"secret", b"secret"), (b"secret", b"secret"), (b"secreT", b"secret")]
