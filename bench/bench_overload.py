"""What the server does at about 10x the rate it can sustain: it sheds, stays small, stays correct, and recovers.

One run, three phases against a real ``modeldock serve`` subprocess on 127.0.0.1, serving a model whose batches
take a known time (``--batch-ms``) behind a dynamic batcher with ``max_queue_size``:

  1. capacity: closed-loop clients measure the rate the server sustains (served requests per second);
  2. overload: open-loop clients offer ``--factor`` times that rate for ``--overload-s`` seconds;
  3. recovery: the offered rate drops to half the capacity for ``--recovery-s`` seconds.

It prints offered vs served rate, the share of requests shed (503), how fast a shed request is answered, the p99
latency of served requests, and the server's peak resident memory against its size before the overload. Every
answer is checked against the model's arithmetic. The run is bounded and stops by itself.

    python bench/bench_overload.py                      # 10x for 10 s
    python bench/bench_overload.py --factor 20 --overload-s 20
    python bench/bench_overload.py --llm                # a language model behind the generation engine

With ``--llm`` the model is a small GPT-2 (random weights) served by ``backend: transformers``, the requests are
non-streamed OpenAI completions of ``--llm-tokens`` tokens each, and the engine's own limits shed the load
(``max_num_seqs``, ``max_waiting_seqs``, ``max_queue_delay_ms``): refused requests get 429 with ``Retry-After``,
and the figure that matters is the accepted output tokens/s, held through the overload.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]

MODEL = """
import time

BATCH_SECONDS = {batch_s}


class TritonPythonModel:
    def execute(self, requests):
        (request,) = requests
        time.sleep(BATCH_SECONDS)
        return [{{"OUTPUT": request.get_input("INPUT") * 2}}]
"""


@dataclass
class PhaseResult:
    name: str
    duration_s: float
    sent: int = 0
    served: int = 0
    shed: int = 0
    other: int = 0
    wrong: int = 0
    served_latency_s: list[float] = field(default_factory=list)
    shed_latency_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    # Language-model runs: output tokens of the served requests.
    tokens: int = 0

    @property
    def token_rate(self) -> float:
        return self.tokens / self.duration_s

    @property
    def offered_rate(self) -> float:
        return self.sent / self.duration_s

    @property
    def served_rate(self) -> float:
        return self.served / self.duration_s

    @property
    def shed_share(self) -> float:
        return self.shed / self.sent if self.sent else 0.0

    @staticmethod
    def _p99(values: list[float]) -> float:
        return float(np.percentile(values, 99)) if values else float("nan")

    @property
    def served_p50_s(self) -> float:
        return float(np.median(self.served_latency_s)) if self.served_latency_s else float("nan")

    @property
    def served_p99_s(self) -> float:
        return self._p99(self.served_latency_s)

    @property
    def shed_p99_s(self) -> float:
        return self._p99(self.shed_latency_s)

    @property
    def shed_p50_s(self) -> float:
        return float(np.median(self.shed_latency_s)) if self.shed_latency_s else float("nan")


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str
    # Language-model runs: output tokens per request (0: the tensor model).
    llm_tokens: int = 0


@dataclass
class OverloadResult:
    capacity: PhaseResult
    overload: PhaseResult
    recovery: PhaseResult
    baseline_rss_bytes: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_repository(target: Path, batch_ms: float, max_queue_size: int) -> None:
    version = target / "overload" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MODEL.format(batch_s=batch_ms / 1000))
    config = {
        "backend": "python",
        "max_batch_size": 1,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "dynamic_batching": {"default_queue_policy": {"max_queue_size": max_queue_size}},
    }
    (target / "overload" / "config.yaml").write_text(yaml.safe_dump(config))


LLM_MODEL = "overload_lm"


def write_llm_repository(target: Path, max_num_seqs: int, max_waiting_seqs: int, max_queue_delay_ms: int) -> None:
    """A GPT-2 of 4 layers and 256 wide (random weights): a step takes milliseconds, as a real model's would."""
    sys.path.insert(0, str(ROOT))
    from model_repository.language_models import build_causal_lm

    build_causal_lm(target / LLM_MODEL / "1", n_embd=256, n_layer=4, n_head=4, n_positions=512)
    config = {
        "backend": "transformers",
        "parameters": {
            "max_num_seqs": max_num_seqs,
            "max_waiting_seqs": max_waiting_seqs,
            "max_queue_delay_ms": max_queue_delay_ms,
        },
    }
    (target / LLM_MODEL / "config.yaml").write_text(yaml.safe_dump(config))


