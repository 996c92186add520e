"""The documentation site builds with ``mkdocs build --strict``: a broken link, a page missing from the nav that
it links to, or a bad mkdocs.yml fails here rather than on the published site."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()
    assert (tmp_path / "site" / "console" / "index.html").exists()


def test_performance_plots_draw_from_the_committed_results(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("performance_plots", ROOT / "docs" / "performance_plots.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(tmp_path)
    assert [path.name for path in written] == [f"bench-{run}.png" for run in (*module.RUNS, *module.LLM_RUNS)]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # The page shows the committed copy of each plot.
        assert (ROOT / "docs" / "images" / path.name).exists()
