"""Both HTTP servers (``--http-server uvicorn|granian``) answer the same protocol, and both stop cleanly."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess


@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
def test_http_server_choice_serves_the_same_protocol(start_server: Callable[..., ServerProcess], kind: str) -> None:
    server = start_server(BUNDLED_REPOSITORY, "--http-server", kind)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    for binary in (False, True):
        inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(b, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("OUTPUT0", "OUTPUT1")]
        result = client.infer("simple", inputs, outputs=outputs, request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert result.get_response()["id"] == "r1"
    # Compressed both ways, through the same fast path.
    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(
        "simple", inputs, request_compression_algorithm="gzip", response_compression_algorithm="deflate"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    # Errors keep the protocol's shape on the fast path and on FastAPI's routes.
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("no_such_model", inputs)
    bad = httpx.post(f"{server.url}/v2/models/simple/infer", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    assert client.get_model_metadata("simple")["name"] == "simple"
    missing = httpx.get(f"{server.url}/v2/nowhere")
    assert missing.status_code == 404 and "error" in missing.json()
    # Paths reach the routes percent-decoded.
    unknown = httpx.get(f"{server.url}/v2/models/no%20such%20model")
    assert unknown.status_code in (400, 404) and "'no such model'" in unknown.json()["error"]
    # A chunked body (no Content-Length) is read chunk by chunk, and answers like any other.
    request = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": a[0].tolist()},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": b[0].tolist()},
        ]
    }
    encoded = json.dumps(request).encode()
    chunks = (encoded[i : i + 64] for i in range(0, len(encoded), 64))
    chunked = httpx.post(f"{server.url}/v2/models/simple/infer", content=chunks)
    assert chunked.status_code == 200, chunked.text
    outputs = {o["name"]: o["data"] for o in chunked.json()["outputs"]}
    np.testing.assert_array_equal(outputs["OUTPUT0"], (a[0] + b[0]).tolist())
    # SIGTERM stops it, with its models unloaded on the way out.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
