"""The ``modeldock`` command line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from server.runtime import ServeSettings, serve

app = typer.Typer(name="modeldock", help="Serve models from a repository folder over KServe v2 HTTP and gRPC.",
                  no_args_is_help=True, add_completion=False)


@app.command("serve")
def serve_command(
    model_repository: Annotated[
        list[Path], typer.Option("--model-repository", "-m", help="Model repository folder (repeatable).")
    ] = [Path("model_repository")],  # noqa: B006 - typer needs a literal default
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP (KServe v2 REST) port.")] = 8000,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Start the server on a model repository."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(model_repositories=model_repository, host=host, http_port=http_port, log_level=log_level)
    asyncio.run(serve(settings))


@app.callback()
def _main() -> None:
    """ModelDock: multi-backend model serving."""


if __name__ == "__main__":
    app()
