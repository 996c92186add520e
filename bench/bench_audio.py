"""Transcription throughput (seconds of audio per wall second): ModelDock at 1 and at 8 concurrent clients against
transformers' ASR pipeline called one file at a time, in the same run, on the same model folder.

The model is Whisper-tiny-sized (4 encoder and 4 decoder layers, d_model 384, 6 heads) with random weights, built
here by ``model_repository/speech_models.py``; both sides decode greedily (the pipeline is told ``num_beams=1``,
since it defaults to 5 beams). Random weights rarely say end-of-text, so every clip decodes to
``--max-tokens`` tokens: the same work on both sides. Clients send WAV files through the ``openai`` client
(``audio.transcriptions.create``); the server runs as a real subprocess. Both sides get the same number of torch
threads (``--threads``). Rounds alternate peer and ModelDock so drifting load on a shared machine hits both.

    python bench/bench_audio.py                     # 3 rounds of 16 clips of 10 s, 64 tokens each
    python bench/bench_audio.py --rounds 5 --threads 2
    python bench/bench_audio.py --device cuda       # both sides on the first GPU (a KIND_GPU instance)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_repository.speech_models import build_whisper  # noqa: E402
from tests.conftest import free_port  # noqa: E402

RATE = 16000
MODEL = "whisper_tiny_random"


def clips(count: int, seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    return [
        (0.3 * np.sin(2 * np.pi * (200 + 37 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        for i in range(count)
    ]


def wav(samples: np.ndarray) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def start_server(repository: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--http-port", str(port)]
    args += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--model-repository", str(repository)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/models/{MODEL}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError("the server did not get the model ready in 180 s")


def run_pipeline(pipe: object, audio: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for samples in audio:
        pipe(samples.copy(), generate_kwargs={"num_beams": 1})  # type: ignore[operator]
    return time.perf_counter() - start


def run_server(client: object, files: list[bytes], concurrency: int) -> float:
    def one(data: bytes) -> str:
        return client.audio.transcriptions.create(model=MODEL, file=("clip.wav", data)).text  # type: ignore[attr-defined,no-any-return]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, files))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16, help="clips per measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the peer and the server alike")
    parser.add_argument("--max-tokens", type=int, default=64, help="decoder positions (tokens per transcript)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run the model")
    args = parser.parse_args()

    import openai
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        folder = build_whisper(
            repository / MODEL / "1", d_model=384, layers=4, heads=6, max_target_positions=args.max_tokens
        )
        config = "backend: transformers\nmax_batch_size: 8\n"
        if args.device == "cuda":
            config += "instance_group:\n  - {kind: KIND_GPU, gpus: [0]}\n"
        (repository / MODEL / "config.yaml").write_text(config)
        device = 0 if args.device == "cuda" else -1
        pipe = transformers.pipeline("automatic-speech-recognition", model=str(folder), device=device)
        audio = clips(args.clips, args.seconds)
        files = [wav(samples) for samples in audio]
        total_audio = args.clips * args.seconds
        process, url = start_server(repository, args.threads)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            # Warm-up, both sides, at every batch size the rounds will see (a GPU tunes its kernels per shape).
            run_pipeline(pipe, audio[:1])
            run_server(client, files[:1], 1)
            run_server(client, files[:8], 8)
            results: dict[str, list[float]] = {"pipeline": [], "modeldock_1": [], "modeldock_8": []}
            for round_ in range(args.rounds):
                results["pipeline"].append(total_audio / run_pipeline(pipe, audio))
                results["modeldock_1"].append(total_audio / run_server(client, files, 1))
                results["modeldock_8"].append(total_audio / run_server(client, files, 8))
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    median = {name: statistics.median(values) for name, values in results.items()}
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(f"\n{args.clips} clips of {args.seconds:g} s, {args.max_tokens} tokens each, {where}")
    print("audio seconds per wall second (median of rounds):")
    for name, value in median.items():
        print(f"  {name:<12} {value:7.2f}  ({value / median['pipeline']:.2f}x the pipeline)")
    print(f"batching gain, 8 clients vs 1: {median['modeldock_8'] / median['modeldock_1']:.2f}x")


if __name__ == "__main__":
    main()
