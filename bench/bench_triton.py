"""ModelDock against the real Triton server, one run, one machine, every number a ratio to Triton's.

    python bench/bench_triton.py                      # builds the Triton side if needed, then the whole matrix
    python bench/bench_triton.py --models tiny --concurrency 64 --duration 5
    python bench/bench_triton.py --soak 60            # plus ModelDock's RSS over a 60 s run

The anchor is Triton 2.x as the ``nvidia-pytriton`` wheel ships it (its own venv, ``--triton-venv``; created and
filled on first use), serving the same ONNX model through its Python backend running ONNX Runtime
(``bench/triton_onnx_model.py``) behind Triton's C++ HTTP/gRPC front ends and dynamic batcher. Both servers get the
same config: ``max_batch_size`` 64, 1 ms ``max_queue_delay``, one CPU instance, the same ONNX Runtime threads.

Two models: ``tiny`` (x*2+1 on 16 floats: all request handling) and ``mlp`` (1024->3x4096->10: compute-bound).
Targets, measured interleaved for each (model, concurrency) so load from elsewhere hits them alike:

- ModelDock HTTP binary / JSON, Triton HTTP binary / JSON: ``wrk`` with a Lua script posting a fixed body;
- ModelDock gRPC, Triton gRPC: ``h2load`` (nghttp2) posting a fixed, framed ``ModelInferRequest``; h2load cannot
  read gRPC trailers, so each server's own statistics confirm every request succeeded; ``-grpc-stream`` targets
  post ``--stream-messages`` framed requests on one ``ModelStreamInfer`` stream per call (req/s counts messages);
- MLServer's gRPC (``mlserver-grpc``, from ``--mlserver-venv``; ``bench/mlserver_onnx_model.py`` runs the same ONNX
  file, adaptive batching at the same 64 / 1 ms, inference in its main process);
- ``modeldock-defaults-*``: ModelDock started as a user starts it (``modeldock serve -m REPO``: info logging,
  polling the repository, metrics on their own port) beside the bench's trimmed start, to see what that costs;
- floors: ``raw_asgi_floor.py`` (no framework, ONNX Runtime inline) under uvicorn and granian, and
  ``raw_grpc_floor.py`` (the same for ``ModelInfer``) on grpcio's asyncio and thread-pool servers;
- in-process ONNX Runtime rows/s at batch 1 and at the best batch (the physical limit for ``mlp``).

The load generators are native programs pinned with ``taskset`` to ``--client-cpu`` so they are not the
bottleneck. Install them with ``apt-get install wrk nghttp2-client``.

``--independent`` measures under an independent side-by-side run's conditions (issue 24): tiny and mlp at 64
connections, 1-row requests, ONNX Runtime on one thread, ModelDock started with its defaults, 10 s rounds.

``--grpc`` is issue 24's gRPC comparison in one command: tiny at 64 connections, unary ``ModelInfer`` and
``ModelStreamInfer`` (16 requests a stream) for ModelDock, the grpcio asyncio floors, MLServer and Triton, 5 rounds
of 3 s; the "vs grpcio asyncio floor" and "floor CPU/req ÷ ours" columns hold the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import service_pb2
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
MODELS = ("tiny", "mlp")
FEATURES = {"tiny": 16, "mlp": 1024}


# -- models -----------------------------------------------------------------------------------------------------
def tiny_model() -> onnx.ModelProto:
    """x * 2 + 1 on 16 floats: the model costs nothing, so the request path is all there is to measure."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["INPUT0", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["OUTPUT0"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(np.float32([2.0]), "two"), numpy_helper.from_array(np.float32([1.0]), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """1024 -> 4096 -> 4096 -> 4096 -> 10 with ReLU: ~38 M multiply-adds a row, so compute dominates."""
    rng = np.random.default_rng(seed)
    widths = [1024, 4096, 4096, 4096, 10]
    nodes, weights = [], []
    current = "INPUT0"
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:], strict=False)):
        weights.append(
            numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype("f4"), f"w{i}")
        )
        weights.append(numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}"))
        last = i == len(widths) - 2
        out = "OUTPUT0" if last else f"pre{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def output_width(model: str) -> int:
    return 16 if model == "tiny" else 10


def write_repositories(work: Path, models: list[str], threads: int, site_packages: Path) -> dict[str, Path]:
    """One ONNX file per model, served by ModelDock (config.yaml), Triton (config.pbtxt + Python model.py) and
    MLServer (model-settings.json naming ``mlserver_onnx_model.OnnxModel``)."""
    onnx_paths: dict[str, Path] = {}
    triton_model = (BENCH / "triton_onnx_model.py").read_text().replace("@SITE_PACKAGES@", str(site_packages))
    for name in models:
        proto = tiny_model() if name == "tiny" else mlp_model()
        modeldock_dir = work / "modeldock" / name
        (modeldock_dir / "1").mkdir(parents=True)
        onnx_path = modeldock_dir / "1" / "model.onnx"
        onnx.save(proto, onnx_path)
        onnx_paths[name] = onnx_path
        width_in, width_out = FEATURES[name], output_width(name)
        (modeldock_dir / "config.yaml").write_text(
            f"backend: onnxruntime\nmax_batch_size: 64\n"
            f"input:\n  - {{name: INPUT0, data_type: TYPE_FP32, dims: [{width_in}]}}\n"
            f"output:\n  - {{name: OUTPUT0, data_type: TYPE_FP32, dims: [{width_out}]}}\n"
            f"dynamic_batching:\n  max_queue_delay_microseconds: 1000\n"
            f"instance_group:\n  - {{count: 1, kind: KIND_CPU}}\n"
            f"parameters:\n  intra_op_thread_count: '{threads}'\n"
        )
        triton_dir = work / "triton" / name
        (triton_dir / "1").mkdir(parents=True)
        os.link(onnx_path, triton_dir / "1" / "model.onnx")
        (triton_dir / "1" / "model.py").write_text(triton_model)
        (triton_dir / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 64\n'
            f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {width_in} ] }}]\n'
            f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {width_out} ] }}]\n'
            "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
            "instance_group [{ count: 1 kind: KIND_CPU }]\n"
            f'parameters {{ key: "intra_op_thread_count" value {{ string_value: "{threads}" }} }}\n'
        )
        mlserver_dir = work / "mlserver" / name
        mlserver_dir.mkdir(parents=True)
        (mlserver_dir / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_onnx_model.OnnxModel",
                    "max_batch_size": 64,
                    "max_batch_time": 0.001,
                    "parameters": {"uri": str(onnx_path)},
                }
            )
        )
    return onnx_paths


# -- the Triton side --------------------------------------------------------------------------------------------
def triton_install(venv: Path) -> tuple[Path, Path]:
    """Triton's folder inside the ``nvidia-pytriton`` wheel and the venv's site-packages; installs on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    triton = site / "pytriton" / "tritonserver"
    if not (triton / "bin" / "tritonserver").exists():
        print(f"installing nvidia-pytriton and onnxruntime into {venv} (a few hundred MB, once)", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "nvidia-pytriton", "onnxruntime", "numpy"], check=True
        )
    stub = triton / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        # The wheel ships a stub per Python version; the backend looks for it beside itself.
        shutil.copy2(triton / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub", stub)
    return triton, site


def triton_environment(triton: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(p) for p in (triton / "external_libs", triton / "lib") if p.exists()]
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


# -- processes --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Target:
    """One server process and how to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int = 0
    log: Path | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_ready(target: Target, models: list[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if target.process.poll() is not None:
            raise RuntimeError(f"{target.name} exited:\n{target.log.read_text() if target.log else ''}")
        try:
            if all(
                httpx.get(f"http://127.0.0.1:{target.http_port}/v2/models/{m}/ready", timeout=2).status_code == 200
                for m in models
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    target.stop()
    raise TimeoutError(f"{target.name} not ready in {timeout_s}s:\n{target.log.read_text() if target.log else ''}")


def start_modeldock(work: Path, name: str, extra_args: list[str], baseline: Path | None = None) -> Target:
    """``modeldock`` with ``--modeldock-args``; ``modeldock-uvicorn`` and ``modeldock-granian`` pick the HTTP server;
    ``modeldock-baseline`` runs the source tree ``--baseline`` names (an older checkout), for before/after;
    ``modeldock-defaults`` is started with nothing but its ports and repository, as a user starts it."""
    source = ROOT
    http_port, grpc_port = free_port(), free_port()
    log = work / f"{name}.log"
    if name == "modeldock-defaults":
        command = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
                   "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()), "-m", str(work / "modeldock")]  # fmt: skip
        process = subprocess.Popen(command, cwd=source, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        return Target(name, process, http_port, grpc_port, log)
    if name == "modeldock-baseline":
        if baseline is None:
            raise SystemExit("modeldock-baseline needs --baseline <source tree>, e.g. from `git archive <commit>`")
        source = baseline
    elif name != "modeldock":
        extra_args = [*extra_args, "--http-server", name.removeprefix("modeldock-")]
    command = [
        sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", "0",
        "--log-level", "warning", "--model-control-mode", "none", "-m", str(work / "modeldock"), *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=source, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Target(name, process, http_port, grpc_port, log)


def start_triton(work: Path, triton: Path) -> Target:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log = work / "triton.log"
    command = [
        str(triton / "bin" / "tritonserver"), "--model-repository", str(work / "triton"),
        "--backend-directory", str(triton / "backends"), "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--http-address", "127.0.0.1",
        "--grpc-address", "127.0.0.1", "--log-verbose", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=triton_environment(triton))
    return Target("triton", process, http_port, grpc_port, log)


def start_mlserver(work: Path, venv: Path, threads: int) -> Target:
    """MLServer from its own venv on the bench's repository, its inference in the main process (``parallel_workers``
    0: one instance, no hop to a worker process), so it runs as one CPU instance like the others."""
    mlserver = venv / "bin" / "mlserver"
    if not mlserver.exists():
        raise SystemExit(
            f"no MLServer in {venv}: python -m venv {venv} && {venv}/bin/pip install mlserver onnxruntime numpy"
        )
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    repository = work / "mlserver"
    (repository / "settings.json").write_text(
        json.dumps(
            {
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
                "host": "127.0.0.1",
                "debug": False,
            }  # fmt: skip
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(BENCH)
    env["FLOOR_THREADS"] = str(threads)
    log = work / "mlserver.log"
    process = subprocess.Popen(
        [str(mlserver), "start", str(repository)], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env
    )
    return Target("mlserver", process, http_port, grpc_port, log)


def start_floor(work: Path, server: str, onnx_paths: dict[str, Path], threads: int) -> Target:
    port = free_port()
    log = work / f"floor-{server}.log"
    env = dict(os.environ)
    env["FLOOR_MODELS"] = ",".join(f"{name}={path}" for name, path in onnx_paths.items())
    env["FLOOR_THREADS"] = str(threads)
    bin_dir = Path(sys.executable).parent
    grpc_port = 0
    if server.startswith("grpc-"):
        grpc_port = free_port()
        command = [sys.executable, "raw_grpc_floor.py", server.removeprefix("grpc-"), str(grpc_port)]
    elif server == "uvicorn":
        command = [str(bin_dir / "uvicorn"), "raw_asgi_floor:app", "--port", str(port), "--http", "httptools",
                   "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    else:
        interface = "rsgi" if server == "granian-rsgi" else "asgi"
        app = "raw_asgi_floor:rsgi_app" if interface == "rsgi" else "raw_asgi_floor:app"
        command = [str(bin_dir / "granian"), "--interface", interface, "--port", str(port), "--loop", "uvloop",
                   "--no-ws", "--log-level", "warning", app]  # fmt: skip
    command[1:1] = []
    process = subprocess.Popen(command, cwd=BENCH, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    target = Target(f"floor-{server}", process, port, grpc_port, log=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{target.name} exited:\n{log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", grpc_port or port)) == 0:
                return target
        time.sleep(0.2)
    raise TimeoutError(f"{target.name} did not listen")


# -- request bodies ---------------------------------------------------------------------------------------------
def http_body(model: str, binary: bool) -> tuple[bytes, int | None]:
    x = np.random.default_rng(1).random((1, FEATURES[model]), dtype=np.float32)
    tensor = InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    body, json_size = InferenceServerClient.generate_request_body(
        [tensor], outputs=[InferRequestedOutput("OUTPUT0", binary_data=binary)]
    )
    return body, json_size


def grpc_frame(model: str, messages: int = 1) -> bytes:
    """A length-prefixed gRPC message (``messages`` of them, for a stream): what h2load posts as the request body."""
    x = np.random.default_rng(1).random((1, FEATURES[model]), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    del tensor
    request.raw_input_contents.append(x.tobytes())
    request.outputs.add(name="OUTPUT0")
    message = request.SerializeToString()
    return (b"\x00" + struct.pack(">I", len(message)) + message) * messages


def check_answer(port: int, model: str, binary: bool) -> None:
    """One request through httpx, so a wrong answer fails the run instead of being timed."""
    body, json_size = http_body(model, binary)
    headers = {"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {}
    response = httpx.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", content=body, headers=headers)
    response.raise_for_status()
    result = InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers.get("Inference-Header-Content-Length", 0)) or None
    )
    check_output(port, model, result.as_numpy("OUTPUT0"))


def check_grpc_answer(port: int, model: str) -> None:
    """One ``ModelInfer`` call with the benchmark's own frame, for the gRPC-only floors."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda frame: frame,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        response = infer(grpc_frame(model)[5:], timeout=30)
    shape = list(response.outputs[0].shape)
    if response.raw_output_contents:
        y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape)
    else:  # MLServer answers in typed contents
        y = np.array(response.outputs[0].contents.fp32_contents, np.float32).reshape(shape)
    check_output(port, model, y)


