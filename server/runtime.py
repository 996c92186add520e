"""Starts the front ends and the model manager in one event loop, and shuts them down in order."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.table import Table

from server.core import InferenceServer, ModelControlMode
from server.http_server import create_app
from server.model_manager import ModelManager
from server.repository import ModelRepository
from server.repository_watcher import RepositoryWatcher

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_repositories: list[Path]
    host: str = "0.0.0.0"
    http_port: int = 8000
    log_level: str = "info"
    model_control_mode: ModelControlMode = ModelControlMode.POLL
    repository_poll_secs: float = 2.0
    # Explicit mode: the models loaded at start-up ("*" for all of them).
    load_models: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)


def print_banner(core: InferenceServer, settings: ServeSettings, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    table = Table(title="ModelDock models", title_justify="left")
    table.add_column("Model")
    table.add_column("Version")
    table.add_column("State")
    table.add_column("Reason", overflow="fold")
    for row in core.repository_index():
        style = "green" if row["state"] == "READY" else "red"
        table.add_row(row["name"], row["version"], f"[{style}]{row['state']}[/{style}]", row["reason"])
    console.print(table)
    console.print(f"HTTP  KServe v2 endpoint: http://{settings.host}:{settings.http_port}/v2")


async def load_initial_models(manager: ModelManager, settings: ServeSettings) -> None:
    """Everything in poll and none modes; only the ``--load-model`` names in explicit mode, as in Triton."""
    if settings.model_control_mode != ModelControlMode.EXPLICIT or "*" in settings.load_models:
        await manager.load_all()
        return
    results = await asyncio.gather(*(manager.load(name) for name in settings.load_models), return_exceptions=True)
    for name, result in zip(settings.load_models, results, strict=True):
        if isinstance(result, BaseException):
            log.error("--load-model %s: %s", name, result)


async def serve(settings: ServeSettings) -> None:
    manager = ModelManager(ModelRepository(settings.model_repositories))
    core = InferenceServer(manager, settings.model_control_mode)
    watcher: asyncio.Task[None] | None = None
    app = create_app(core)
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
        )
    )
    # Listen first so liveness answers while models load; readiness waits for the load to finish.
    http_task = asyncio.create_task(http.serve())
    try:
        polling = settings.model_control_mode == ModelControlMode.POLL
        poll = RepositoryWatcher(manager, settings.repository_poll_secs) if polling else None
        if poll is not None:
            await poll.prime()
        await load_initial_models(manager, settings)
        core.started = True
        if poll is not None:
            watcher = asyncio.create_task(poll.run())
        print_banner(core, settings)
        await http_task
    finally:
        core.live = False
        if watcher is not None:
            watcher.cancel()
        http.should_exit = True
        if not http_task.done():
            await asyncio.wait_for(http_task, timeout=10)
        await manager.close()
