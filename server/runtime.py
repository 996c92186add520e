"""Starts the front ends and the model manager in one event loop, and shuts them down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from server.core import InferenceServer, ModelControlMode
from server.errors import ModelDockError
from server.extensions.log_settings import LogSettings, ServerLogging
from server.extensions.tracing import RequestTracing, TraceConfig
from server.frontends.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, create_grpc_server
from server.frontends.http_guard import HttpGuard
from server.frontends.http_listener import HttpServerKind, create_http_listener
from server.frontends.http_server import create_app
from server.frontends.restrictions import Restrictions
from server.protocol.limits import RequestLimits
from server.protocol.limits import configure as configure_limits
from server.repository.discovery import ModelRepository
from server.repository.model_manager import ModelManager
from server.repository.watcher import RepositoryWatcher
from server.scheduling.instances import place_instances_remotely
from server.scheduling.response_cache import CacheSettings, ResponseCache
from server.shutdown import ShutdownSignals, drain
from server.worker_processes import import_path_editing_libraries

log = logging.getLogger(__name__)

# When the drain was cut short, how long the models then get to unload before the process exits regardless.
_UNLOAD_AFTER_TIMEOUT_S = 5.0


@dataclass
class ServeSettings:
    model_repositories: list[Path]
    host: str = "0.0.0.0"
    http_port: int = 8000
    # Prometheus metrics on their own port as Triton does; 0 leaves them on the HTTP port's /metrics only.
    metrics_port: int = 8002
    log_level: str = "info"
    grpc_port: int = 8001
    grpc_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    model_control_mode: ModelControlMode = ModelControlMode.POLL
    repository_poll_secs: float = 2.0
    # Explicit mode: the models loaded at start-up ("*" for all of them).
    load_models: list[str] = field(default_factory=list)
    # When set, every OpenAI-compatible route (/v1) wants ``Authorization: Bearer <key>``.
    openai_api_key: str | None = None
    # The server-wide response cache (``--cache-config local,size=N``); None: no model's responses are cached.
    cache: CacheSettings | None = None
    # Triton's --http-restricted-api / --grpc-restricted-protocol, already parsed.
    http_restrictions: Restrictions = field(default_factory=Restrictions)
    grpc_restrictions: Restrictions = field(default_factory=Restrictions)
    limits: RequestLimits = field(default_factory=RequestLimits)
    # The longest an inference request may take end to end, in seconds (0: no server-wide bound).
    request_timeout_s: float = 0.0
    # Origins allowed to call the HTTP API from a browser; CORS stays off while this is empty.
    cors_origins: list[str] = field(default_factory=list)
    trace_config: TraceConfig = field(default_factory=TraceConfig)
    log_format: str = "default"
    http_server: HttpServerKind = HttpServerKind.GRANIAN
    # On SIGTERM/SIGINT: how long requests in flight (executing or queued) get to finish before the server exits.
    shutdown_timeout_s: float = 30.0
    # ``--ray``: None keeps model instances in this process; "" lets Ray choose the cluster; else its address.
    ray_address: str | None = None
    # The web console at /console on the HTTP port (``--no-console`` turns it off).
    console: bool = True


def print_banner(core: InferenceServer, settings: ServeSettings, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    table = Table(title="ModelDock models", title_justify="left")
    table.add_column("Model")
    table.add_column("Version")
    table.add_column("State")
    table.add_column("Reason", overflow="fold")
    for row in core.repository_index():
        style = "green" if row["state"] == "READY" else "red"
        table.add_row(row["name"], row["version"], f"[{style}]{row['state']}[/{style}]", escape(row["reason"]))
    console.print(table)
    if settings.metrics_port:
        console.print(f"Prometheus metrics:      http://{settings.host}:{settings.metrics_port}/metrics")
    console.print(f"HTTP  KServe v2 endpoint: http://{settings.host}:{settings.http_port}/v2")
    console.print(f"gRPC  KServe v2 endpoint: {settings.host}:{settings.grpc_port}")
    console.print(f"HTTP  OpenAI endpoint:    http://{settings.host}:{settings.http_port}/v1")
    if settings.console:
        console.print(f"Web console:             http://{settings.host}:{settings.http_port}/console")


async def load_initial_models(manager: ModelManager, settings: ServeSettings) -> None:
    """Everything in poll and none modes; only the ``--load-model`` names in explicit mode, as in Triton."""
    if settings.model_control_mode != ModelControlMode.EXPLICIT or "*" in settings.load_models:
        await manager.load_all()
        return
    results = await asyncio.gather(*(manager.load(name) for name in settings.load_models), return_exceptions=True)
    for name, result in zip(settings.load_models, results, strict=True):
        if isinstance(result, BaseException):
            log.error("--load-model %s: %s", name, result)


# Net new container objects between young-generation collections (CPython's default is 700, a collection every few
# requests under load). Objects a request leaves in reference cycles (asyncio tasks and futures) wait for the next
# one, so a much higher budget holds more garbage: at 50 000 the server's memory grew by ~10 MiB under load, at
# 10 000 it stays flat (bench/README.md).
GC_YOUNG_THRESHOLD = 10_000


def keep_gc_off_the_hot_path() -> None:
    """Move what start-up built (modules, configs, models) out of the collector's sight and collect young objects
    less often: full collections then scan only what serving allocated, and requests rarely pay for one."""
    gc.collect()
    gc.freeze()
    # A full collection only runs once the old generation has grown by a quarter of what the last one found; after
    # this (empty) one that is a quarter of what serving keeps, not of everything start-up built, so garbage that
    # outlived a young collection is still freed promptly and memory stays flat.
    gc.collect()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def serve(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; the exit status: 0, or 1 if the drain was cut short
    (``--shutdown-timeout`` or a second signal) or a model would not unload."""
    log_settings = LogSettings.for_level(settings.log_level).model_copy(update={"log_format": settings.log_format})
    server_logging = ServerLogging(log_settings)
    server_logging.install()
    try:
        tracing = RequestTracing(settings.trace_config)
    except ModelDockError as exc:
        raise SystemExit(exc.message) from None
    if settings.ray_address is not None:
        # Before the front ends start and before the shutdown's signal handlers replace the SIGTERM handler
        # ray.init installs; it blocks, but nothing is served yet.
        from server.scheduling import ray_instances

        try:
            place_instances_remotely(ray_instances.connect(settings.ray_address or None))
        except Exception as exc:  # unreachable, or refused: nothing to serve with, so a clear exit
            where = settings.ray_address or "(Ray's default)"
            raise SystemExit(f"--ray {where}: cannot join the Ray cluster: {type(exc).__name__}: {exc}") from None
    import_path_editing_libraries()
    cache = ResponseCache(settings.cache.size_bytes) if settings.cache is not None else None
    manager = ModelManager(ModelRepository(settings.model_repositories), cache)
    configure_limits(settings.limits)
    core = InferenceServer(manager, settings.model_control_mode, server_logging, tracing)
    core.request_timeout_s = settings.request_timeout_s
    watcher: asyncio.Task[None] | None = None
    app: ASGIApp = create_app(
        core, HttpGuard(settings.http_restrictions, settings.limits), settings.openai_api_key, settings.console
    )
    if settings.cors_origins:
        app = CORSMiddleware(app, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if settings.metrics_port:
        try:
            core.metrics.serve(settings.host, settings.metrics_port)
        except OSError as exc:
            message = f"cannot serve metrics on port {settings.metrics_port}: {exc} (--metrics-port 0 disables them)"
            raise SystemExit(message) from None
    http = create_http_listener(settings.http_server, app, settings.host, settings.http_port, settings.log_level)
    signals = ShutdownSignals()
    signals.install()
    # Keep the port actually bound, so the banner is right when port 0 asked for any free one.
    grpc_server, settings.grpc_port = create_grpc_server(
        core, settings.host, settings.grpc_port, settings.grpc_max_message_bytes, settings.grpc_restrictions
    )
    # Listen first so liveness answers while models load; readiness waits for the load to finish.
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    stop_requested = asyncio.create_task(signals.requested.wait())

    async def start_up() -> None:
        nonlocal watcher
        polling = settings.model_control_mode == ModelControlMode.POLL
        poll = RepositoryWatcher(manager, settings.repository_poll_secs) if polling else None
        if poll is not None:
            await poll.prime()
        await load_initial_models(manager, settings)
        core.started = True
        if poll is not None:
            watcher = asyncio.create_task(poll.run())
        if settings.log_format == "json":  # the table is for people; log collectors get a record
            log.info(
                "serving %s", ", ".join(f"{r['name']}:{r['version']}:{r['state']}" for r in core.repository_index())
            )
        else:
            print_banner(core, settings)
        keep_gc_off_the_hot_path()

    try:
        # A signal during the start-up load stops it rather than waiting for every model to finish loading.
        starting = asyncio.create_task(start_up())
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        if not starting.cancelled():
            starting.result()
            await asyncio.wait({http_task, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if http_task.done():
            http_task.result()  # the HTTP server stopped by itself: its error (a port in use) is the server's
    finally:
        stop_requested.cancel()
        drained = await drain(core, settings.shutdown_timeout_s, signals.forced)
        core.live = False
        if watcher is not None:
            watcher.cancel()
        # Cut short, connections still waiting on a request are closed instead of waited for.
        http.stop(force=not drained)
        if not http_task.done():
            await asyncio.wait({http_task}, timeout=10)
        await grpc_server.stop(grace=5 if drained else 0)
        core.shared_memory.unregister_all()
        try:
            # After a cut-short drain a batch may still be executing: unloading would wait for it, so it is bounded.
            await asyncio.wait_for(manager.close(), None if drained else _UNLOAD_AFTER_TIMEOUT_S)
        except TimeoutError:
            log.error("models did not unload within %.0fs of the shutdown timeout", _UNLOAD_AFTER_TIMEOUT_S)
            drained = False
        tracing.shutdown()
        signals.remove()
        if settings.ray_address is not None:
            place_instances_remotely(None)
            ray_instances.disconnect()
    log.info("shutdown complete" if drained else "shutdown cut short")
    return 0 if drained else 1
