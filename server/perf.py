"""``modeldock perf``: a perf_analyzer-like load generator against a running server.

Each concurrency level runs that many closed-loop clients (one thread and one connection each, sending the next
request as soon as the previous one answers) for a warm-up and then a measurement window. Request inputs are
random tensors built once from the model's metadata and sent as binary tensor data, so per-request client work is
little more than the network round trip and the client stays out of the way of the server being measured.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

_NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class PerfSettings(BaseModel):
    """What to measure; the command line fills this in."""

    model: str
    url: str = "localhost:8000"
    protocol: str = Field(default="http", pattern="^(http|grpc)$")
    model_version: str = ""
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = Field(default=1, ge=1)
    window_s: float = Field(default=5.0, gt=0)
    warmup_s: float = Field(default=1.0, ge=0)
    # Sizes for variable (-1) non-batch dimensions, per input; unnamed variable dimensions become 1.
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    output_dir: Path | None = None
    seed: int = 0


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    throughput_infer_per_s: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float


@dataclass
class Workload:
    """What every client sends: the same random inputs each time, asking for every output."""

    inputs: list[tuple[str, str, np.ndarray]]
    outputs: list[str]


@dataclass
class _Worker:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


def _client_module(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def make_workload(settings: PerfSettings) -> Workload:
    """One random array per model input, shaped from the server's metadata and config."""
    module = _client_module(settings.protocol)
    client = module.InferenceServerClient(settings.url)
    try:
        metadata = client.get_model_metadata(settings.model, settings.model_version)
        config = client.get_model_config(settings.model, settings.model_version)
    finally:
        client.close()
    if settings.protocol == "grpc":
        from google.protobuf.json_format import MessageToDict

        metadata = MessageToDict(metadata, preserving_proto_field_name=True)
        config = MessageToDict(config, preserving_proto_field_name=True).get("config", {})
    batching = int(config.get("max_batch_size", 0)) > 0
    rng = np.random.default_rng(settings.seed)
    arrays = []
    for tensor in metadata["inputs"]:
        name, datatype = tensor["name"], tensor["datatype"]
        dims = [int(d) for d in tensor["shape"]]
        if batching:
            dims = dims[1:]
        given = settings.shapes.get(name)
        if given is not None:
            if len(given) != len(dims):
                raise ValueError(f"--shape {name}: model input has {len(dims)} non-batch dims, got {len(given)}")
            dims = given
        dims = [1 if d < 0 else d for d in dims]
        shape = ([settings.batch_size] if batching else []) + dims
        if datatype == "BYTES":
            array = np.array([str(v).encode() for v in rng.integers(0, 1000, int(np.prod(shape)))], dtype=np.object_)
            array = array.reshape(shape)
        elif datatype not in _NUMPY_TYPES:
            raise ValueError(f"input '{name}': datatype {datatype} is not supported by perf")
        elif datatype.startswith("FP"):
            array = rng.random(shape).astype(_NUMPY_TYPES[datatype])
        elif datatype == "BOOL":
            array = rng.random(shape) > 0.5
        else:
            array = rng.integers(0, 100, shape).astype(_NUMPY_TYPES[datatype])
        arrays.append((name, datatype, array))
    return Workload(arrays, [tensor["name"] for tensor in metadata["outputs"]])


def _run_client(
    settings: PerfSettings,
    workload: Workload,
    start_at: float,
    end_at: float,
    result: _Worker,
) -> None:
    module = _client_module(settings.protocol)
    client = module.InferenceServerClient(settings.url)
    inputs = []
    for name, datatype, array in workload.inputs:
        tensor = module.InferInput(name, list(array.shape), datatype)
        if settings.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    if settings.protocol == "http":
        outputs = [module.InferRequestedOutput(name, binary_data=True) for name in workload.outputs]
    else:
        outputs = [module.InferRequestedOutput(name) for name in workload.outputs]
    try:
        while True:
            begin = time.perf_counter()
            if begin >= end_at:
                break
            try:
                client.infer(settings.model, inputs, model_version=settings.model_version, outputs=outputs)
            except Exception as exc:  # a failed request is counted and reported, the run goes on
                if begin >= start_at:
                    result.errors += 1
                    result.first_error = result.first_error or str(exc)
                continue
            finished = time.perf_counter()
            if begin >= start_at and finished <= end_at:
                result.latencies.append(finished - begin)
    finally:
        client.close()


