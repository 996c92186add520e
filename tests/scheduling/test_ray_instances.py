"""Model instances as Ray actors on a real two-node Ray cluster, with the real server and real clients.

Ray advertises the machine's network address whatever it is told, and tests may only use loopback, so the cluster,
the server and the clients all run inside a network namespace that has nothing but ``lo`` (and a PID namespace of
its own, so every Ray process ends with it). The one test run outside re-runs this file in such a namespace.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, ServerProcess, free_port
from tests.scheduling.test_batching_e2e import body, scale_model, sleepy_config, write_model

pytest.importorskip("ray", reason='needs Ray: pip install "modeldock[ray]"')

INSIDE_ENV = "MODELDOCK_RAY_NAMESPACE"
INSIDE = os.environ.get(INSIDE_ENV) == "1"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]

inside_only = pytest.mark.skipif(
    not INSIDE, reason="runs inside a loopback-only namespace, started by test_ray_cluster_in_a_loopback_only_namespace"
)


def namespace_unavailable() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs the unshare and ip commands (util-linux, iproute2)"
    probe = subprocess.run([*NAMESPACE, "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs root or user namespaces): {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(INSIDE, reason="this is the namespace's own run")
@pytest.mark.slow
def test_ray_cluster_in_a_loopback_only_namespace() -> None:
    reason = namespace_unavailable()
    if reason is not None:
        pytest.skip(reason)
    inner = (
        f"{sys.executable} -m pytest {Path(__file__).relative_to(ROOT)} -q -p no:cacheprovider -rs "
        "-k 'not loopback_only_namespace'"
    )
    result = subprocess.run(
        [*NAMESPACE, "sh", "-c", f"ip link set lo up && exec {inner}"],
        cwd=ROOT,
        env={**os.environ, **RAY_ENV, INSIDE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=420,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    # Every test of the namespace's run passed: none was skipped there.
    assert re.search(r"\b5 passed\b", output) and "skipped" not in output, output[-8000:]


# -- run inside the namespace -----------------------------------------------------------------------------------


def ray_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def node_ports() -> list[str]:
    """Ports of one node's own services: some default to fixed numbers, which two nodes on one host would share."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port"]
    flags += ["--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"]
    return [f"{flag}={free_port()}" for flag in flags]


