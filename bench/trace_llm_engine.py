"""ModelDock's generation engine in process, step by step: what each step runs and when first tokens come.

No HTTP and no clients' sockets: closed-loop clients call ``GenerationEngine.generate`` directly, on the bench's
GPT-2-small-shaped model and workloads (``bench_llm.py``'s), and every engine step is traced (decoding rows, prompt
rows and tokens, prefix-cache hits, the step's wall time). It answers why first tokens come when they do, without a
server's noise, and compares two trees of the code in one run (``--tree``), interleaved, on a shared machine:

    python bench/trace_llm_engine.py --workload prefix --clients 16 --trace
    git worktree add /tmp/before HEAD~1
    python bench/trace_llm_engine.py --workload prefix --tree /tmp/before --tree . --rounds 3

Each ``--tree`` runs in a process of its own (its own imports), one after the other, round after round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def requests_for(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    import bench_llm

    count = args.requests or args.clients
    if args.workload == "prefix":
        return bench_llm.shared_prefix_workload(tokenizer, count, args)
    return bench_llm.workload(tokenizer, count, 1, args)


def run_tree(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement with the code of ``args.tree`` (this process imports it first)."""
    tree = args.tree[-1]
    sys.path.insert(0, str(Path(tree).resolve()))
    sys.path.insert(1, str(BENCH))
    import torch

    torch.set_num_threads(args.threads)
    from backends.transformers import TransformersBackend
    from server.config import ModelConfig
    from server.devices import CPU
    from server.extensions.generation_metrics import GenerationStats
    from server.protocol.generation import GenerateRequest, SamplingParams
    from server.scheduling.generation.engine import EngineLimits, GenerationEngine

    folder = Path(args.model)
    parameters = dict(p.split("=", 1) for p in args.param)
    config = TransformersBackend.auto_complete_config(
        ModelConfig(name="lm", backend="transformers", parameters=parameters), folder
    )
    backend = TransformersBackend(config, folder, CPU)
    engine = GenerationEngine("lm", backend, EngineLimits.from_config(config, backend), GenerationStats())
    steps: list[dict[str, Any]] = []
    run = engine._run

    def traced(work: list[tuple[Any, int]]) -> float:
        decode = sum(1 for s, count in work if s.computed == s.length - 1)
        prefill = [count for s, count in work if s.computed != s.length - 1]
        started = time.perf_counter()
        forward = run(work)
        steps.append(
            {
                "at": round(time.perf_counter() - origin, 4),
                "decode_rows": decode,
                "prefill_rows": len(prefill),
                "prefill_tokens": sum(prefill),
                "waiting": len(engine._waiting),
                "step_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        )
        return forward

    engine._run = traced  # type: ignore[method-assign]
    requests = requests_for(args, engine.tokenizer)
    timings: list[tuple[float, int]] = []

    async def one(prompt: str, max_tokens: int) -> None:
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        sent = time.perf_counter()
        first = None
        tokens = 0
        async for output in engine.generate(GenerateRequest("t", prompt=prompt, sampling=sampling)):
            if output.token_ids and first is None:
                first = time.perf_counter() - sent
            tokens += len(output.token_ids)
        timings.append((first or float("nan"), tokens))

    async def clients() -> float:
        queue = list(reversed(requests))

        async def client() -> None:
            while queue:
                request = queue.pop()
                await one(request.prompt, request.max_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        return time.perf_counter() - started

    origin = time.perf_counter()
    asyncio.run(asyncio.wait_for(_warm(engine, GenerateRequest, SamplingParams), 600))
    steps.clear()
    hits_before = engine.stats.prefix_cache_hits
    queries_before = engine.stats.prefix_cache_queries
    origin = time.perf_counter()
    wall = asyncio.run(clients())
    engine.stop()
    ttfts = [t for t, _ in timings]
    queried = engine.stats.prefix_cache_queries - queries_before
    return {
        "tree": tree,
        "requests": len(timings),
        "tokens_per_s": sum(n for _, n in timings) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": percentile(ttfts, 0.99),
        "wall": wall,
        "steps": len(steps),
        "hit_rate": (engine.stats.prefix_cache_hits - hits_before) / queried if queried else 0.0,
        "trace": steps,
    }


async def _warm(engine: Any, request_type: Any, sampling_type: Any) -> None:
    sampling = sampling_type(temperature=0.0, max_tokens=4, ignore_eos=True)
    async for _ in engine.generate(request_type("w", prompt="Hello there", sampling=sampling)):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["prefix", "mixed"], default="prefix")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=0, help="requests in all (default: one per client)")
    parser.add_argument("--tree", action="append", default=[], help="a checkout of ModelDock to run (repeatable)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="print every step of the last round")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a model parameter")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="", help="a model folder (default: build the bench model)")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--system-prompt-tokens", type=int, default=500)
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=128)
    parser.add_argument("--output-min", type=int, default=8)
    parser.add_argument("--output-max", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_tree(args)))
        return
    trees = args.tree or [str(BENCH.parent)]
    if not args.model:
        sys.path.insert(0, str(BENCH))
        import bench_llm

        args.model = str(bench_llm.build_model(Path(tempfile.mkdtemp(prefix="trace_llm_")) / "model", args))
    passed = [a for a in sys.argv[1:] if not a.startswith("--tree") and a not in trees]
    results: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
    for round_ in range(args.rounds):
        for tree in trees if round_ % 2 == 0 else list(reversed(trees)):
            command = [sys.executable, __file__, *passed, "--child", "--tree", tree, "--model", args.model]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[tree].append(result)
            print(
                f"round {round_ + 1} {tree}: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_p50']:.2f} s"
                f" p99 {result['ttft_p99']:.2f} s, {result['steps']} steps, prefix hit rate {result['hit_rate']:.2f}",
                flush=True,
            )
    for tree, rows in results.items():
        tok = statistics.median(r["tokens_per_s"] for r in rows)
        p50 = statistics.median(r["ttft_p50"] for r in rows)
        p99 = statistics.median(r["ttft_p99"] for r in rows)
        print(f"{tree}: median of {len(rows)}: {tok:.1f} tok/s, TTFT p50 {p50:.2f} s, p99 {p99:.2f} s")
    if args.trace:
        for tree, rows in results.items():
            print(f"-- steps of {tree}, last round (at s, decode rows, prompt rows, prompt tokens, waiting, ms)")
            for step in rows[-1]["trace"]:
                print(
                    f"{step['at']:8.3f} {step['decode_rows']:3d} {step['prefill_rows']:3d} "
                    f"{step['prefill_tokens']:5d} {step['waiting']:3d} {step['step_ms']:8.1f}"
                )


if __name__ == "__main__":
    main()
