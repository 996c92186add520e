"""``modeldock validate`` on good and broken repositories, run as the command users run."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lifecycle_models import BUNDLED_REPOSITORY, add_simple, append_config

ROOT = Path(__file__).resolve().parents[2]


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    # A wide terminal so the table does not fold the messages the assertions look for.
    env = {**os.environ, "COLUMNS": "1000"}
    return subprocess.run(
        [sys.executable, "-m", "server", "validate", *map(str, paths)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_validate_accepts_a_good_repository(tmp_path: Path) -> None:
    repository = tmp_path / "good"
    shutil.copytree(BUNDLED_REPOSITORY, repository, ignore=shutil.ignore_patterns("build.py", "__pycache__"))
    add_simple(tmp_path / "second", "another")
    result = validate(repository, tmp_path / "second")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "simple" in result.stdout and "another" in result.stdout


def test_validate_reports_each_problem_with_file_and_field(tmp_path: Path) -> None:
    repository = tmp_path / "bad"
    append_config(add_simple(repository, "typo"), "max_batchsize: 4\n")
    missing = add_simple(repository, "missing_file")
    (missing / "1" / "model.onnx").unlink()
    no_backend = add_simple(repository, "unknown_backend")
    (no_backend / "config.yaml").write_text(
        (no_backend / "config.yaml").read_text().replace("backend: onnxruntime", "backend: nosuch")
    )
    append_config(add_simple(repository, "policy"), "version_policy:\n  specific:\n    versions: [7]\n")
    append_config(
        add_simple(repository, "warmup"),
        "model_warmup:\n  - name: w\n    inputs:\n      INPUT9: {data_type: TYPE_FP32, dims: [16], zero_data: true}\n",
    )
    no_versions = repository / "no_versions"
    no_versions.mkdir()
    shutil.copy(BUNDLED_REPOSITORY / "simple" / "config.yaml", no_versions / "config.yaml")
    add_simple(repository, "fine")

    result = validate(repository)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    def line_with(*parts: str) -> str:
        found = [line for line in lines if all(part in line for part in parts)]
        assert found, f"no line with {parts} in:\n{result.stdout}"
        return found[0]

    line_with("typo", str(repository / "typo" / "config.yaml"), "field 'max_batchsize': unknown field")
    line_with("missing_file", str(repository / "missing_file" / "1"), "model.onnx not found")
    line_with("unknown_backend", "config.yaml", "unknown backend 'nosuch'")
    line_with("policy", "config.yaml", "field 'version_policy'", "[1]")
    line_with("warmup", "config.yaml", "model_warmup[0]", "INPUT9")
    line_with("no_versions", "no numbered version folders")
    assert "6 problem(s) in 7 model(s)" in result.stdout
    assert not any("fine" in line for line in lines)


def test_validate_prints_bracketed_text_as_is(tmp_path: Path) -> None:
    """The table shows messages verbatim: the install hint's 'modeldock[tensorrt]' is not taken for markup."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed, so there is no install hint to show")
    model_dir = tmp_path / "repo" / "engine"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.plan").write_bytes(b"")
    (model_dir / "config.yaml").write_text(
        "backend: tensorrt\nmax_batch_size: 4\ninstance_group: [{count: 1, kind: KIND_GPU, gpus: [0]}]\n"
        "input:\n  - {name: X, data_type: TYPE_FP32, dims: [4]}\n"
        "output:\n  - {name: Y, data_type: TYPE_FP32, dims: [4]}\n"
    )
    result = validate(tmp_path / "repo")
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'pip install "modeldock[tensorrt]"' in result.stdout, result.stdout


def test_validate_checks_an_ensembles_graph_against_its_step_models(tmp_path: Path) -> None:
    from tests.pipeline_models import add_add_one, tensor, write_model

    add_add_one(tmp_path)
    step = {"model_name": "add_one", "input_map": {"Y": "IN"}, "output_map": {"Z": "OUT"}}
    ensemble = {
        "platform": "ensemble",
        "max_batch_size": 8,
        "input": [tensor("IN")],
        "output": [tensor("OUT", dims=[5])],
        "ensemble_scheduling": {"step": [step]},
    }
    write_model(tmp_path, "pipeline", ensemble)
    write_model(tmp_path, "missing_step", {**ensemble, "ensemble_scheduling": {"step": [{**step, "model_name": "x"}]}})
    result = validate(tmp_path)
    assert result.returncode == 1
    assert "step 0 (model 'add_one'): tensor 'OUT' has shape [-1, 4] where it is produced but [-1, 5]" in result.stdout
    assert "step 0 (model 'x'): no such model in the model repository" in result.stdout
