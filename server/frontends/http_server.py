"""The KServe v2 HTTP/REST front end: routes translate between HTTP and ``InferenceServer`` calls only."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from server.core import InferenceServer
from server.errors import InvalidInput, ModelDockError, Overloaded, Unsupported
from server.extensions.metrics import CONTENT_TYPE_LATEST
from server.frontends.console.app import ConsoleSettings, console_app, console_redirect, restricted_headers
from server.frontends.http_guard import HttpGuard
from server.frontends.openai.app import create_openai_app
from server.frontends.rsgi_bridge import RsgiBridge
from server.protocol.generate_codec import decode_generate_request, encode_generate_response
from server.protocol.http_codec import (
    decode_index_request,
    decode_load_request,
    decode_request,
    encode_response,
    parse_header_length,
)
from server.protocol.types import InferRequest

log = logging.getLogger(__name__)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


# The largest body a compressed request may inflate to.
MAX_DECOMPRESSED_BYTES = 1 << 31


def _decompressed(body: bytes, content_encoding: str | None) -> bytes:
    """Triton's HTTP compression: tritonclient's ``request_compression_algorithm`` sends gzip or deflate bodies.

    ``Inference-Header-Content-Length`` counts the uncompressed body, so decompression comes before the codec.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding in ("gzip", "x-gzip"):
        window = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        window = zlib.MAX_WBITS
    else:
        raise Unsupported(f"Content-Encoding '{encoding}' is not supported; send gzip, deflate or an uncompressed body")
    # Bounded, so a small body that inflates to gigabytes (a compression bomb) is refused, not held in memory.
    inflater = zlib.decompressobj(window)
    try:
        data = inflater.decompress(body, MAX_DECOMPRESSED_BYTES)
        if inflater.unconsumed_tail:
            raise InvalidInput(f"request body decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes")
        data += inflater.flush()
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if not inflater.eof:
        raise InvalidInput(f"request body is not valid {encoding} data: the compressed stream is truncated")
    return data


def _response_encoding(accept_encoding: str | None) -> str | None:
    """The first of gzip/deflate the client accepts (``q=0`` refuses), or None for an uncompressed response."""
    if not accept_encoding:
        return None
    accepted: list[str] = []
    for item in accept_encoding.lower().split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if not any(param.startswith("q=") and _is_zero(param[2:]) for param in params):
            accepted.append(name)
    return next((name for name in ("gzip", "deflate") if name in accepted), None)


def _is_zero(quality: str) -> bool:
    try:
        return float(quality) == 0
    except ValueError:
        return False


