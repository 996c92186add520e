"""End to end over HTTP: the real server process, the official tritonclient and raw httpx."""

from __future__ import annotations

import gzip
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.errors import InvalidInput
from server.frontends import http_server
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def mlp_reference(features: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(BUNDLED_REPOSITORY / "mlp_classifier" / "1" / "model.onnx"))
    return session.run(["logits", "probabilities"], {"features": features})


def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "modeldock"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_autocompleted_config(client: httpclient.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    metadata = client.get_model_metadata("mlp_classifier")
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 256]}]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]} == {"logits": [-1, 10], "probabilities": [-1, 10]}
    config = client.get_model_config("mlp_classifier")
    # config.yaml leaves inputs/outputs out; they come from the ONNX file.
    assert config["input"] == [
        {"name": "features", "data_type": "TYPE_FP32", "dims": [256], "optional": False, "allow_ragged_batch": False}
    ]
    assert config["max_batch_size"] == 64


@pytest.mark.parametrize("binary", [False, True])
def test_simple_add_sub(client: httpclient.InferenceServerClient, binary: bool) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary),
    ]
    result = client.infer("simple", inputs, outputs=outputs, request_id="req-42")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "simple" and response["model_version"] == "1"


def test_requested_outputs_only(client: httpclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    result = client.infer("simple", inputs, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), dtype=np.float32))


def test_mlp_matches_onnxruntime(client: httpclient.InferenceServerClient) -> None:
    features = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    infer_input = httpclient.InferInput("features", list(features.shape), "FP32")
    infer_input.set_data_from_numpy(features)
    result = client.infer("mlp_classifier", [infer_input], model_version="1")
    logits, probabilities = mlp_reference(features)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), np.ones(5), rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True])
def test_compressed_requests_and_responses(
    client: httpclient.InferenceServerClient, algorithm: str, binary: bool
) -> None:
    features = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
    infer_input = httpclient.InferInput("features", list(features.shape), "FP32")
    infer_input.set_data_from_numpy(features, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer(
        "mlp_classifier",
        [infer_input],
        outputs=outputs,
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_allclose(result.as_numpy("logits"), mlp_reference(features)[0], rtol=1e-5, atol=1e-5)


def test_compression_headers_and_errors(server: ServerProcess) -> None:
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1] * 16},
            ]
        }
    )
    url = server.url + "/v2/models/simple/infer"
    reply = httpx.post(
        url, content=gzip.compress(body), headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-encoding"] == "gzip"  # httpx has already decompressed reply.content
    output0 = next(o for o in reply.json()["outputs"] if o["name"] == "OUTPUT0")
    assert output0["data"] == [float(i + 1) for i in range(16)]
    refused = httpx.post(url, content=body, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert refused.status_code == 200 and "content-encoding" not in refused.headers
    broken = httpx.post(url, content=b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400 and "gzip" in broken.json()["error"]
    brotli = httpx.post(url, content=body, headers={"Content-Encoding": "br"})
    assert brotli.status_code == 400 and "'br'" in brotli.json()["error"]
    truncated = httpx.post(url, content=gzip.compress(body)[:-12], headers={"Content-Encoding": "gzip"})
    assert truncated.status_code == 400 and "truncated" in truncated.json()["error"]


def test_compressed_body_inflating_past_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    bomb = gzip.compress(bytes(1 << 22))
    assert len(bomb) < 8192
    with pytest.raises(InvalidInput, match="more than 1048576 bytes"):
        http_server._decompressed(bomb, "gzip")
    assert http_server._decompressed(gzip.compress(bytes(1 << 20)), "gzip") == bytes(1 << 20)
    assert http_server._decompressed(zlib.compress(b"small"), "deflate") == b"small"


def test_binary_data_output_for_all_outputs(server: ServerProcess) -> None:
    a = np.arange(16, dtype=np.float32)
    body = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a.tolist()},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": a.tolist()},
        ],
    }
    response = httpx.post(f"{server.url}/v2/models/simple/infer", json=body)
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    header = httpx.Response(200, content=response.content[:length]).json()
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [64, 64]
    out0 = np.frombuffer(response.content[length : length + 64], dtype=np.float32)
    np.testing.assert_array_equal(out0, a * 2)


def _post_infer(server: ServerProcess, model: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body)


def _simple_input(name: str, shape: list[int], datatype: str = "FP32", count: int | None = None) -> dict:
    n = count if count is not None else int(np.prod(shape))
    return {"name": name, "shape": shape, "datatype": datatype, "data": [1] * n}


