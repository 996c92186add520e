"""The ``modeldock`` command line."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:  # the faster event loop from uvicorn[standard]; plain asyncio where it is missing (Windows)
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

from server.allocator import tune_malloc
from server.core import ModelControlMode
from server.errors import ConfigError, ModelDockError
from server.extensions.log_settings import LOG_LEVELS
from server.extensions.tracing import TraceConfig
from server.frontends.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from server.frontends.http_listener import HttpServerKind
from server.frontends.openai.app import API_KEY_ENV
from server.frontends.restrictions import ApiGroup, Restrictions, RestrictionSpecError
from server.protocol.limits import RequestLimits
from server.repository.validate import validate_repositories
from server.runtime import ServeSettings, serve
from server.scheduling.response_cache import parse_cache_config

app = typer.Typer(
    name="modeldock",
    help="Serve models from a repository folder over KServe v2 HTTP and gRPC.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("serve")
def serve_command(
    model_repository: Annotated[
        list[Path], typer.Option("--model-repository", "-m", help="Model repository folder (repeatable).")
    ] = [Path("model_repository")],  # noqa: B006 - typer needs a literal default
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP (KServe v2 REST) port.")] = 8000,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="Port serving Prometheus /metrics (0: only on the HTTP port).")
    ] = 8002,
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
        list[str],
        typer.Option("--load-model", help="Explicit mode: a model to load at start-up (repeatable; '*' for all)."),
    ] = [],  # noqa: B006 - typer needs a literal default
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC (KServe v2) port.")] = 8001,
    grpc_max_message_bytes: Annotated[
        int,
        typer.Option("--grpc-max-message-bytes", min=1, help="Largest gRPC message sent or received, in bytes."),
    ] = DEFAULT_MAX_MESSAGE_BYTES,
    openai_api_key: Annotated[
        str | None,
        typer.Option(
            "--openai-api-key",
            envvar=API_KEY_ENV,
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on the OpenAI-compatible routes (/v1).",
        ),
    ] = None,
    cache_config: Annotated[
        list[str],
        typer.Option(
            "--cache-config",
            help="Response cache, as Triton: local,size=<bytes> (models opt in with response_cache: {enable: true}).",
        ),
    ] = [],  # noqa: B006 - typer needs a literal default
    http_restricted_api: Annotated[
        list[str],
        typer.Option(
            "--http-restricted-api",
            help="GROUP[,GROUP...]:HEADER=VALUE: these API groups need the header (repeatable). Groups: "
            + ", ".join(g.value for g in ApiGroup),
        ),
    ] = [],  # noqa: B006 - typer needs a literal default
    grpc_restricted_protocol: Annotated[
        list[str],
        typer.Option("--grpc-restricted-protocol", help="GROUP[,GROUP...]:HEADER=VALUE, as --http-restricted-api."),
    ] = [],  # noqa: B006 - typer needs a literal default
    http_max_body_bytes: Annotated[
        int, typer.Option("--http-max-body-bytes", min=1, help="Largest HTTP request body, in bytes (413 beyond).")
    ] = RequestLimits.http_max_body_bytes,
    max_header_bytes: Annotated[
        int, typer.Option("--max-header-bytes", min=1024, help="Largest HTTP headers / gRPC metadata, in bytes.")
    ] = RequestLimits.max_header_bytes,
    max_inputs: Annotated[
        int, typer.Option("--max-inputs", min=1, help="Most input tensors in one inference request.")
    ] = RequestLimits.max_inputs,
    max_tensor_elements: Annotated[
        int, typer.Option("--max-tensor-elements", min=1, help="Most elements in one input tensor.")
    ] = RequestLimits.max_tensor_elements,
    request_timeout_secs: Annotated[
        float,
        typer.Option(
            "--request-timeout-secs",
            min=0,
            help="Longest an inference request may take end to end (0: unbounded). A hung instance is replaced.",
        ),
    ] = 0.0,
    http_cors_origin: Annotated[
        list[str],
        typer.Option("--http-cors-origin", help="Origin allowed to call the HTTP API from a browser (repeatable)."),
    ] = [],  # noqa: B006 - typer needs a literal default
    trace_config: Annotated[
        list[str],
        typer.Option(
            "--trace-config",
            help="Triton's trace settings: level=TIMESTAMPS, rate=N, count=N, opentelemetry,url=URL (repeatable).",
        ),
    ] = [],  # noqa: B006 - typer needs a literal default
    log_format: Annotated[
        str, typer.Option("--log-format", help="default, ISO8601, or json (one object a line, with request ids).")
    ] = "default",
    http_server: Annotated[
        HttpServerKind,
        typer.Option(
            "--http-server",
            envvar="MODELDOCK_HTTP_SERVER",
            help="HTTP server running the front end: granian (Rust, the faster) or uvicorn (Python).",
        ),
    ] = HttpServerKind.GRANIAN,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="Run model instances as actors on a Ray cluster: ADDRESS (host:port, 'auto', ray://...), or none "
            "for Ray's own choice (RAY_ADDRESS, this machine's cluster, else a new local one). Needs modeldock[ray].",
        ),
    ] = None,
    console: Annotated[
        bool,
        typer.Option("--console/--no-console", help="Serve the web console at /console on the HTTP port."),
    ] = True,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout",
            min=0,
            help="On SIGTERM/SIGINT, seconds requests in flight get to finish before the server exits anyway.",
        ),
    ] = 30.0,
) -> None:
    """Start the server on a model repository."""
    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"--log-level {log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    try:
        cache = parse_cache_config(cache_config)
    except ConfigError as exc:
        raise typer.BadParameter(exc.message) from None
    settings = ServeSettings(
        model_repositories=model_repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        grpc_max_message_bytes=grpc_max_message_bytes,
        metrics_port=metrics_port,
        log_level=log_level,
    )
    settings.model_control_mode = model_control_mode
    settings.repository_poll_secs = repository_poll_secs
    settings.load_models = load_model
    settings.openai_api_key = openai_api_key or None
    settings.cache = cache
    try:
        settings.http_restrictions = Restrictions.parse(http_restricted_api, "--http-restricted-api")
        settings.grpc_restrictions = Restrictions.parse(grpc_restricted_protocol, "--grpc-restricted-protocol")
    except RestrictionSpecError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings.limits = RequestLimits(http_max_body_bytes, max_header_bytes, max_inputs, max_tensor_elements)
    settings.request_timeout_s = request_timeout_secs
    settings.cors_origins = http_cors_origin
    if log_format not in ("default", "ISO8601", "json"):
        raise typer.BadParameter(f"--log-format {log_format!r}: expected default, ISO8601 or json")
    settings.log_format = log_format
    try:
        settings.trace_config = TraceConfig.parse(trace_config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ModelDockError as exc:
        raise typer.BadParameter(f"--trace-config: {exc.message}") from None
    settings.http_server = http_server
    settings.shutdown_timeout_s = shutdown_timeout
    settings.console = console
    if ray is not None and importlib.util.find_spec("ray") is None:
        Console(stderr=True).print(escape('--ray needs Ray: pip install "modeldock[ray]"'))
        raise typer.Exit(code=2)
    settings.ray_address = ray
    tune_malloc()
    status = uvloop.run(serve(settings)) if uvloop is not None else asyncio.run(serve(settings))
    if status:
        # A drain cut short may leave a batch running on an instance thread, which a normal exit would wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _parse_shapes(values: list[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, _, dims = value.partition(":")
        try:
            shapes[name] = [int(d) for d in dims.split(",") if d]
        except ValueError:
            raise typer.BadParameter(f"--shape {value!r}: expected NAME:DIM,DIM,...") from None
        if not name:
            raise typer.BadParameter(f"--shape {value!r}: expected NAME:DIM,DIM,...")
    return shapes


@app.command("perf")
def perf_command(
    model: Annotated[str, typer.Argument(help="Model to load-test.")],
    url: Annotated[str, typer.Option("--url", "-u", help="Server address, host:port.")] = "localhost:8000",
    protocol: Annotated[str, typer.Option("--protocol", "-i", help="http or grpc.")] = "http",
    model_version: Annotated[str, typer.Option("--model-version", "-x", help="Version (default: newest).")] = "",
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="Comma-separated concurrency levels to sweep.")
    ] = "1,2,4,8",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size of each request.")] = 1,
    window: Annotated[float, typer.Option("--window", help="Measurement window per level, seconds.")] = 5.0,
    warmup: Annotated[float, typer.Option("--warmup", help="Warm-up before each window, seconds.")] = 1.0,
    shape: Annotated[
        list[str], typer.Option("--shape", help="NAME:D1,D2 sizes for an input's variable dims (repeatable).")
    ] = [],  # noqa: B006 - typer needs a literal default
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Write the CSV and PNG plot here.")
    ] = None,
) -> None:
    """Measure throughput and latency of a running server over a concurrency sweep (like perf_analyzer)."""
    from pydantic import ValidationError

    from server.perf import PerfSettings, run_perf

    # The clients and the plot come from the perf extra, which a server-only install leaves out.
    missing = [name for name in ("tritonclient", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        Console(stderr=True).print(
            escape(f'modeldock perf needs {" and ".join(missing)}: pip install "modeldock[perf]"')
        )
        raise typer.Exit(code=2)

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise typer.BadParameter(f"--concurrency {concurrency!r}: expected e.g. 1,2,4,8") from None
    if not levels or any(c < 1 for c in levels):
        raise typer.BadParameter("--concurrency needs positive integers")
    try:
        settings = PerfSettings(
            model=model,
            url=url,
            protocol=protocol,
            model_version=model_version,
            concurrency=levels,
            batch_size=batch_size,
            window_s=window,
            warmup_s=warmup,
            shapes=_parse_shapes(shape),
            output_dir=output_dir,
        )
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_perf(settings)


@app.command("validate")
def validate_command(
    paths: Annotated[list[Path], typer.Argument(help="Model repository folders to check.")],
) -> None:
    """Check model repositories (configs, backends, version folders, model files) without serving them."""
    models, problems = validate_repositories(paths)
    console = Console()
    if not problems:
        console.print(f"[green]OK[/green]: {len(models)} model(s) valid: {escape(', '.join(models))}")
        return
    table = Table(title=f"{len(problems)} problem(s) in {len(models)} model(s)", title_justify="left")
    table.add_column("Model")
    table.add_column("File", overflow="fold")
    table.add_column("Problem", overflow="fold")
    for problem in problems:
        # Escaped: messages hold brackets, such as the 'pip install "modeldock[tensorrt]"' hint, that rich would
        # otherwise take for markup and drop.
        table.add_row(escape(problem.model), escape(problem.file), escape(problem.reason))
    console.print(table)
    raise typer.Exit(code=1)


@app.callback()
def _main() -> None:
    """ModelDock: multi-backend model serving."""


def _ray_address_optional(args: list[str]) -> list[str]:
    """Typer options always take a value, so ``--ray`` followed by nothing or another option becomes ``--ray=``
    (Ray's own choice of cluster), which lets ``serve --ray`` and ``serve --ray ADDRESS`` both work."""
    return [
        "--ray=" if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")) else arg
        for i, arg in enumerate(args)
    ]


def main() -> None:
    """The ``modeldock`` command."""
    app(args=_ray_address_optional(sys.argv[1:]), prog_name="modeldock")


if __name__ == "__main__":
    main()
