"""The ``modeldock`` command line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.core import ModelControlMode
from server.runtime import ServeSettings, serve
from server.validate import validate_repositories

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
    model_control_mode: Annotated[
        ModelControlMode,
        typer.Option(
            "--model-control-mode",
            help="poll: follow the repository folders; none: load once at start-up; explicit: load/unload API.",
        ),
    ] = ModelControlMode.POLL,
    repository_poll_secs: Annotated[
        float, typer.Option("--repository-poll-secs", min=0.05, help="Seconds between repository scans (poll mode).")
    ] = 2.0,
    load_model: Annotated[
        list[str], typer.Option("--load-model", help="Explicit mode: a model to load at start-up (repeatable; '*' for all).")
    ] = [],  # noqa: B006 - typer needs a literal default
) -> None:
    """Start the server on a model repository."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(model_repositories=model_repository, host=host, http_port=http_port, log_level=log_level)
    settings.model_control_mode = model_control_mode
    settings.repository_poll_secs = repository_poll_secs
    settings.load_models = load_model
    asyncio.run(serve(settings))


@app.command("validate")
def validate_command(
    paths: Annotated[list[Path], typer.Argument(help="Model repository folders to check.")],
) -> None:
    """Check model repositories (configs, backends, version folders, model files) without serving them."""
    models, problems = validate_repositories(paths)
    console = Console()
    if not problems:
        console.print(f"[green]OK[/green]: {len(models)} model(s) valid: {', '.join(models)}")
        return
    table = Table(title=f"{len(problems)} problem(s) in {len(models)} model(s)", title_justify="left")
    table.add_column("Model")
    table.add_column("File", overflow="fold")
    table.add_column("Problem", overflow="fold")
    for problem in problems:
        table.add_row(problem.model, problem.file, problem.reason)
    console.print(table)
    raise typer.Exit(code=1)


@app.callback()
def _main() -> None:
    """ModelDock: multi-backend model serving."""


if __name__ == "__main__":
    app()
