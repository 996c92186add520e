"""What the hop to a Ray actor costs, against instances in the server's own process.

One server (``modeldock serve --ray``) serves the same model twice: ``local`` keeps its instances in the server
(``parameters.ray: "false"``), ``ray`` runs them as Ray actors on a local Ray head node. The backend does no work
(it returns 2 x INPUT), so the difference is the hop itself: serializing the batch into Ray's object store, the
actor call, and the result's way back. Measured with ``modeldock perf``'s closed-loop HTTP clients (binary
tensors) at each payload size and concurrency, on the same machine in the same run.

Ray advertises the machine's network address and benchmarks may only use loopback, so as root this re-runs
itself inside a network namespace that has only ``lo`` (``unshare --net --pid``); elsewhere it refuses to run.

    python bench/bench_ray.py
    python bench/bench_ray.py --sizes 16,262144 --concurrency 1,8 --window 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.perf import PerfSettings, make_workload, measure_level  # noqa: E402

INSIDE_ENV = "MODELDOCK_RAY_NAMESPACE"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
console = Console(width=120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_models(repository: Path, sizes: list[int], instances: int) -> None:
    for size in sizes:
        for placement in ("local", "ray"):
            folder = repository / f"{placement}_{size}"
            (folder / "1").mkdir(parents=True)
            config = {
                "backend": "tests.slow_backend:SleepBackend",
                "max_batch_size": 0,
                "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [size]}],
                "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [size]}],
                "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
                "parameters": {"sleep_ms": "0", "ray": str(placement == "ray").lower()},
            }
            (folder / "config.yaml").write_text(yaml.safe_dump(config))


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in time")


def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **RAY_ENV}
    work = Path(tempfile.mkdtemp(prefix="mdbench", dir="/tmp"))
    port = free_port()
    head = [ray, "start", "--head", "--port", str(port), "--num-cpus", str(args.ray_cpus), "--node-ip-address"]
    head += ["127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(work / "ray")]
    subprocess.run(head, env=env, check=True, capture_output=True)
    write_models(work / "models", sizes, args.instances)
    http_port = free_port()
    url = f"127.0.0.1:{http_port}"
    server_cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(work / "models")]
    server_cmd += ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(free_port())]
    server_cmd += ["--metrics-port", "0", "--log-level", "warning", "--ray", f"127.0.0.1:{port}"]
    server = subprocess.Popen(server_cmd, cwd=ROOT, env=env)
    try:
        wait_ready(f"http://{url}", server)
        table = Table(title=f"Ray actor hop vs local instances ({args.instances} instances each)", title_justify="left")
        for column in ("payload", "clients", "local p50 ms", "ray p50 ms", "hop p50 ms", "local inf/s", "ray inf/s"):
            table.add_column(column, justify="right")
        for size in sizes:
            for concurrency in levels:
                results = {}
                for placement in ("local", "ray"):
                    settings = PerfSettings(
                        model=f"{placement}_{size}",
                        url=url,
                        window_s=args.window,
                        warmup_s=1.0,
                        concurrency=[concurrency],
                    )
                    results[placement] = measure_level(settings, make_workload(settings), concurrency)
                local, remote = results["local"], results["ray"]
                table.add_row(
                    f"{size * 4 / 1024:,.1f} KiB",
                    str(concurrency),
                    f"{local.latency_p50_ms:.2f}",
                    f"{remote.latency_p50_ms:.2f}",
                    f"{remote.latency_p50_ms - local.latency_p50_ms:.2f}",
                    f"{local.throughput_infer_per_s:,.0f}",
                    f"{remote.throughput_infer_per_s:,.0f}",
                )
        console.print(table)
    finally:
        server.terminate()
        server.wait(60)
        # Inside its own PID namespace, stopping every Ray process stops only this benchmark's.
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,262144", help="FP32 elements per request (comma-separated)")
    parser.add_argument("--concurrency", default="1,8", help="closed-loop clients (comma-separated)")
    parser.add_argument("--instances", type=int, default=2, help="instances of each model")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the Ray head node")
    parser.add_argument("--window", type=float, default=3.0, help="seconds measured per level")
    args = parser.parse_args()
    if os.environ.get(INSIDE_ENV) == "1":
        if os.getpid() != 1:
            raise SystemExit("expected to be PID 1 of its own namespace")
        run(args)
        return
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        raise SystemExit("needs root and unshare(1): Ray must run in a network namespace with only loopback")
    inner = " ".join([sys.executable, *map(str, [Path(__file__).resolve(), *sys.argv[1:]])])
    result = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", f"ip link set lo up && exec {inner}"],
        env={**os.environ, **RAY_ENV, INSIDE_ENV: "1"},
    )
    raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
