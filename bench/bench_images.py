"""Images per second through ModelDock's ``backend: diffusers`` against the same diffusers pipeline called directly.

One run, one machine, interleaved rounds so both sides see the same load:
  (a) the pipeline in this process, one image per call (``pipeline(prompt, generator=..., num_inference_steps=...)``),
  (b) ModelDock over HTTP (``tritonclient``), one client, one image per request,
  (c) ModelDock with ``--clients`` concurrent clients, which the dynamic batcher may merge into one pipeline call,
and the ratios b/a and c/a. The server runs as a real subprocess on a temporary repository holding the pipeline
folder (by default the tiny random-weight Stable Diffusion pipeline of ``model_repository/diffusion_models.py``).

    python bench/bench_images.py                                  # tiny pipeline, 64x64, 4 steps
    python bench/bench_images.py --pipeline /path/to/sd --steps 25 --images 4
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402

MODEL = "bench_diffusion"


def start_server(repository: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--http-port", str(port)]
    args += ["--grpc-port", str(free_port()), "--metrics-port", "0", "--model-repository", str(repository)]
    process = subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/models/{MODEL}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not get {MODEL} ready:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, help="a pipeline folder (default: build the tiny one)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=8, help="images per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for (c)")
    args = parser.parse_args()

    import torch
    import tritonclient.http as httpclient
    from diffusers import AutoPipelineForText2Image

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.pipeline
        if folder is None:
            from model_repository.diffusion_models import build_text_to_image_pipeline

            folder = build_text_to_image_pipeline(Path(scratch) / "pipeline")
        repository = Path(scratch) / "repository"
        (repository / MODEL / "1").mkdir(parents=True)
        (repository / MODEL / "config.yaml").write_text(
            f"backend: diffusers\nmax_batch_size: {args.clients}\nparameters:\n  model_path: {folder.resolve()}\n"
        )
        process, url = start_server(repository, Path(scratch) / "server.log")
        try:
            pipeline = AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True)
            pipeline.set_progress_bar_config(disable=True)
            prompt = "a lighthouse on a cliff at dusk"

            def direct(seed: int) -> np.ndarray:
                generator = torch.Generator().manual_seed(seed)
                made = pipeline(prompt, generator=generator, num_inference_steps=args.steps, output_type="np")
                return (made.images[0] * 255).round().astype(np.uint8)

            # tritonclient's HTTP client runs concurrent requests on gevent greenlets, not threads.
            client = httpclient.InferenceServerClient(url, concurrency=args.clients, network_timeout=600)

            def request(seed: int) -> tuple[list[httpclient.InferInput], list[httpclient.InferRequestedOutput]]:
                tensors = []
                for name, value, datatype in (
                    ("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
                    ("seed", np.array([[seed]], dtype=np.int64), "INT64"),
                    ("num_inference_steps", np.array([[args.steps]], dtype=np.int32), "INT32"),
                ):
                    tensor = httpclient.InferInput(name, list(value.shape), datatype)
                    tensor.set_data_from_numpy(value)
                    tensors.append(tensor)
                return tensors, [httpclient.InferRequestedOutput("image")]

            def served(seed: int) -> np.ndarray:
                tensors, wanted = request(seed)
                return client.infer(MODEL, tensors, outputs=wanted).as_numpy("image")[0]

            def served_concurrently(seeds: list[int]) -> None:
                pending = []
                for seed in seeds:
                    tensors, wanted = request(seed)
                    pending.append(client.async_infer(MODEL, tensors, outputs=wanted))
                for call in pending:
                    call.get_result()

            # Warm both sides, and check they make the same image.
            same = np.array_equal(direct(0), served(0))
            rates: dict[str, list[float]] = {"direct": [], "served": [], "served_concurrent": []}
            for round_index in range(args.rounds):
                seeds = [round_index * 1000 + i for i in range(args.images)]
                started = time.perf_counter()
                for seed in seeds:
                    direct(seed)
                rates["direct"].append(args.images / (time.perf_counter() - started))
                started = time.perf_counter()
                for seed in seeds:
                    served(seed)
                rates["served"].append(args.images / (time.perf_counter() - started))
                started = time.perf_counter()
                served_concurrently(seeds)
                rates["served_concurrent"].append(args.images / (time.perf_counter() - started))
                print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in rates.items()))
        finally:
            process.terminate()
            process.wait(timeout=30)
    base = statistics.median(rates["direct"])
    print(f"same image from both sides: {same}")
    print(
        f"median images/s: direct {base:.2f}, ModelDock 1 client {statistics.median(rates['served']):.2f} "
        f"({statistics.median(rates['served']) / base:.2f}x), ModelDock {args.clients} clients "
        f"{statistics.median(rates['served_concurrent']):.2f} ({statistics.median(rates['served_concurrent']) / base:.2f}x)"
    )
    per_round = [s / d for s, d in zip(rates["served"], rates["direct"], strict=True)]
    print("ModelDock/direct per round (1 client): " + ", ".join(f"{r:.2f}" for r in per_round))


if __name__ == "__main__":
    main()
