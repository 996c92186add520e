"""Every fenced ``python`` block in docs/ and README.md runs, as written, against a server on the bundled models.

``localhost:8000`` and ``localhost:8001`` in a block become the test server's HTTP and gRPC addresses; nothing else
is changed. A block whose first line is ``# not run: <reason>`` is skipped with that reason (a GPU, a real
checkpoint or an uninstalled extra). Each block runs in its own interpreter, as a reader would paste it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess

FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SKIP_MARK = "# not run:"
TIMEOUT_S = 180


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
def examples_server(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    """A server on (a copy of) the bundled repository, once every model that can load has loaded. Its own, with a
    longer start-up allowance than the shared one: the bundled repository holds every kind of model."""
    server = start_server(bundled_repository, wait=False)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rows = httpx.post(f"{server.url}/v2/repository/index", json={}).json()
        if not any(row["state"] == "LOADING" for row in rows) and any(row["state"] == "READY" for row in rows):
            return server
        time.sleep(0.2)
    raise TimeoutError(f"bundled models still loading:\n{server.log()}")


def test_examples_found() -> None:
    # The quickstart's and the README's examples at least; a broken fence pattern would otherwise pass vacuously.
    assert len(EXAMPLES) >= 8
    assert any(name.startswith("README.md") for name, _ in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name: str, code: str, examples_server: ServerProcess, tmp_path: Path) -> None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith(SKIP_MARK):
        pytest.skip(first[len(SKIP_MARK) :].strip())
    code = code.replace("localhost:8000", f"127.0.0.1:{examples_server.http_port}")
    code = code.replace("localhost:8001", examples_server.grpc_url)
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
