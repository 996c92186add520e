"""The ASGI front end served through granian's RSGI interface.

granian can call an application two ways. Through its ASGI interface every request becomes message dicts built
and read in Rust, which cost more CPU per request on the event loop than uvicorn does (``bench/README.md``).
Through RSGI, Python gets the request head as one object, reads the body with one await and hands the response
over in one call, and the HTTP parsing and writing stay on granian's Rust threads. ``RsgiBridge`` translates
between that interface and ASGI in the fewest steps an ASGI application allows, so ``HttpFrontEnd`` (and the
FastAPI routes behind it) run unchanged: a one-message body is read with one call, and a response whose body comes
in one message is written with one call. Bodies sent in chunks and streamed responses (server-sent events) travel
chunk by chunk. granian passes on only header values that are visible ASCII text, so the ASGI scope holds only
those.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT: Message = {"type": "http.disconnect"}


def _address(text: str) -> tuple[str, int] | None:
    """RSGI's ``"host:port"`` as ASGI's ``(host, port)``; IPv6 hosts keep their colons."""
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def asgi_scope(scope: Any) -> dict[str, Any]:
    """The ASGI HTTP scope of an RSGI request.

    RSGI's path is the request target as sent (percent-encoded); ASGI's ``path`` is decoded, its ``raw_path`` not.
    """
    raw_path = scope.path
    return {
        "type": "http",
        "asgi": _ASGI,
        "http_version": scope.http_version,
        "method": scope.method,
        "scheme": scope.scheme,
        "path": unquote(raw_path) if "%" in raw_path else raw_path,
        "raw_path": raw_path.encode("latin-1", "replace"),
        "query_string": scope.query_string.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [
            (name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
            for name, value in scope.headers.items()
        ],
        "client": _address(scope.client),
        "server": _address(scope.server),
    }


class _Exchange:
    """One request's ``receive`` and ``send``, over its RSGI protocol object."""

    __slots__ = ("protocol", "chunked", "body_read", "chunks", "status", "headers", "stream", "done")

    def __init__(self, protocol: Any, chunked: bool) -> None:
        self.protocol = protocol
        self.chunked = chunked
        self.body_read = False
        self.chunks: Any = None
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.stream: Any = None
        self.done = False

    async def receive(self) -> Message:
        if not self.body_read:
            if not self.chunked:
                # A declared length: the server holds the body to it, and one read returns all of it.
                self.body_read = True
                try:
                    body = await self.protocol()
                except Exception:
                    return _DISCONNECT
                return {"type": "http.request", "body": body, "more_body": False}
            # Chunked: passed on as it arrives, so the front end can count it against its size limit.
            if self.chunks is None:
                self.chunks = self.protocol.__aiter__()
            try:
                chunk = await self.chunks.__anext__()
            except StopAsyncIteration:
                self.body_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
            except Exception:
                self.body_read = True
                return _DISCONNECT
            return {"type": "http.request", "body": bytes(chunk), "more_body": True}
        if self.done:
            return _DISCONNECT
        # After the body the only message left is the client going away.
        await self.protocol.client_disconnect()
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in message.get("headers", ())
            ]
        elif kind == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.stream is None:
                if not more:
                    self.protocol.response_bytes(self.status, self.headers, body)
                    self.done = True
                    return
                self.stream = self.protocol.response_stream(self.status, self.headers)
            if body:
                try:
                    await self.stream.send_bytes(body)
                except Exception as exc:
                    # ASGI 2.4: a send to a client that has gone away raises OSError, which ends the app's stream.
                    raise OSError(f"the client disconnected: {exc}") from exc
            if not more:
                self.done = True


class RsgiBridge:
    """An RSGI application that runs an ASGI one (HTTP only: the server is started without websockets)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        asgi = asgi_scope(scope)
        exchange = _Exchange(protocol, chunked=scope.headers.get("content-length") is None)
        try:
            await self.app(asgi, exchange.receive, exchange.send)
        finally:
            if not exchange.done and exchange.stream is None:
                # The app returned without a response (or failed before one): the client still gets an answer.
                protocol.response_empty(500, [])
