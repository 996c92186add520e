"""The ``modeldock`` command line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from server.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
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
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC (KServe v2) port.")] = 8001,
    grpc_max_message_bytes: Annotated[
        int,
        typer.Option("--grpc-max-message-bytes", min=1, help="Largest gRPC message sent or received, in bytes."),
    ] = DEFAULT_MAX_MESSAGE_BYTES,
) -> None:
    """Start the server on a model repository."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(model_repositories=model_repository, host=host, http_port=http_port, log_level=log_level)
    settings.grpc_port = grpc_port
    settings.grpc_max_message_bytes = grpc_max_message_bytes
    asyncio.run(serve(settings))


@app.callback()
def _main() -> None:
    """ModelDock: multi-backend model serving."""


if __name__ == "__main__":
    app()
