"""How ``instance_group`` becomes Ray actor resources, and how ``--ray`` is read; no cluster needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backends.onnxruntime import OnnxRuntimeBackend
from server.cli import _ray_address_optional
from server.config import ModelConfig
from server.errors import ConfigError, ModelLoadError
from tests.conftest import ROOT
from tests.slow_backend import SleepBackend

pytest.importorskip("ray", reason='needs Ray: pip install "modeldock[ray]"')

from server.scheduling.ray_instances import RayCluster, plan_actors  # noqa: E402 - after the skip above


def config(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "backend": "onnxruntime", **fields})


def test_cpu_instances_reserve_one_cpu_each_unless_the_model_says_otherwise() -> None:
    plan = plan_actors(config(instance_group=[{"count": 3, "kind": "KIND_CPU"}]), OnnxRuntimeBackend, 0)
    assert [(p.name, p.num_cpus, p.num_gpus, p.device.kind) for p in plan] == [
        ("m_0_0", 1.0, 0.0, "cpu"),
        ("m_0_1", 1.0, 0.0, "cpu"),
        ("m_0_2", 1.0, 0.0, "cpu"),
    ]
    half = config(instance_group=[{"count": 2, "kind": "KIND_CPU"}], parameters={"ray_num_cpus": "0.5"})
    assert [p.num_cpus for p in plan_actors(half, OnnxRuntimeBackend, 0)] == [0.5, 0.5]


def test_gpu_instances_take_one_gpu_each_count_per_listed_gpu() -> None:
    groups = [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}, {"count": 1, "kind": "KIND_CPU"}]
    plan = plan_actors(config(instance_group=groups), OnnxRuntimeBackend, 8)
    assert [(p.num_gpus, p.device.kind) for p in plan] == [(1.0, "gpu")] * 4 + [(0.0, "cpu")]


def test_auto_kind_follows_the_cluster_gpus() -> None:
    assert plan_actors(config(), OnnxRuntimeBackend, 0)[0].num_gpus == 0
    assert plan_actors(config(), OnnxRuntimeBackend, 2)[0].num_gpus == 1
    # A backend without GPU support stays on CPUs even on a GPU cluster.
    sleepy = config(backend="tests.slow_backend:SleepBackend")
    assert plan_actors(sleepy, SleepBackend, 2)[0].num_gpus == 0


def test_impossible_plans_fail_the_load_naming_the_field() -> None:
    with pytest.raises(ModelLoadError, match=r"instance_group\[0\]\.kind.*no GPU"):
        plan_actors(config(instance_group=[{"kind": "KIND_GPU"}]), OnnxRuntimeBackend, 0)
    with pytest.raises(ModelLoadError, match="cannot run KIND_GPU"):
        plan_actors(config(instance_group=[{"kind": "KIND_GPU"}]), SleepBackend, 4)
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(ConfigError, match="parameters.ray_num_cpus"):
            plan_actors(config(parameters={"ray_num_cpus": bad}), OnnxRuntimeBackend, 0)


def test_models_go_to_the_cluster_unless_they_opt_out() -> None:
    cluster = RayCluster()
    assert cluster.places(config())
    assert not cluster.places(config(parameters={"ray": "false"}))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--ray"], ["serve", "--ray="]),
        (["serve", "--ray", "--http-port", "1"], ["serve", "--ray=", "--http-port", "1"]),
        (["serve", "--ray", "10.0.0.1:6379"], ["serve", "--ray", "10.0.0.1:6379"]),
        (["serve", "--ray=auto"], ["serve", "--ray=auto"]),
        (["serve"], ["serve"]),
    ],
)
def test_ray_option_takes_an_optional_address(args: list[str], expected: list[str]) -> None:
    assert _ray_address_optional(args) == expected


def test_serve_ray_without_ray_installed_says_how_to_install_it(tmp_path: Path) -> None:
    # Hidden the way a missing package looks to importlib; the check comes before any model or port is touched.
    script = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['modeldock', 'serve', '--ray', '--model-repository', "
        f"{str(tmp_path)!r}]; from server.cli import main; main()"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert '--ray needs Ray: pip install "modeldock[ray]"' in completed.stdout + completed.stderr