def check_output(port: int, model: str, y: np.ndarray) -> None:
    x = np.random.default_rng(1).random((1, FEATURES[model]), dtype=np.float32)
    if model == "tiny" and not np.allclose(y, x * 2 + 1):
        raise AssertionError(f"port {port}: wrong answer for {model}")
    if y.shape != (1, output_width(model)):
        raise AssertionError(f"port {port}: wrong shape {y.shape} for {model}")


# -- load generators --------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    model: str
    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time the server (with its child processes) spent per answered request: unlike req/s it hardly moves when
    # other work on the machine takes cores away, so it compares servers fairly on a loaded machine.
    cpu_us_per_request: float = float("nan")
    note: str = ""


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def run_wrk(
    work: Path, port: int, model: str, body: bytes, json_size: int | None, concurrency: int, seconds: float, cpu: str
) -> tuple[float, float, float, int]:
    body_file = work / f"body-{model}-{json_size}.bin"
    body_file.write_bytes(body)
    script = work / f"post-{model}-{json_size}.lua"
    lines = [
        'wrk.method = "POST"',
        f'local f = io.open("{body_file}", "rb")',
        "wrk.body = f:read('*all')",
        "f:close()",
        'wrk.headers["Content-Type"] = "application/octet-stream"',
    ]
    if json_size is not None:
        lines.append(f'wrk.headers["Inference-Header-Content-Length"] = "{json_size}"')
    script.write_text("\n".join(lines) + "\n")
    command = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script),
               f"http://127.0.0.1:{port}/v2/models/{model}/infer"]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, p50, p99, errors, requests