def _rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (Linux /proc); 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's resident memory every 20 ms, keeping the peak since the last ``reset``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes(self.pid))

    def reset(self) -> None:
        self.peak = _rss_bytes(self.pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def _one_completion(client: Client, phase: PhaseResult) -> None:
    body = {"model": LLM_MODEL, "prompt": "Hello world", "max_tokens": client.llm_tokens, "ignore_eos": True}
    started = time.perf_counter()
    try:
        async with client.session.post(f"{client.url}/v1/completions", json={**body, "temperature": 0}) as response:
            status = response.status
            retry_after = response.headers.get("Retry-After")
            answer = await response.read()
    except aiohttp.ClientError:
        phase.other += 1
        return
    elapsed = time.perf_counter() - started
    if status == 200:
        phase.served += 1
        phase.served_latency_s.append(elapsed)
        tokens = orjson.loads(answer)["usage"]["completion_tokens"]
        phase.tokens += tokens
        if tokens != client.llm_tokens:
            phase.wrong += 1
    elif status == 429 and retry_after and orjson.loads(answer)["error"]["code"] == "rate_limit_exceeded":
        phase.shed += 1
        phase.shed_latency_s.append(elapsed)
    else:
        phase.other += 1


async def _one(client: Client, phase: PhaseResult, rng: np.random.Generator) -> None:
    if client.llm_tokens:
        await _one_completion(client, phase)
        return
    x = rng.standard_normal(4).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "INPUT", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]})
    started = time.perf_counter()
    try:
        async with client.session.post(f"{client.url}/v2/models/overload/infer", data=body) as response:
            status = response.status
            answer = await response.read()
    except aiohttp.ClientError:
        phase.other += 1
        return
    elapsed = time.perf_counter() - started
    if status == 200:
        phase.served += 1
        phase.served_latency_s.append(elapsed)
        if not np.allclose(orjson.loads(answer)["outputs"][0]["data"], (x * 2).tolist()):
            phase.wrong += 1
    elif status == 503:
        phase.shed += 1
        phase.shed_latency_s.append(elapsed)
    else:
        phase.other += 1


async def closed_loop(client: Client, concurrency: int, duration_s: float) -> PhaseResult:
    phase = PhaseResult("capacity", duration_s)
    rng = np.random.default_rng(1)
    end = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < end:
            phase.sent += 1
            await _one(client, phase, rng)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return phase


async def open_loop(client: Client, name: str, rate: float, duration_s: float) -> PhaseResult:
    """Requests at a fixed rate whatever the answers, as independent users would send them."""
    phase = PhaseResult(name, duration_s)
    rng = np.random.default_rng(2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[None]] = []
    while (due := start + phase.sent / rate) < start + duration_s:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, phase, rng)))
        phase.sent += 1
    phase.duration_s = max(loop.time() - start, duration_s)
    await asyncio.gather(*tasks)
    return phase


async def measure(
    url: str,
    pid: int,
    factor: float,
    overload_s: float,
    recovery_s: float,
    llm_tokens: int = 0,
    capacity_clients: int = 4,
) -> OverloadResult:
    sampler = RssSampler(pid)
    connector = aiohttp.TCPConnector(limit=1024)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            client = Client(session, url, llm_tokens)
            await closed_loop(client, 2, 1.0)  # warm-up: connections, the worker process, caches
            capacity = await closed_loop(client, capacity_clients, 3.0 if not llm_tokens else 6.0)
            baseline = _rss_bytes(pid)
            sampler.reset()
            overload = await open_loop(client, "overload", capacity.served_rate * factor, overload_s)
            overload.peak_rss_bytes = sampler.peak
            sampler.reset()
            recovery = await open_loop(client, "recovery", capacity.served_rate * 0.5, recovery_s)
            recovery.peak_rss_bytes = sampler.peak
    finally:
        sampler.stop()
    return OverloadResult(capacity, overload, recovery, baseline)