def _compressed(payload: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
    if encoding == "gzip":
        return gzip.compress(payload, compresslevel=6), {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    if encoding == "deflate":
        return zlib.compress(payload), {"Content-Encoding": "deflate", "Vary": "Accept-Encoding"}
    return payload, {}


# How long a request waits for its answer before its connection is watched for the client going away.
WATCH_DISCONNECT_AFTER_S = 0.05


class _Watch:
    __slots__ = ("task", "wait_disconnect", "since", "watcher", "disconnected")

    def __init__(self, task: asyncio.Task[Any] | None, wait_disconnect: Callable[[], Awaitable[None]], since: float):
        self.task = task
        self.wait_disconnect = wait_disconnect
        self.since = since
        self.watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    async def run(self) -> None:
        await self.wait_disconnect()
        if self.task is not None:
            self.disconnected = True
            self.task.cancel()


class DisconnectWatches:
    """Cancels the task serving a request when its client disconnects, so a request still queued is dropped
    (as for a cancelled gRPC call) instead of taking a place in a batch for nobody.

    Watching costs a task per request, so it starts only once the request has waited
    ``WATCH_DISCONNECT_AFTER_S``: quick answers never pay for it, and long waits are the ones worth dropping.
    One timer for all requests finds those (a timer per request cost more than the rest of its HTTP handling
    on small requests); requests are kept in arrival order, so it stops at the first that has not waited long.
    """

    def __init__(self) -> None:
        self._waiting: dict[_Watch, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self, wait_disconnect: Callable[[], Awaitable[None]]) -> _Watch:
        loop = asyncio.get_running_loop()
        watch = _Watch(asyncio.current_task(), wait_disconnect, loop.time())
        self._waiting[watch] = None
        if self._timer is None:
            self._timer = loop.call_later(WATCH_DISCONNECT_AFTER_S, self._sweep, loop)
        return watch

    def stop(self, watch: _Watch) -> None:
        del self._waiting[watch]
        if watch.watcher is not None:
            watch.watcher.cancel()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() - WATCH_DISCONNECT_AFTER_S
        for watch in self._waiting:
            if watch.since > due:
                break
            if watch.watcher is None:
                watch.watcher = loop.create_task(watch.run())
        self._timer = loop.call_later(WATCH_DISCONNECT_AFTER_S, self._sweep, loop) if self._waiting else None


async def _generate_request(
    core: InferenceServer, request: Request, model: str, version: str, stream: bool
) -> InferRequest:
    body = await _json_body(request)
    metadata = core.model_metadata(model, version)
    inputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["inputs"]}
    return decode_generate_request(body, model, version, inputs, stream)


class InferHttpRequest:
    """What the infer route reads of an HTTP request: four headers, the body, and whether the client went away.

    Built straight from the server's own request object (an ASGI scope or an RSGI scope and protocol): Starlette's
    ``Request`` and ``Headers`` objects cost more per request than the few lookups the route needs.
    """

    __slots__ = ("content_encoding", "header_length", "accept_encoding", "traceparent", "body", "wait_disconnect")

    def __init__(
        self,
        headers: tuple[str | None, str | None, str | None, str | None],
        body: Callable[[], Awaitable[bytes]],
        wait_disconnect: Callable[[], Awaitable[None]],
    ) -> None:
        self.content_encoding, self.header_length, self.accept_encoding, self.traceparent = headers
        self.body = body
        self.wait_disconnect = wait_disconnect

    @classmethod
    def from_asgi(cls, scope: Scope, receive: Receive) -> InferHttpRequest:
        content_encoding = header_length = accept_encoding = traceparent = None
        for key, value in scope["headers"]:  # one pass over the raw list
            if key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                content_encoding = value.decode("latin-1")
            elif key == b"accept-encoding":
                accept_encoding = value.decode("latin-1")
            elif key == b"traceparent":
                traceparent = value.decode("latin-1")

        async def body() -> bytes:
            message = await receive()
            data = message.get("body", b"")
            if not message.get("more_body", False):
                return data  # the common case: one message, no copy
            chunks = [data]
            while message.get("more_body", False):
                message = await receive()
                chunks.append(message.get("body", b""))
            return b"".join(chunks)

        async def wait_disconnect() -> None:
            # The body has been read, so the next message is the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass

        return cls((content_encoding, header_length, accept_encoding, traceparent), body, wait_disconnect)

    @classmethod
    def from_rsgi(cls, headers: Any, protocol: Any) -> InferHttpRequest:
        get = headers.get
        header_length = get("inference-header-content-length")
        if header_length is None and "inference-header-content-length" in headers:
            # granian hands over only values that are visible ASCII; this one is there, but not as text.
            header_length = "(a value that is not ASCII text)"
        return cls(
            (get("content-encoding"), header_length, get("accept-encoding"), get("traceparent")),
            protocol,  # awaiting the protocol object reads the whole body
            protocol.client_disconnect,
        )


_JSON_HEADERS = [("content-type", "application/json")]
_BINARY_HEADERS = [("content-type", "application/octet-stream")]

# An answer as the route hands it to the HTTP server: status, headers, body.
Answer = tuple[int, list[tuple[str, str]], bytes]


async def _infer(
    core: InferenceServer, watches: DisconnectWatches, request: InferHttpRequest, model: str, version: str
) -> Answer | None:
    """The answer to an inference request, or None when the client disconnected first."""
    body = _decompressed(await request.body(), request.content_encoding)
    length = parse_header_length(request.header_length)
    infer_request = decode_request(body, length, model, version, core.shared_memory)
    if core.tracing.active:  # a caller's W3C trace context makes the request's span part of its trace
        infer_request.trace_parent = request.traceparent
    watch = watches.start(request.wait_disconnect)
    try:
        response = await core.infer(infer_request)
    except asyncio.CancelledError:
        if not watch.disconnected or watch.task is None:
            raise
        watch.task.uncancel()
        return None
    finally:
        watches.stop(watch)
    payload, json_length = encode_response(response, infer_request)
    headers = list(_JSON_HEADERS if json_length is None else _BINARY_HEADERS)
    if request.accept_encoding is not None:
        payload, extra = _compressed(payload, _response_encoding(request.accept_encoding))
        headers.extend((name.lower(), value) for name, value in extra.items())
    if json_length is not None:
        headers.append(("inference-header-content-length", str(json_length)))
    return 200, headers, payload


async def _answer_infer(
    core: InferenceServer, watches: DisconnectWatches, request: InferHttpRequest, match: re.Match[str]
) -> Answer | None:
    """``_infer``, with a failure answered in the protocol's error shape (as FastAPI's handlers below do)."""
    try:
        return await _infer(core, watches, request, match[1], match[2] or "")
    except ModelDockError as exc:
        return _error_answer(exc)
    except Exception as exc:  # a server bug: answer it as one, keep the connection usable
        log.exception("inference request failed")
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")


def _error_answer(exc: ModelDockError) -> Answer:
    if exc.http_status >= 500:
        log.warning("request failed: %s", exc.message)
    status, headers, body = _json_error(exc.http_status, exc.message)
    if isinstance(exc, Overloaded):  # a generation engine's refusal says when to come back
        headers.append(("retry-after", exc.retry_after))
    return status, headers, body


def _json_error(status: int, message: str) -> Answer:
    """The protocol's error shape, ``{"error": message}``, as an answer."""
    return status, list(_JSON_HEADERS), orjson.dumps({"error": message})


_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class HttpFrontEnd:
    """The application, for either HTTP server: ``POST .../infer`` is answered here, every other route by FastAPI.

    Inference is the one hot route. FastAPI's middleware stack and parameter machinery, and even Starlette's
    request and response objects, cost more CPU per request than decoding and encoding a small request's tensors,
    so the infer path is matched before that stack and answers in the server's own terms: two ASGI messages under
    uvicorn; under granian (RSGI) one call with the whole response, the request's head read from granian's own
    object, no ASGI scope built at all. Everything else reaches FastAPI as ASGI (through ``RsgiBridge`` under
    granian). The error mapping is the same as FastAPI's handlers below.
    """

    def __init__(self, core: InferenceServer, api: FastAPI, guard: HttpGuard | None = None) -> None:
        self.core = core
        self.api = api
        self.guard = guard or HttpGuard()
        self._bridge = RsgiBridge(self)
        self._watches = DisconnectWatches()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                receive = self.guard.admit(scope, receive)
            except ModelDockError as exc:
                await _send_answer(send, _error_answer(exc))
                return
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                answer = await _answer_infer(
                    self.core, self._watches, InferHttpRequest.from_asgi(scope, receive), match
                )
                if answer is not None:
                    await _send_answer(send, answer)
                return
        try:
            await self.api(scope, receive, send)
        except Exception:
            if scope["type"] != "http":
                raise
            # Already answered and logged by ``_server_error``; Starlette re-raises it only for servers to log.

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        path = scope.path
        match = _INFER_PATH.fullmatch(path) if scope.method == "POST" and "%" not in path else None
        if match is not None and scope.proto == "http":
            headers = scope.headers
            content_length = headers.get("content-length")
            # A chunked body is counted against the size limit as it arrives: the bridge's ASGI path does that.
            if content_length is not None:
                try:
                    # Summed over two lists granian builds in Rust: a quarter cheaper than over its pairs.
                    header_bytes = sum(map(len, headers.keys())) + sum(map(len, headers.values()))
                    self.guard.check_head(path, header_bytes, content_length, headers.get)
                except ModelDockError as exc:
                    answer: Answer | None = _error_answer(exc)
                else:
                    answer = await _answer_infer(
                        self.core, self._watches, InferHttpRequest.from_rsgi(headers, protocol), match
                    )
                if answer is None:  # the client went away
                    protocol.response_empty(499, [])
                else:
                    protocol.response_bytes(*answer)
                return
        await self._bridge.__rsgi__(scope, protocol)


async def _send_answer(send: Send, answer: Answer) -> None:
    status, headers, payload = answer
    raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    raw_headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def _error_response(exc: ModelDockError) -> Response:
    status, _, body = _error_answer(exc)
    headers = {"Retry-After": exc.retry_after} if isinstance(exc, Overloaded) else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def create_app(
    core: InferenceServer,
    guard: HttpGuard | None = None,
    openai_api_key: str | None = None,
    console: bool = True,
) -> HttpFrontEnd:
    """The HTTP application; ``console`` serves the web console at ``/console`` (``--no-console`` turns it off)."""
    guard = guard or HttpGuard()
    app = FastAPI(title="ModelDock", version=core.server_metadata()["version"], docs_url="/docs", redoc_url=None)
    app.state.core = core
    openai_app = create_openai_app(core, openai_api_key)
    app.mount("/v1", openai_app)
    # vLLM serves its tokenizer routes at the root, beside /v1: clients written for vLLM find them here too, answered
    # by the OpenAI app itself (its API key, its error shape).
    for path in ("/tokenize", "/detokenize"):
        app.add_route(path, openai_app, methods=["POST"], include_in_schema=False)
    if console:

        def console_settings() -> ConsoleSettings:
            return ConsoleSettings(
                model_control_mode=core.control_mode.value,
                restricted=restricted_headers(guard.restrictions),
                openai_key_required=openai_api_key is not None,
                openai_routes=sorted({"/v1" + r.path for r in openai_app.routes if isinstance(r, APIRoute)}),
            )

        app.add_route("/console", console_redirect, include_in_schema=False)
        app.mount("/console", console_app(console_settings))

    @app.exception_handler(ModelDockError)
    async def _modeldock_error(_: Request, exc: ModelDockError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and wrong methods answer in the protocol's error shape too.
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        # A server bug: answered in the protocol's error shape, as on the infer route. Starlette re-raises it after
        # this response, and ``HttpFrontEnd`` stops it there so the client's connection stays usable.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(core.server_metadata())

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200 if core.live else 503)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if core.is_ready() else 503)

    # Registered before "/v2/models/{model}" so the literal "stats" is not taken for a model name.
    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_statistics(model: str = "", version: str = "") -> Response:
        return _json(core.model_statistics(model, version))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = "") -> Response:
        return _json(core.model_metadata(model, version))

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "") -> Response:
        return Response(status_code=200 if core.model_ready(model, version) else 400)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = "") -> Response:
        return _json(core.model_config(model, version))

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await _json_body(request)
        return _json(core.repository_index(ready_only=decode_index_request(body)))

    @app.post("/v2/repository/models/{model}/load")
    async def load_model(model: str, request: Request) -> Response:
        override, files = decode_load_request(await _json_body(request))
        await core.load_model(model, override, files)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{model}/unload")
    async def unload_model(model: str, request: Request) -> Response:
        # Triton's ``parameters.unload_dependents`` is accepted; models here have no dependents (no ensembles).
        await _json_body(request)
        await core.unload_model(model)
        return Response(status_code=200)

    @app.post("/v2/models/{model}/generate")
    @app.post("/v2/models/{model}/versions/{version}/generate")
    async def generate(model: str, request: Request, version: str = "") -> Response:
        infer_request = await _generate_request(core, request, model, version, stream=False)
        return _json(encode_generate_response(await core.infer(infer_request)))

    @app.post("/v2/models/{model}/generate_stream")
    @app.post("/v2/models/{model}/versions/{version}/generate_stream")
    async def generate_stream(model: str, request: Request, version: str = "") -> Response:
        infer_request = await _generate_request(core, request, model, version, stream=True)
        responses = core.stream_infer(infer_request)
        try:
            first = await anext(responses)
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[bytes]:
            # Errors before the first event are HTTP errors; after it, the stream can only carry them as an event.
            try:
                if first is not None:
                    yield b"data: " + orjson.dumps(encode_generate_response(first)) + b"\n\n"
                async for response in responses:
                    yield b"data: " + orjson.dumps(encode_generate_response(response)) + b"\n\n"
            except ModelDockError as exc:
                yield b"data: " + orjson.dumps({"error": exc.message}) + b"\n\n"
            finally:
                await responses.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{name}/status")
    async def system_shared_memory_status(name: str = "") -> Response:
        return _json(core.shared_memory.status(name))

    @app.post("/v2/systemsharedmemory/region/{name}/register")
    async def register_system_shared_memory(name: str, request: Request) -> Response:
        body = await _json_body(request)
        core.shared_memory.register(name, body.get("key"), body.get("offset", 0), body.get("byte_size"))
        return Response(status_code=200)

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{name}/unregister")
    async def unregister_system_shared_memory(name: str = "") -> Response:
        core.shared_memory.unregister(name)
        return Response(status_code=200)

    @app.get("/v2/logging")
    async def log_settings() -> Response:
        return _json(core.log_settings())

    @app.post("/v2/logging")
    async def update_log_settings(request: Request) -> Response:
        return _json(core.update_log_settings(await _json_body(request)))

    @app.get("/v2/trace/setting")
    @app.get("/v2/models/{model}/trace/setting")
    async def trace_settings(model: str = "") -> Response:
        return _json(core.trace_settings(model))

    @app.post("/v2/trace/setting")
    @app.post("/v2/models/{model}/trace/setting")
    async def update_trace_settings(request: Request, model: str = "") -> Response:
        return _json(core.update_trace_settings(await _json_body(request), model))

    @app.get("/v2/cudasharedmemory/status")
    @app.get("/v2/cudasharedmemory/region/{name}/status")
    @app.post("/v2/cudasharedmemory/region/{name}/register")
    @app.post("/v2/cudasharedmemory/unregister")
    @app.post("/v2/cudasharedmemory/region/{name}/unregister")
    async def cuda_shared_memory(name: str = "") -> Response:
        raise Unsupported("CUDA shared memory is not supported by this server; use system shared memory")

    return HttpFrontEnd(core, app, guard)
