"""Draws the performance page's plots (docs/images/bench-*.png) from the benchmark results committed under
bench/results/, so the figures on the page are the measured ones: ``python docs/performance_plots.py``.

The Triton plots are requests per second against concurrency for ModelDock and Triton measured in the same run by
``bench/bench_triton.py`` (interleaved rounds, medians), one line per server and protocol; the language-model plot is
``bench/plot_llm.py``'s bars for a ``bench/bench_llm.py`` run beside vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMAGES = ROOT / "docs" / "images"
# Result folder -> the plot's title.
RUNS = {
    "tiny-granian": "tiny model (compute ~0): the request path",
    "mlp-granian": "MLP (compute-bound)",
}
# Result folders of bench_llm.py runs (results.json) drawn by bench/plot_llm.py.
LLM_RUNS = ["llm-vllm-fair"]
SERIES = {
    "modeldock-http-binary": ("ModelDock HTTP binary", "#3f51b5", "-"),
    "triton-http-binary": ("Triton HTTP binary", "#76b900", "-"),
    "modeldock-http-json": ("ModelDock HTTP JSON", "#3f51b5", "--"),
    "triton-http-json": ("Triton HTTP JSON", "#76b900", "--"),
    "modeldock-grpc": ("ModelDock gRPC", "#3f51b5", ":"),
    "triton-grpc": ("Triton gRPC", "#76b900", ":"),
}


def plot(run: str, title: str, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((RESULTS / run / "bench_triton.json").read_text())
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for key, (label, color, style) in SERIES.items():
        points = sorted((m["concurrency"], m["rps"]) for m in data["measurements"] if m["target"] == key)
        if points:
            ax.plot(*zip(*points, strict=True), label=label, color=color, linestyle=style, marker="o", markersize=3)
    levels = sorted({m["concurrency"] for m in data["measurements"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title(f"{title}\n{data['machine']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def main(images: Path = IMAGES) -> list[Path]:
    images.mkdir(parents=True, exist_ok=True)
    written = []
    for run, title in RUNS.items():
        target = images / f"bench-{run}.png"
        plot(run, title, target)
        written.append(target)
    for run in LLM_RUNS:
        target = images / f"bench-{run}.png"
        plot_llm().draw(RESULTS / run / "results.json", target)
        written.append(target)
    return written


def plot_llm() -> ModuleType:
    """bench/plot_llm.py (the bench folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("plot_llm", ROOT / "bench" / "plot_llm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    for path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES):
        print(f"wrote {path}")
