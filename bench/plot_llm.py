"""Draws bench_llm.py's side-by-side result (``--json``) as bars: output tokens/s and TTFT p99 per workload, one bar
per system: ``python bench/plot_llm.py bench/results/llm-vllm-cpu/results.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLOURS = {"modeldock": "#3f51b5", "modeldock_ngram": "#9fa8da", "vllm": "#f57c00"}


def draw(results: Path, target: Path) -> None:
    """The bars for one ``--json`` result, written to ``target`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results.read_text())
    workloads = list(dict.fromkeys(f"{r['workload']} {r['clients']}" for r in rows))
    systems = [s for s in COLOURS if any(r["system"] == s for r in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        by = {f"{r['workload']} {r['clients']}": r for r in rows if r["system"] == system}
        positions = [w + index * width for w in range(len(workloads))]
        for axis, field in zip(axes, ("output_tokens_per_s", "ttft_p99_s"), strict=True):
            values = [by[w][field] if w in by else 0 for w in workloads]
            axis.bar(positions, values, width, label=system, color=COLOURS[system])
    for axis, title in zip(axes, ("output tokens/s (higher is better)", "TTFT p99 s (lower is better)"), strict=True):
        axis.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads, fontsize=8)
        axis.set_title(title)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(target, dpi=90)
    plt.close(figure)


def main() -> None:
    results = Path(sys.argv[1])
    draw(results, results.with_name("plot.png"))


if __name__ == "__main__":
    main()
