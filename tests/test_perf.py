"""``modeldock perf`` against the shared test server."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, ServerProcess


def run_perf(protocol: str, url: str, out: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "perf",
            "simple",
            "--protocol",
            protocol,
            "--url",
            url,
            "--concurrency",
            "1,2",
            "--window",
            "0.5",
            "--warmup",
            "0.2",
            "--output-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    with (out / f"perf_simple_{protocol}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["concurrency"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["throughput_infer_per_s"]) > 0
        assert int(row["errors"]) == 0
        assert 0 < float(row["latency_p50_ms"]) <= float(row["latency_p99_ms"])
    assert (out / f"perf_simple_{protocol}.png").stat().st_size > 1000
    assert "Infer/s" in completed.stdout


def test_perf_over_http_writes_csv_and_plot(server: ServerProcess, tmp_path: Path) -> None:
    run_perf("http", server.url.removeprefix("http://"), tmp_path)


def test_perf_over_grpc(server: ServerProcess, tmp_path: Path) -> None:
    run_perf("grpc", f"127.0.0.1:{server.grpc_port}", tmp_path)


def test_perf_rejects_bad_concurrency(server: ServerProcess) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "server", "perf", "simple", "--url", server.url.removeprefix("http://"), "-c", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode != 0
    assert "concurrency" in completed.stderr


def test_perf_without_the_perf_extra_says_how_to_install_it() -> None:
    # A server-only install has no tritonclient; hide it the way a missing package looks to importlib.
    script = "import sys; sys.modules['tritonclient'] = None; from server.cli import app; app(['perf', 'simple'])"
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert 'needs tritonclient: pip install "modeldock[perf]"' in completed.stderr