@pytest.mark.parametrize(
    ("model", "body", "status", "message"),
    [
        ("nope", {"inputs": [_simple_input("INPUT0", [1, 16])]}, 404, "unknown model 'nope'"),
        ("simple", {"inputs": [_simple_input("INPUT0", [1, 16])]}, 400, "missing input 'INPUT1'"),
        (
            "simple",
            {"inputs": [_simple_input("INPUT0", [1, 15]), _simple_input("INPUT1", [1, 16])]},
            400,
            "input 'INPUT0': shape [1, 15] does not match the model's [-1, 16]",
        ),
        (
            "simple",
            {"inputs": [_simple_input("INPUT0", [1, 16], "INT32"), _simple_input("INPUT1", [1, 16])]},
            400,
            "input 'INPUT0': datatype INT32 does not match the model's FP32",
        ),
        (
            "simple",
            {"inputs": [_simple_input("INPUT0", [9, 16]), _simple_input("INPUT1", [9, 16])]},
            400,
            "input 'INPUT0': batch size 9 is outside 1..8",
        ),
        (
            "simple",
            {"inputs": [_simple_input("INPUT0", [1, 16]), _simple_input("INPUT1", [1, 16]), _simple_input("X", [1])]},
            400,
            "unexpected input 'X'",
        ),
        (
            "simple",
            {
                "inputs": [_simple_input("INPUT0", [1, 16]), _simple_input("INPUT1", [1, 16])],
                "outputs": [{"name": "OUTPUT9"}],
            },
            400,
            "unknown output 'OUTPUT9'",
        ),
        (
            "simple",
            {"inputs": [_simple_input("INPUT0", [1, 16], count=3)]},
            400,
            "input 'INPUT0': shape [1, 16] needs 16",
        ),
        ("simple", {"nothing": 1}, 400, "non-empty 'inputs'"),
    ],
)
def test_client_errors_are_4xx_with_message(
    server: ServerProcess, model: str, body: object, status: int, message: str
) -> None:
    response = _post_infer(server, model, body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_bodies(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/models/simple/infer", content=b"{not json")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    response = httpx.post(
        f"{server.url}/v2/models/simple/infer",
        content=b"{}",
        headers={"Inference-Header-Content-Length": "50"},
    )
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_unknown_version_and_metadata_errors(server: ServerProcess, client: httpclient.InferenceServerClient) -> None:
    assert httpx.get(f"{server.url}/v2/models/simple/versions/7").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/ghost").json() == {"error": "unknown model 'ghost'"}
    with pytest.raises(InferenceServerException, match="unknown version 7"):
        client.get_model_metadata("simple", "7")


def test_tritonclient_reports_server_errors(client: httpclient.InferenceServerClient) -> None:
    infer_input = httpclient.InferInput("features", [1, 255], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 255), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input 'features': shape"):
        client.infer("mlp_classifier", [infer_input])


def test_broken_models_do_not_take_the_server_down(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repo / "simple")
    bad_config = repo / "bad_config"
    (bad_config / "1").mkdir(parents=True)
    (bad_config / "config.yaml").write_text("backend: onnxruntime\nmax_batch_sise: 4\n")
    bad_file = repo / "bad_file"
    (bad_file / "1").mkdir(parents=True)
    (bad_file / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    (bad_file / "config.yaml").write_text("backend: onnxruntime\n")

    server = start_server(repo)
    index = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index").json()}
    assert index["simple"]["state"] == "READY"
    assert index["bad_config"]["state"] == "UNAVAILABLE"
    assert "bad_config/config.yaml" in index["bad_config"]["reason"]
    assert "field 'max_batch_sise': unknown field" in index["bad_config"]["reason"]
    assert index["bad_file"]["state"] == "UNAVAILABLE"
    assert "bad_file/1/model.onnx" in index["bad_file"]["reason"]

    response = httpx.post(f"{server.url}/v2/models/bad_file/infer", json={"inputs": [_simple_input("x", [1])]})
    assert response.status_code == 503 and "not ready" in response.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/bad_file/ready").status_code == 400
    a = np.ones((1, 16), dtype=np.float32)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a * 2)
    assert "bad_config" in server.log() and "max_batch_sise" in server.log()


def test_unknown_routes_answer_in_protocol_error_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v2/no/such/route")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}
    response = httpx.post(f"{server.url}/v2/models/simple/versions/1/infer", content=b"[]")
    assert response.status_code == 400
    assert response.json() == {"error": "request body must be a JSON object"}
