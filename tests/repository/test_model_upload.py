"""Loading a model from files sent with the load request (Triton's ``file:`` parameters), over HTTP and gRPC."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerProcess
from tests.lifecycle_models import BUNDLED_REPOSITORY, add_simple, check_simple_output, index, infer_simple

EXPLICIT = ("--model-control-mode", "explicit")


def bundled_config(model: str) -> str:
    """A bundled model's config as the JSON text a Triton client sends in the ``config`` parameter."""
    return json.dumps(yaml.safe_load((BUNDLED_REPOSITORY / model / "config.yaml").read_text()))


def staged(tmp: Path) -> list[Path]:
    """The folders the server has written uploaded files into."""
    return sorted(tmp.glob("modeldock-upload-*"))


def empty_explicit_server(start_server: Callable[..., ServerProcess], tmp_path: Path) -> tuple[ServerProcess, Path]:
    """A server in explicit mode on an empty repository, and the temporary folder it stages uploads in."""
    repository = tmp_path / "repo"
    repository.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return start_server(repository, *EXPLICIT, env={"TMPDIR": str(tmp)}), tmp


def test_http_upload_serves_reloads_and_cleans_up(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "simple")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_server(repository, *EXPLICIT, "--load-model", "simple", env={"TMPDIR": str(tmp)})
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    onnx_bytes = (BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx").read_bytes()

    client.load_model("uploaded", config=bundled_config("simple"), files={"file:1/model.onnx": onnx_bytes})
    assert client.is_model_ready("uploaded")
    check_simple_output(infer_simple(None, server.url, "uploaded"))
    assert index(server.url)[("uploaded", "1")]["state"] == "READY"
    [first] = staged(tmp)
    assert (first / "uploaded" / "1" / "model.onnx").read_bytes() == onnx_bytes

    # A reload with new files replaces the old folder; the version it names is what serves now.
    client.load_model("uploaded", config=bundled_config("simple"), files={"file:7/model.onnx": onnx_bytes})
    assert client.get_model_metadata("uploaded")["versions"] == ["7"]
    response = infer_simple(None, server.url, "uploaded")
    check_simple_output(response)
    assert response.json()["model_version"] == "7"
    [second] = staged(tmp)
    assert second != first and not first.exists()

    # Files that do not make a model fail the load; what was serving keeps serving, and nothing is left behind.
    with pytest.raises(InferenceServerException) as broken:
        client.load_model("uploaded", config=bundled_config("simple"), files={"file:1/model.onnx": b"not onnx"})
    assert broken.value.status() == "400" and "uploaded" in broken.value.message()
    check_simple_output(infer_simple(None, server.url, "uploaded"))
    assert staged(tmp) == [second]

    client.unload_model("uploaded")
    assert not client.is_model_ready("uploaded")
    assert staged(tmp) == []
    assert client.is_model_ready("simple")
    client.close()


def test_http_upload_refuses_bad_requests(start_server, tmp_path: Path) -> None:
    server, tmp = empty_explicit_server(start_server, tmp_path)
    onnx_b64 = base64.b64encode((BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx").read_bytes()).decode()

    def load(parameters: dict[str, object]) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v2/repository/models/uploaded/load", json={"parameters": parameters}, timeout=30
        )

    without_config = load({"file:1/model.onnx": onnx_b64})
    assert without_config.status_code == 400 and "'config'" in without_config.json()["error"]
    for key in ("file:../1/model.onnx", "file:/etc/model.onnx", "file:1/./model.onnx", "file:1\\model.onnx"):
        escaping = load({"config": bundled_config("simple"), key: onnx_b64})
        assert escaping.status_code == 400 and key in escaping.json()["error"], key
    not_base64 = load({"config": bundled_config("simple"), "file:1/model.onnx": "!!not base64!!"})
    assert not_base64.status_code == 400 and "file:1/model.onnx" in not_base64.json()["error"]
    not_json = load({"config": "{backend", "file:1/model.onnx": onnx_b64})
    assert not_json.status_code == 400 and "config" in not_json.json()["error"]
    no_version = load({"config": bundled_config("simple"), "file:model.onnx": onnx_b64})
    assert no_version.status_code == 400 and "version" in no_version.json()["error"]

    nul_name = httpx.post(
        f"{server.url}/v2/repository/models/a%00b/load",
        json={"parameters": {"config": bundled_config("simple"), "file:1/model.onnx": onnx_b64}},
        timeout=30,
    )
    assert nul_name.status_code == 400 and "model name" in nul_name.json()["error"]

    assert staged(tmp) == []
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "1").exists()
    assert httpx.get(f"{server.url}/v2/models/uploaded/ready", timeout=10).status_code != 200


def test_grpc_upload_of_python_backend_model(start_server, tmp_path: Path) -> None:
    server, tmp = empty_explicit_server(start_server, tmp_path)
    client = triton_grpc.InferenceServerClient(server.grpc_url)
    code = (BUNDLED_REPOSITORY / "text_preprocessor" / "1" / "model.py").read_bytes()

    client.load_model("words", config=bundled_config("text_preprocessor"), files={"file:1/model.py": code})
    assert client.is_model_ready("words")
    text = triton_grpc.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"  Hello   WORLD "], ["ﬁne day".encode()]], dtype=np.object_))
    result = client.infer("words", [text])
    assert result.as_numpy("NORMALIZED").ravel().tolist() == [b"hello world", b"fine day"]
    assert result.as_numpy("TOKEN_COUNT").ravel().tolist() == [2, 2]
    assert len(staged(tmp)) == 1

    with pytest.raises(InferenceServerException) as escaping:
        client.load_model("words", config=bundled_config("text_preprocessor"), files={"file:../model.py": code})
    assert escaping.value.status() == "StatusCode.INVALID_ARGUMENT" and "file:../model.py" in escaping.value.message()
    assert client.is_model_ready("words") and len(staged(tmp)) == 1

    client.unload_model("words")
    assert staged(tmp) == []
    client.close()
