"""The floor under any Python HTTP front end: an ASGI (and RSGI) app with no framework, no batching and no checks.

It answers ``POST /v2/models/<model>/infer`` with a binary-tensor body by running ONNX Runtime inline on the event
loop and sending back a pre-built header plus the output bytes. Whatever a real server does per request costs more
than this, so its throughput under a given HTTP server is the ceiling for a Python front end on that server.
``bench_triton.py`` runs it under uvicorn (ASGI) and granian (ASGI and RSGI) with ``FLOOR_MODELS`` naming the
models (``name=path.onnx,...``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from floor_models import floor_sessions

_HEADER_LENGTH = b"inference-header-content-length"


SESSIONS = floor_sessions()


def _answer(model: str, body: bytes, header_length: int) -> tuple[bytes, int]:
    session = SESSIONS[model]
    features = session.get_inputs()[0].shape[1]
    x = np.frombuffer(body, np.float32, offset=header_length).reshape(-1, features)
    (y,) = session.run(["OUTPUT0"], {"INPUT0": x})
    raw = y.tobytes()
    header = orjson.dumps(
        {
            "model_name": model,
            "model_version": "1",
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    )
    return header + raw, len(header)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    header_length = next(int(v) for k, v in scope["headers"] if k == _HEADER_LENGTH)
    payload, json_length = _answer(scope["path"].split("/")[3], body, header_length)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(json_length).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RsgiApp:
    """granian's RSGI interface: the same work without ASGI's message dicts."""

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        body = await protocol()
        header_length = int(scope.headers.get("inference-header-content-length"))
        payload, json_length = _answer(scope.path.split("/")[3], body, header_length)
        protocol.response_bytes(
            200,
            [("content-type", "application/octet-stream"), ("inference-header-content-length", str(json_length))],
            payload,
        )


rsgi_app = RsgiApp()