def measure_level(
    settings: PerfSettings,
    workload: Workload,
    concurrency: int,
    on_tick: Callable[[float], None] | None = None,
) -> LevelResult:
    """Run ``concurrency`` closed-loop clients; only requests sent and answered inside the window count."""
    start_at = time.perf_counter() + settings.warmup_s
    end_at = start_at + settings.window_s
    workers = [_Worker() for _ in range(concurrency)]
    threads = [
        threading.Thread(target=_run_client, args=(settings, workload, start_at, end_at, w), daemon=True)
        for w in workers
    ]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.1)
        if on_tick is not None:
            on_tick(min(time.perf_counter() - began, settings.warmup_s + settings.window_s))
    latencies = np.array([lat for w in workers for lat in w.latencies]) * 1000
    errors = sum(w.errors for w in workers)
    first_error = next((w.first_error for w in workers if w.first_error), "")
    if errors and not len(latencies):
        raise RuntimeError(f"every request failed at concurrency {concurrency}: {first_error}")
    if not len(latencies):
        return LevelResult(concurrency, 0, errors, 0.0, 0.0, 0.0, 0.0, 0.0)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return LevelResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        throughput_infer_per_s=len(latencies) * settings.batch_size / settings.window_s,
        latency_avg_ms=float(latencies.mean()),
        latency_p50_ms=float(p50),
        latency_p90_ms=float(p90),
        latency_p99_ms=float(p99),
    )


def run_perf(settings: PerfSettings, console: Console | None = None) -> list[LevelResult]:
    """Sweep the concurrency levels with a progress bar, then print, and write CSV and PNG if asked."""
    console = console or Console()
    workload = make_workload(settings)
    results: list[LevelResult] = []
    per_level = settings.warmup_s + settings.window_s
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        total = per_level * len(settings.concurrency)
        overall = progress.add_task(f"{settings.model} over {settings.protocol}", total=total)
        for position, concurrency in enumerate(settings.concurrency):
            done_before = position * per_level
            progress.update(overall, description=f"{settings.model}: concurrency {concurrency}")
            results.append(
                measure_level(
                    settings, workload, concurrency, lambda t, d=done_before: progress.update(overall, completed=d + t)
                )
            )
    console.print(results_table(settings, results))
    if settings.output_dir is not None:
        csv_path, png_path = write_results(settings, results, settings.output_dir)
        console.print(f"wrote {csv_path} and {png_path}")
    return results


def results_table(settings: PerfSettings, results: list[LevelResult]) -> Table:
    table = Table(title=f"{settings.model} ({settings.protocol}, batch size {settings.batch_size})")
    for column in ("Concurrency", "Infer/s", "p50 ms", "p90 ms", "p99 ms", "Avg ms", "Requests", "Errors"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            f"{r.throughput_infer_per_s:,.1f}",
            f"{r.latency_p50_ms:.2f}",
            f"{r.latency_p90_ms:.2f}",
            f"{r.latency_p99_ms:.2f}",
            f"{r.latency_avg_ms:.2f}",
            str(r.requests),
            str(r.errors),
        )
    return table


def write_results(settings: PerfSettings, results: list[LevelResult], output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{settings.model}_{settings.protocol}"
    csv_path = output_dir / f"{stem}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    png_path = output_dir / f"{stem}.png"
    plot_results(settings, results, png_path)
    return csv_path, png_path


def plot_results(settings: PerfSettings, results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [r.concurrency for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(concurrency, [r.throughput_infer_per_s for r in results], marker="o")
    left.set_xlabel("concurrency")
    left.set_ylabel("inferences / s")
    left.set_title("Throughput")
    for label, values in (
        ("p50", [r.latency_p50_ms for r in results]),
        ("p90", [r.latency_p90_ms for r in results]),
        ("p99", [r.latency_p99_ms for r in results]),
    ):
        right.plot(concurrency, values, marker="o", label=label)
    right.set_xlabel("concurrency")
    right.set_ylabel("latency (ms)")
    right.set_title("Latency")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.grid(True, alpha=0.3)
    fig.suptitle(f"{settings.model} over {settings.protocol}, batch size {settings.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