def start_node(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(ray_command(*args), env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        pytest.fail(f"ray {' '.join(args[:2])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A head node and a second node with 2 CPUs each, as two sets of processes on this machine."""
    assert os.getpid() == 1, "the Ray cluster is only started as PID 1 of its own namespace"
    temp_dir = tempfile.mkdtemp(prefix="mdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats"]
    env = {**os.environ, **RAY_ENV}
    head = ["start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    start_node([*head, "--temp-dir", temp_dir, *common, *node_ports()], env)
    start_node(["start", "--address", address, "--num-cpus", "2", *common, *node_ports()], env)
    yield address
    # Safe to stop everything Ray: as PID 1 of a fresh PID namespace, "everything" is this cluster only.
    subprocess.run(ray_command("stop", "--force"), env=env, capture_output=True)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_server(
    ray_address: str, start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("ray") / "models"
    # Two instances reserving 2 CPUs each: a node has room for one, so Ray must use both nodes.
    doubler = sleepy_config(0, max_batch_size=8, instances=2, max_queue_delay_microseconds=2000)
    doubler["parameters"]["ray_num_cpus"] = "2"
    write_model(repository, "doubler", doubler)
    slow = sleepy_config(3000, max_batch_size=0)
    slow["parameters"]["ray_num_cpus"] = "0"
    write_model(repository, "slow", slow)
    local = sleepy_config(0, max_batch_size=0)
    local["parameters"]["ray"] = "false"
    write_model(repository, "local_doubler", local)
    too_big = sleepy_config(0, max_batch_size=0)
    too_big["parameters"].update(ray_num_cpus="64", load_timeout_secs="3")
    write_model(repository, "too_big", too_big)
    write_model(
        repository,
        "gpu_scale",
        {"backend": "onnxruntime", "max_batch_size": 4, "instance_group": [{"kind": "KIND_GPU"}]},
        scale_model(),
    )
    server = start_server(repository, "--ray", ray_address, env=RAY_ENV)
    yield server
    # Stopped while the cluster still runs: its actors are unloaded and the server exits cleanly.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0, server.log()
    assert "model 'doubler' unloaded" in server.log()


def actor_lines(server: ServerProcess, model: str) -> list[tuple[str, int]]:
    """(node id, process id) of each actor the server started for ``model``, in start order."""
    pattern = rf"model '{model}': instance \S+ runs on Ray node (\w+), process (\d+)"
    return [(node, int(pid)) for node, pid in re.findall(pattern, server.log())]


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@inside_only
async def test_instances_are_actors_on_both_nodes_and_answer_correctly(ray_server: ServerProcess) -> None:
    actors = actor_lines(ray_server, "doubler")
    assert len(actors) == 2
    assert len({node for node, _ in actors}) == 2, "the two instances did not land on two nodes"
    for _, pid in actors:
        assert pid != ray_server.process.pid
        assert process_title(pid).startswith("ray::InstanceActor"), process_title(pid)

    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0, 10, (1, 4)).astype(np.float32) for _ in range(60)]
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/v2/models/doubler/infer", json=body(x)) for x in inputs))
    for x, response in zip(inputs, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["outputs"][0]["data"], (2 * x).ravel(), rtol=1e-6)

    grpc_client = grpcclient.InferenceServerClient(ray_server.grpc_url)
    tensor = grpcclient.InferInput("INPUT", [3, 4], "FP32")
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor.set_data_from_numpy(data)
    result = grpc_client.infer("doubler", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), 2 * data)
    stats = grpc_client.get_inference_statistics("doubler", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 63


@inside_only
async def test_killed_actor_fails_only_its_batch_and_is_replaced(ray_server: ServerProcess) -> None:
    [(_, pid)] = actor_lines(ray_server, "slow")
    x = np.full((1, 4), 5.0, np.float32)
    unbatched = x[0]  # "slow" does not batch: its requests have no batch dimension
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=60) as client:
        doomed = asyncio.create_task(client.post("/v2/models/slow/infer", json=body(unbatched)))
        await asyncio.sleep(1.0)  # the batch is executing in the actor
        os.kill(pid, signal.SIGKILL)
        others = await asyncio.gather(*(client.post("/v2/models/doubler/infer", json=body(x)) for _ in range(10)))
        failed = await doomed
        assert failed.status_code == 500
        assert "Ray actor died" in failed.json()["error"]
        assert all(r.status_code == 200 and r.json()["outputs"][0]["data"] == [10.0] * 4 for r in others)

        # The next request waits for the replacement actor and succeeds on it.
        started = time.monotonic()
        recovered = await client.post("/v2/models/slow/infer", json=body(unbatched))
        assert recovered.status_code == 200, recovered.text
        assert recovered.json()["outputs"][0]["data"] == [10.0] * 4
        assert time.monotonic() - started < 45
    actors = actor_lines(ray_server, "slow")
    assert len(actors) == 2 and actors[1][1] != pid
    assert process_title(actors[1][1]).startswith("ray::InstanceActor")


@inside_only
async def test_model_with_ray_false_keeps_its_instances_in_the_server(ray_server: ServerProcess) -> None:
    assert actor_lines(ray_server, "local_doubler") == []
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as client:
        response = await client.post("/v2/models/local_doubler/infer", json=body(np.ones(4, np.float32)))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [2.0] * 4


@inside_only
async def test_gpu_instances_on_a_cluster_without_gpus_fail_the_load_with_the_reason(
    ray_server: ServerProcess,
) -> None:
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as client:
        index = (await client.post("/v2/repository/index", json={})).json()
    [row] = [r for r in index if r["name"] == "gpu_scale"]
    assert row["state"] == "UNAVAILABLE"
    assert "KIND_GPU requested but the Ray cluster has no GPU" in row["reason"]


@inside_only
async def test_an_actor_no_node_can_place_fails_the_load_at_its_timeout(ray_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as client:
        index = (await client.post("/v2/repository/index", json={})).json()
    [row] = [r for r in index if r["name"] == "too_big"]
    assert row["state"] == "UNAVAILABLE"
    assert "not started within 3s; does the Ray cluster have 64 CPU(s) and 0 GPU(s) free for it?" in row["reason"]
