"""How much of a model's raw ONNX Runtime throughput survives serving it, with and without dynamic batching.

One run, one machine, three numbers:
  (a) in-process ONNX Runtime throughput of the model at its best batch size (the ceiling),
  (b) ModelDock with dynamic batching under concurrent clients,
  (c) ModelDock with the same model and instances but batching off (one request per execution),
and the ratios b/a and b/c. The server runs as a real subprocess on a temporary copy of the model repository;
clients are ``modeldock perf``'s closed-loop clients sending binary tensors.

    python bench/bench_batching.py                          # the bundled mlp_classifier, 1-row requests
    python bench/bench_batching.py --request-batch-size 8   # clients that send 8 rows per request
    python bench/bench_batching.py --model wide_mlp         # a model whose compute dominates the request cost
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.perf import LevelResult, PerfSettings, make_workload, measure_level  # noqa: E402

console = Console()


def wide_mlp(hidden: int, layers: int, features: int = 256, seed: int = 0) -> onnx.ModelProto:
    """An MLP with enough arithmetic per row (``layers`` x ``hidden``^2 multiply-adds) that compute, not request
    handling, dominates the cost of a request."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    width, current = features, "features"
    for i in range(layers):
        out = hidden if i < layers - 1 else 10
        weight = (rng.standard_normal((width, out)) * np.sqrt(2.0 / width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"w{i}"))
        initializers.append(numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}"))
        name = f"h{i}" if i < layers - 1 else "logits"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"{name}_pre" if i < layers - 1 else name]))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"{name}_pre"], [name]))
        width, current = out, name
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def prepare_repository(
    target: Path, model: str, hidden: int, layers: int, instances: int, threads: int, queue_delay_us: int | None
) -> Path:
    """The model twice: as configured (dynamic batching) and as ``<model>_nobatch`` with batching removed."""
    if model == "mlp_classifier":
        shutil.copytree(ROOT / "model_repository" / model, target / model)
    else:
        (target / model / "1").mkdir(parents=True)
        (target / model / "1" / "model.onnx").write_bytes(wide_mlp(hidden, layers).SerializeToString())
        config = yaml.safe_load((ROOT / "model_repository" / "mlp_classifier" / "config.yaml").read_text())
        (target / model / "config.yaml").write_text(yaml.safe_dump(config))
    config = yaml.safe_load((target / model / "config.yaml").read_text())
    config["instance_group"] = [{"count": instances, "kind": "KIND_CPU"}]
    config["parameters"] = {"intra_op_thread_count": str(threads)}
    if queue_delay_us is not None:
        config["dynamic_batching"]["max_queue_delay_microseconds"] = queue_delay_us
    (target / model / "config.yaml").write_text(yaml.safe_dump(config))
    config.pop("dynamic_batching", None)
    shutil.copytree(target / model / "1", target / f"{model}_nobatch" / "1")
    (target / f"{model}_nobatch" / "config.yaml").write_text(yaml.safe_dump(config))
    return target / model / "1" / "model.onnx"


def in_process(model_path: Path, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """Inferences per second of a plain ONNX Runtime session (default threads: all cores) per batch size."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    features = session.get_inputs()[0].shape[1]
    rates = {}
    for batch in batch_sizes:
        x = np.random.default_rng(0).random((batch, features), dtype=np.float32)
        session.run(None, {name: x})
        runs, begin = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - begin) < seconds:
            session.run(None, {name: x})
            runs += 1
        rates[batch] = runs * batch / elapsed
    return rates


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(repository: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(port),
        "--metrics-port",
        "0",
        "--log-level",
        "warning",
        "--model-repository",
        str(repository),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process, f"127.0.0.1:{port}"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"server not ready:\n{log.read_text()}")


def served(url: str, model: str, levels: list[int], batch_size: int, window: float) -> list[LevelResult]:
    settings = PerfSettings(
        model=model, url=url, batch_size=batch_size, window_s=window, warmup_s=0.5, concurrency=levels
    )
    workload = make_workload(settings)
    results = []
    for concurrency in levels:
        result = measure_level(settings, workload, concurrency)
        console.print(
            f"  {model:>24} concurrency {concurrency:>3}: {result.throughput_infer_per_s:9.0f} infer/s, "
            f"p50 {result.latency_p50_ms:6.2f} ms, p99 {result.latency_p99_ms:6.2f} ms"
        )
        results.append(result)
    return results


def batch_profile(url: str, model: str) -> str:
    stats = httpx.get(f"http://{url}/v2/models/{model}/stats").json()["model_stats"][0]
    mean = stats["inference_count"] / max(stats["execution_count"], 1)
    return f"{stats['inference_count']} inferences in {stats['execution_count']} executions (mean batch {mean:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp_classifier", "wide_mlp"], default="mlp_classifier")
    parser.add_argument("--concurrency", default="8,16,32,64", help="client counts to try for (b) and (c)")
    parser.add_argument("--request-batch-size", type=int, default=1, help="rows per client request")
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured per level")
    parser.add_argument("--instances", type=int, default=2, help="model instances in the server")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per instance")
    parser.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="max_queue_delay_microseconds for (b) (default: the model's config)",
    )
    parser.add_argument("--hidden", type=int, default=4096, help="wide_mlp: hidden layer width")
    parser.add_argument("--layers", type=int, default=6, help="wide_mlp: number of layers")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        model_path = prepare_repository(
            repository, args.model, args.hidden, args.layers, args.instances, args.intra_op_threads, args.queue_delay_us
        )

        console.print(f"[bold](a) in-process ONNX Runtime, {args.model}[/bold]")
        rates = in_process(model_path, [1, 2, 4, 8, 16, 32, 64], seconds=1.5)
        for batch, rate in rates.items():
            console.print(f"  batch {batch:>3}: {rate:9.0f} infer/s")
        best_batch = max(rates, key=rates.__getitem__)
        a = rates[best_batch]

        process, url = start_server(repository, Path(tmp) / "server.log")
        try:
            console.print(
                f"[bold](b) ModelDock with dynamic batching[/bold] ({args.request_batch_size} row(s) per request)"
            )
            b_results = served(url, args.model, levels, args.request_batch_size, args.window)
            b_profile = batch_profile(url, args.model)
            console.print("[bold](c) ModelDock with batching off[/bold]")
            c_results = served(url, f"{args.model}_nobatch", levels, args.request_batch_size, args.window)
        finally:
            process.terminate()
            process.wait(timeout=30)

    b = max(b_results, key=lambda r: r.throughput_infer_per_s)
    c = max(c_results, key=lambda r: r.throughput_infer_per_s)
    table = Table(title=f"{args.model}: best of each ({args.request_batch_size} row(s) per request)")
    for column in ("", "infer/s", "at", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row("(a) ONNX Runtime in-process", f"{a:,.0f}", f"batch {best_batch}", "")
    table.add_row(
        "(b) ModelDock, dynamic batching",
        f"{b.throughput_infer_per_s:,.0f}",
        f"concurrency {b.concurrency}",
        f"{b.latency_p99_ms:.2f}",
    )
    table.add_row(
        "(c) ModelDock, batching off",
        f"{c.throughput_infer_per_s:,.0f}",
        f"concurrency {c.concurrency}",
        f"{c.latency_p99_ms:.2f}",
    )
    console.print(table)
    console.print(f"(b) batching: {b_profile}")
    console.print(
        f"[bold]b/a = {b.throughput_infer_per_s / a:.2f}   b/c = "
        f"{b.throughput_infer_per_s / c.throughput_infer_per_s:.2f}[/bold]"
    )


if __name__ == "__main__":
    main()