def run_h2load(
    work: Path, port: int, model: str, concurrency: int, seconds: float, cpu: str, stream_messages: int = 0
) -> tuple[float, float, float, int, int]:
    """Closed-loop gRPC unary calls, one stream per connection like the HTTP clients; (rps, p50, p99, errors, done).

    With ``stream_messages`` each call is a ``ModelStreamInfer`` stream carrying that many requests (sent at once,
    then half-closed; the server answers each); rps and done count messages, latencies are whole streams'."""
    frame = work / f"grpc-{model}-{stream_messages}.bin"
    frame.write_bytes(grpc_frame(model, max(1, stream_messages)))
    method = "ModelStreamInfer" if stream_messages else "ModelInfer"
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    command = ["taskset", "-c", cpu, "h2load", "-c", str(concurrency), "-m", "1", "-D", str(int(round(seconds))),
               "--warm-up-time", "1", "-d", str(frame), "-H", "content-type: application/grpc", "-H", "te: trailers",
               "--log-file", str(log), f"http://127.0.0.1:{port}/inference.GRPCInferenceService/{method}"]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    assert done is not None, out
    durations = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2)
    p50 = durations[len(durations) // 2] / 1e3 if durations else float("nan")
    p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1e3 if durations else float("nan")
    per_call = max(1, stream_messages)
    errors = (int(done.group(3)) + int(done.group(4))) * per_call
    return rps * per_call, p50, p99, errors, int(done.group(2)) * per_call


def success_count(port: int, model: str) -> int:
    stats = httpx.get(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=60).json()["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"])