@dataclass(frozen=True)
class LlmLimits:
    """The language-model run's engine limits and request size."""

    max_num_seqs: int = 16
    max_waiting_seqs: int = 16
    max_queue_delay_ms: int = 2000
    tokens: int = 32


def run_overload(
    batch_ms: float = 40.0,
    max_queue_size: int = 8,
    factor: float = 10.0,
    overload_s: float = 10.0,
    recovery_s: float = 5.0,
    llm: LlmLimits | None = None,
) -> OverloadResult:
    with tempfile.TemporaryDirectory(prefix="modeldock-overload-") as scratch:
        repository = Path(scratch) / "models"
        model = "overload"
        if llm is None:
            write_repository(repository, batch_ms, max_queue_size)
        else:
            write_llm_repository(repository, llm.max_num_seqs, llm.max_waiting_seqs, llm.max_queue_delay_ms)
            model = LLM_MODEL
        http_port = _free_port()
        args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--http-port", str(http_port)]
        args += ["--grpc-port", str(_free_port()), "--metrics-port", "0", "--model-repository", str(repository)]
        log = open(Path(scratch) / "server.log", "wb")
        process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http_port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start:\n{(Path(scratch) / 'server.log').read_text()}")
                try:
                    if httpx.get(f"{url}/v2/models/{model}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            if llm is None:
                return asyncio.run(measure(url, process.pid, factor, overload_s, recovery_s))
            return asyncio.run(
                measure(url, process.pid, factor, overload_s, recovery_s, llm.tokens, capacity_clients=llm.max_num_seqs)
            )
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def report(result: OverloadResult) -> str:
    mib = 1024 * 1024
    lines = [
        "phase     offered/s  served/s  shed   served p99  shed p50  shed p99  other  wrong  peak RSS",
    ]
    for phase in (result.capacity, result.overload, result.recovery):
        rss = f"{phase.peak_rss_bytes / mib:.0f} MiB" if phase.peak_rss_bytes else "-"
        offered = "closed" if phase is result.capacity else f"{phase.offered_rate:.0f}"
        lines.append(
            f"{phase.name:<9} {offered:>9} {phase.served_rate:>9.1f} {phase.shed_share:>5.0%} "
            f"{phase.served_p99_s * 1000:>9.0f} ms {phase.shed_p50_s * 1000:>6.1f} ms {phase.shed_p99_s * 1000:>6.1f} ms "
            f"{phase.other:>6} "
            f"{phase.wrong:>6}  {rss}"
        )
    if result.capacity.tokens:
        rates = ", ".join(f"{p.name} {p.token_rate:.0f}" for p in (result.capacity, result.overload, result.recovery))
        lines.append(f"accepted output tokens/s: {rates}")
    lines.append(f"server RSS before the overload: {result.baseline_rss_bytes / mib:.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-ms", type=float, default=40.0, help="Time one batch (one request) takes.")
    parser.add_argument("--max-queue-size", type=int, default=8, help="The model's dynamic batcher queue limit.")
    parser.add_argument("--factor", type=float, default=10.0, help="Offered rate as a multiple of the capacity.")
    parser.add_argument("--overload-s", type=float, default=10.0, help="Length of the overload phase.")
    parser.add_argument("--recovery-s", type=float, default=5.0, help="Length of the recovery phase.")
    parser.add_argument("--llm", action="store_true", help="A language model behind the generation engine.")
    parser.add_argument("--llm-tokens", type=int, default=32, help="Output tokens of each completion.")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="The engine's running batch (--llm).")
    parser.add_argument("--max-waiting-seqs", type=int, default=16, help="The engine's waiting queue (--llm).")
    parser.add_argument("--max-queue-delay-ms", type=int, default=2000, help="The longest wait to start (--llm).")
    options = parser.parse_args()
    llm = None
    if options.llm:
        llm = LlmLimits(options.max_num_seqs, options.max_waiting_seqs, options.max_queue_delay_ms, options.llm_tokens)
    result = run_overload(
        options.batch_ms, options.max_queue_size, options.factor, options.overload_s, options.recovery_s, llm
    )
    print(report(result))


if __name__ == "__main__":
    main()
