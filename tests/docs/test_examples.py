"""Every fenced ``python`` block in docs/ and README.md runs, as written, against a server on the bundled models.

``localhost:8000`` and ``localhost:8001`` in a block become the test server's HTTP and gRPC addresses; nothing else
is changed. A block whose first line is ``# not run: <reason>`` is skipped with that reason (a GPU, a real
checkpoint or an uninstalled extra). Each block runs in its own interpreter, as a reader would paste it.

The server runs in explicit mode: the light models (ONNX, PyTorch, Python, ensembles) load at start, and a model
served by an engine (transformers, vLLM, llama.cpp, diffusers) loads the first time a block names it, so the test
pays only for the engines its examples use.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BUILD_FILES, BUNDLED_REPOSITORY, ROOT, ServerProcess

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SKIP_MARK = "# not run:"
TIMEOUT_S = 180
ENGINE_BACKENDS = {"transformers", "vllm", "llamacpp", "diffusers"}


def engine_models(repository: Path) -> set[str]:
    """The bundled models served by an engine, which load on first use."""
    names = set()
    for config in repository.glob("*/config.yaml"):
        backend = (yaml.safe_load(config.read_text()) or {}).get("backend", "")
        if backend in ENGINE_BACKENDS:
            names.add(config.parent.name)
    return names


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks() -> Iterator[tuple[str, str]]:
    for path in documents():
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield f"{path.relative_to(ROOT)}:{line}", match.group(1)


EXAMPLES = list(blocks())


@pytest.fixture(scope="module")
def bundled_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole bundled repository: unlike the shared fixture's copy it keeps the slow-starting engines (vLLM),
    which load only if a block names them."""
    target = tmp_path_factory.mktemp("examples") / "model_repository"
    shutil.copytree(BUNDLED_REPOSITORY, target, ignore=shutil.ignore_patterns(*BUILD_FILES))
    return target


@pytest.fixture(scope="module")
def examples_server(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    light = sorted(
        {path.parent.name for path in bundled_repository.glob("*/config.yaml")} - engine_models(bundled_repository)
    )
    args = ["--model-control-mode", "explicit"]
    for name in light:
        args += ["--load-model", name]
    server = start_server(bundled_repository, *args, wait=False)
    server.wait_ready(timeout=300)
    return server


@pytest.fixture(scope="module")
def loaded_engines() -> set[str]:
    return set()


def load_named_engines(code: str, server: ServerProcess, repository: Path, loaded: set[str]) -> None:
    for name in sorted(engine_models(repository) - loaded):
        if re.search(rf"\b{re.escape(name)}\b", code):
            answer = httpx.post(f"{server.url}/v2/repository/models/{name}/load", json={}, timeout=600)
            assert answer.status_code == 200, f"loading {name}: {answer.text}"
            loaded.add(name)


def test_examples_found() -> None:
    # The quickstart's and the README's examples at least; a broken fence pattern would otherwise pass vacuously.
    assert len(EXAMPLES) >= 8
    assert any(name.startswith("README.md") for name, _ in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(
    name: str,
    code: str,
    examples_server: ServerProcess,
    bundled_repository: Path,
    loaded_engines: set[str],
    tmp_path: Path,
) -> None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith(SKIP_MARK):
        pytest.skip(first[len(SKIP_MARK) :].strip())
    load_named_engines(code, examples_server, bundled_repository, loaded_engines)
    code = code.replace("localhost:8000", f"127.0.0.1:{examples_server.http_port}")
    code = code.replace("localhost:8001", examples_server.grpc_url)
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