def in_process(onnx_path: Path, features: int, threads: int, seconds: float = 1.0) -> dict[int, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rates = {}
    for batch in (1, 8, 64):
        x = np.random.default_rng(0).random((batch, features), dtype=np.float32)
        session.run(None, {"INPUT0": x})
        runs, begin = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - begin) < seconds:
            session.run(None, {"INPUT0": x})
            runs += 1
        rates[batch] = runs * batch / elapsed
    return rates


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (worker processes), in MiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    machine: str
    started: str
    settings: dict[str, object]
    in_process: dict[str, dict[int, float]] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    soak: list[tuple[float, float]] = field(default_factory=list)


def machine_description() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return f"{os.cpu_count()} cores ({cpu}), load average at start {load[0]:.2f}"


def ratio(value: float, anchor: float | None) -> str:
    return f"{value / anchor:.2f}x" if anchor else "-"


def print_table(report: Report) -> str:
    lines = [
        f"Machine: {report.machine}; started {report.started}",
        f"Each figure: the median of {report.settings['rounds']} interleaved rounds of {report.settings['duration_s']} s; "
        f"load generators pinned to CPU {report.settings['client_cpu']}; ONNX Runtime threads {report.settings['threads']}",
        "",
        "| model | c | target | req/s | vs Triton same protocol | vs grpcio asyncio floor | p50 ms | p99 ms | p99/p50 "
        "| server CPU µs/req | Triton CPU/req ÷ ours | floor CPU/req ÷ ours | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(m.model, m.concurrency, m.target): m for m in report.measurements}
    for m in report.measurements:
        server, protocol = split_target(m.target)
        anchor = None if server == "triton" else by_key.get((m.model, m.concurrency, f"triton-{protocol}"))
        floor_name = {"grpc": "floor-grpc-aio", "grpc-stream": "floor-grpc-aio-stream"}.get(protocol)
        floor = by_key.get((m.model, m.concurrency, floor_name)) if floor_name and m.target != floor_name else None
        lines.append(
            f"| {m.model} | {m.concurrency} | {m.target} | {m.rps:,.0f} | "
            f"{ratio(m.rps, anchor.rps if anchor else None)} | {ratio(m.rps, floor.rps if floor else None)} | "
            f"{m.p50_ms:.2f} | {m.p99_ms:.2f} | "
            f"{m.p99_ms / m.p50_ms if m.p50_ms else float('nan'):.1f} | {m.cpu_us_per_request:,.0f} | "
            f"{ratio(anchor.cpu_us_per_request, m.cpu_us_per_request) if anchor else '-'} | "
            f"{ratio(floor.cpu_us_per_request, m.cpu_us_per_request) if floor else '-'} | {m.errors} |"
        )
    for (model, concurrency, target), m in by_key.items():
        if target != "modeldock-grpc" or (peer := by_key.get((model, concurrency, "mlserver-grpc"))) is None:
            continue
        lines.append("")
        lines.append(
            f"{model} c={concurrency}: ModelDock's gRPC against MLServer's: {ratio(m.rps, peer.rps)} req/s, "
            f"CPU per request {ratio(peer.cpu_us_per_request, m.cpu_us_per_request)} (MLServer's ÷ ours)"
        )
    for model, rates in report.in_process.items():
        best = max(rates, key=rates.__getitem__)
        lines.append("")
        lines.append(
            f"In-process ONNX Runtime, {model}: batch 1 {rates[1]:,.0f} rows/s; best batch {best} {rates[best]:,.0f} rows/s"
        )
    if report.soak:
        first, last = report.soak[0][1], report.soak[-1][1]
        peak = max(r for _, r in report.soak)
        lines.append("")
        lines.append(
            f"ModelDock RSS over a {report.soak[-1][0]:.0f} s run: {first:.0f} MiB at start, {last:.0f} MiB at end, "
            f"peak {peak:.0f} MiB (samples: {', '.join(f'{t:.0f}s={r:.0f}' for t, r in report.soak)})"
        )
    text = "\n".join(lines)
    print(text)
    return text


def median_of(runs: list[Measurement]) -> Measurement:
    """The median of interleaved rounds per figure: one round hit by another process's burst does not decide."""
    first = runs[0]
    return Measurement(
        first.model,
        first.target,
        first.concurrency,
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.errors for r in runs),
        statistics.median(r.cpu_us_per_request for r in runs),
        f"median of {len(runs)}" if len(runs) > 1 else "",
    )


