"""The HTTP server program that runs the front end in the server's event loop: granian (the default) or uvicorn.

Both run ``HttpFrontEnd`` in the same event loop as the gRPC front end and the schedulers. granian parses HTTP and
writes responses in Rust threads and hands the event loop each request through its RSGI interface, which
``HttpFrontEnd`` answers itself on the infer route; uvicorn parses and writes in the event loop (httptools
underneath) and speaks ASGI. On small requests granian leaves more of the loop's one core to inference
(``bench/README.md`` has the numbers). ``--http-server`` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from enum import Enum
from typing import Protocol

import uvicorn
from starlette.types import ASGIApp

from server.frontends.rsgi_bridge import RsgiBridge


class HttpServerKind(str, Enum):
    UVICORN = "uvicorn"
    GRANIAN = "granian"


class HttpListener(Protocol):
    async def serve(self) -> None:
        """Listen and answer until ``stop`` is called (or the process is told to stop)."""

    def stop(self, force: bool = False) -> None:
        """Stop accepting connections; ``serve`` returns once the open ones are done (at once when ``force``)."""


class _UvicornWithoutSignals(uvicorn.Server):
    """uvicorn, minus its own signal handling: it would stop listening at the first signal, before the drain that
    the runtime runs on SIGTERM/SIGINT (``server.shutdown``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class UvicornListener:
    def __init__(self, app: ASGIApp, host: str, port: int, log_level: str) -> None:
        self._server = _UvicornWithoutSignals(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level.lower(),
                # uvicorn's records go to the root handler with everyone else's, under the same log settings.
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_keep_alive=30,
                # Nothing reads the client's address, so X-Forwarded-For need not be parsed on every request.
                proxy_headers=False,
            )
        )

    async def serve(self) -> None:
        await self._server.serve()

    def stop(self, force: bool = False) -> None:
        self._server.should_exit = True
        self._server.force_exit = force


class GranianListener:
    """granian's embedded server: its Rust threads parse and write HTTP and feed RSGI calls into this event loop.
    An application with an ``__rsgi__`` of its own (``HttpFrontEnd``) gets them as they are; any other ASGI
    application runs through ``RsgiBridge``. Like uvicorn here, it leaves SIGTERM/SIGINT to the runtime, which
    drains before stopping it."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        from granian.constants import Interfaces
        from granian.server.embed import Server

        self._server = Server(
            app if hasattr(app, "__rsgi__") else RsgiBridge(app),
            address=host,
            port=port,
            interface=Interfaces.RSGI,
            websockets=False,
            # granian's logging setup would replace the server's own; its records reach the root handler instead.
            log_enabled=False,
        )
        self._forced = False

    async def serve(self) -> None:
        try:
            await self._server.serve()
        except asyncio.CancelledError:
            if not self._forced:
                raise

    def stop(self, force: bool = False) -> None:
        self._server.stop()
        if force:
            # granian's stop waits for every open request; cut short, its worker is cancelled instead, and the
            # connections still waiting close with the process.
            self._forced = True
            for worker in self._server.wrks:
                worker.kill()


def create_http_listener(kind: HttpServerKind, app: ASGIApp, host: str, port: int, log_level: str) -> HttpListener:
    if kind == HttpServerKind.GRANIAN:
        return GranianListener(app, host, port)
    return UvicornListener(app, host, port, log_level)