def split_target(target: str) -> tuple[str, str]:
    """``<server>-http-binary``, ``<server>-http-json``, ``<server>-grpc`` or ``<server>-grpc-stream`` as (server,
    protocol); floors speak binary HTTP, or gRPC for ``floor-grpc-*`` (``floor-grpc-aio-stream``: its stream)."""
    if target.endswith("-stream"):
        server, protocol = split_target(target.removesuffix("-stream"))
        if protocol == "grpc":
            return server, "grpc-stream"
    if target.startswith("floor-grpc-"):
        return target, "grpc"
    if target.startswith("floor-"):
        return target, "http-binary"
    if target.endswith("-grpc"):
        return target.removesuffix("-grpc"), "grpc"
    server, _, protocol = target.partition("-http-")
    return server, f"http-{protocol}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-venv", type=Path, default=ROOT.parent / "triton-venv")
    parser.add_argument("--models", default="tiny,mlp")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per cell and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per cell; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--client-cpu", default=str((os.cpu_count() or 1) - 1), help="taskset CPU list for wrk/h2load")
    parser.add_argument(
        "--targets",
        default="modeldock-http-binary,triton-http-binary,modeldock-http-json,triton-http-json,modeldock-grpc,"
        "triton-grpc,floor-uvicorn,floor-granian,floor-granian-rsgi,floor-grpc-aio,floor-grpc-sync",
    )
    parser.add_argument(
        "--modeldock-args", default="", help="extra `modeldock serve` arguments, e.g. '--http-server granian'"
    )
    parser.add_argument(
        "--soak", type=float, default=0, help="then run ModelDock's tiny binary at c=64 this long, sampling RSS"
    )
    parser.add_argument("--baseline", type=Path, help="source tree run as the modeldock-baseline target")
    parser.add_argument(
        "--mlserver-venv", type=Path, default=ROOT.parent / "mlserver-venv", help="venv with mlserver (mlserver-grpc)"
    )
    parser.add_argument("--stream-messages", type=int, default=16, help="requests per stream on -grpc-stream targets")
    parser.add_argument(
        "--independent",
        action="store_true",
        help="the independent run's conditions: tiny and mlp at c=64, one ONNX Runtime thread, ModelDock started "
        "with its defaults (beside the bench's start), 10 s rounds",
    )
    parser.add_argument(
        "--grpc",
        action="store_true",
        help="issue 24's gRPC comparison: tiny at c=64, unary and streaming, ModelDock against the grpcio asyncio "
        "floors, MLServer's gRPC and Triton's, 5 rounds",
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results", help="folder for bench_triton.{json,md}")
    args = parser.parse_args()
    if args.grpc:
        args.models, args.concurrency, args.rounds = "tiny", "64", max(args.rounds, 5)
        args.duration = max(args.duration, 3.0)
        args.targets = (
            "modeldock-grpc,floor-grpc-aio,mlserver-grpc,triton-grpc,"
            "modeldock-grpc-stream,floor-grpc-aio-stream,triton-grpc-stream"
        )
    if args.independent:
        args.models, args.concurrency, args.threads, args.duration = "tiny,mlp", "64", 1, max(args.duration, 10.0)
        args.targets = (
            "modeldock-defaults-http-binary,modeldock-http-binary,triton-http-binary,"
            "modeldock-defaults-http-json,modeldock-http-json,triton-http-json"
        )
    models = [m for m in args.models.split(",") if m]
    levels = [int(c) for c in args.concurrency.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    for tool in ("wrk", "h2load", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install wrk nghttp2-client")

    server_names = list(dict.fromkeys(split_target(t)[0] for t in targets))
    needs_triton = "triton" in server_names
    triton_dir, site = (
        triton_install(args.triton_venv) if needs_triton else (Path(), Path(sysconfig.get_paths()["purelib"]))
    )
    report = Report(
        machine=machine_description(),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        settings={
            "duration_s": args.duration,
            "rounds": args.rounds,
            "threads": args.threads,
            "client_cpu": args.client_cpu,
            "modeldock_args": args.modeldock_args,
            "stream_messages": args.stream_messages,
            "targets": targets,
        },
    )
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        work = Path(tmp)
        onnx_paths = write_repositories(work, models, args.threads, site)
        servers: dict[str, Target] = {}
        # Triton's Python backend stub has died under gRPC load in some runs (a segmentation fault): it is started
        # again for the next round, at most this many times, so one crash does not leave its targets without figures.
        triton_restarts = 3
        try:
            for name in server_names:
                if name.startswith("modeldock"):
                    servers[name] = start_modeldock(work, name, args.modeldock_args.split(), args.baseline)
                elif name == "triton":
                    servers[name] = start_triton(work, triton_dir)
                elif name == "mlserver":
                    servers[name] = start_mlserver(work, args.mlserver_venv, args.threads)
                else:
                    servers[name] = start_floor(work, name.removeprefix("floor-"), onnx_paths, args.threads)
            for name, server in servers.items():
                if not name.startswith("floor-"):
                    wait_ready(server, models)
                for model in models:
                    if name.startswith("floor-grpc-") or name == "mlserver":
                        check_grpc_answer(server.grpc_port, model)
                        continue
                    check_answer(server.http_port, model, binary=True)
                    if not name.startswith("floor-"):
                        check_answer(server.http_port, model, binary=False)

            for model in models:
                # Once before each concurrency level (and once at the end), keeping each batch size's best: a second
                # of ONNX Runtime alone is easily disturbed by other work on a shared machine.
                rates: dict[int, float] = {}
                for concurrency in [*levels, None]:
                    for batch, rate in in_process(onnx_paths[model], FEATURES[model], args.threads).items():
                        rates[batch] = max(rate, rates.get(batch, 0.0))
                    if concurrency is None:
                        break
                    rounds: dict[str, list[Measurement]] = {t: [] for t in targets}
                    for _ in range(args.rounds):
                        for target in targets:
                            server = servers[split_target(target)[0]]
                            if server.name == "triton" and server.process.poll() is not None and triton_restarts:
                                triton_restarts -= 1
                                print("triton died; starting it again for the next measurements", flush=True)
                                server = servers["triton"] = start_triton(work, triton_dir)
                                wait_ready(server, models)
                            if server.process.poll() is not None:
                                continue  # reported once, when it died; the other targets carry on
                            try:
                                m = measure(
                                    work, servers, target, model, concurrency, args.duration, args.client_cpu,
                                    args.stream_messages,
                                )  # fmt: skip
                            except (httpx.HTTPError, subprocess.CalledProcessError) as exc:
                                log_tail = server.log.read_text()[-2000:] if server.log else ""
                                print(f"{target} failed ({exc}); server log ends:\n{log_tail}", flush=True)
                                continue
                            rounds[target].append(m)
                            print(
                                f"{model:>5} c={concurrency:<3} {target:<30} {m.rps:9.0f} req/s  p50 {m.p50_ms:7.2f} "
                                f"ms  p99 {m.p99_ms:7.2f} ms  {m.cpu_us_per_request:6.0f} CPU us/req  errors {m.errors}",
                                flush=True,
                            )
                    report.measurements.extend(median_of(runs) for runs in rounds.values() if runs)
                report.in_process[model] = rates
            soaked = next((name for name in servers if name.startswith("modeldock")), None)
            if args.soak and soaked is not None:
                report.soak = soak(work, servers[soaked], models[0], args.soak, args.client_cpu)
        finally:
            for target in servers.values():
                target.stop()
    text = print_table(report)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_triton.md").write_text(text + "\n")
    (args.output / "bench_triton.json").write_text(json.dumps(asdict(report), indent=1) + "\n")


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (Triton's Python backend stubs, ModelDock's worker processes)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            try:
                tree += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process tree so far."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def keeps_statistics(server_name: str) -> bool:
    """Servers answering Triton's statistics route; the floors and MLServer keep none (h2load's count stands)."""
    return server_name.startswith("modeldock") or server_name == "triton"


def measure(
    work: Path,
    servers: dict[str, Target],
    target: str,
    model: str,
    concurrency: int,
    seconds: float,
    cpu: str,
    stream_messages: int = 16,
) -> Measurement:
    server_name, protocol = split_target(target)
    server = servers[server_name]
    counted = keeps_statistics(server_name)
    before = success_count(server.http_port, model) if counted else 0
    cpu_before = cpu_seconds(server.process.pid)
    if protocol.startswith("grpc"):
        messages = stream_messages if protocol == "grpc-stream" else 0
        rps, p50, p99, errors, done = run_h2load(work, server.grpc_port, model, concurrency, seconds, cpu, messages)
    else:
        body, json_size = http_body(model, protocol == "http-binary")
        rps, p50, p99, errors, done = run_wrk(work, server.http_port, model, body, json_size, concurrency, seconds, cpu)
    cpu_used = cpu_seconds(server.process.pid) - cpu_before
    answered = success_count(server.http_port, model) - before if counted else done
    # h2load counts HTTP/2 status only; the server's statistics say whether each gRPC call really succeeded.
    if protocol.startswith("grpc") and answered < done:
        errors += done - answered
    per_request = 1e6 * cpu_used / answered if answered else float("nan")
    return Measurement(model, target, concurrency, rps, p50, p99, errors, per_request)


def soak(work: Path, server: Target, model: str, seconds: float, cpu: str) -> list[tuple[float, float]]:
    """Load ModelDock for ``seconds`` and sample its RSS every few seconds: flat means nothing leaks per request."""
    body, json_size = http_body(model, True)
    body_file = work / "soak.bin"
    body_file.write_bytes(body)
    script = work / "soak.lua"
    script.write_text(
        f'wrk.method = "POST"\nlocal f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{json_size}"\n'
    )
    command = ["taskset", "-c", cpu, "wrk", "-t1", "-c64", f"-d{int(seconds)}s", "-s", str(script),
               f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer"]  # fmt: skip
    samples = [(0.0, rss_mib(server.process.pid))]
    begin = time.monotonic()
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    step = max(1.0, seconds / 12)
    while load.poll() is None:
        time.sleep(step)
        samples.append((time.monotonic() - begin, rss_mib(server.process.pid)))
    out = load.communicate()[0]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    print(f"soak: {rps.group(1) if rps else '?'} req/s over {seconds:.0f} s; RSS samples {samples}", flush=True)
    return samples


if __name__ == "__main__":
    main()
