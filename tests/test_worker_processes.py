"""What the server does so that the worker processes it spawns start with a sound sys.path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# In a child interpreter: which modules are imported, and sys.path, are process-wide.
LATER_IMPORT = (
    "import sys\n"
    "{before}"
    "path, entries = sys.path, list(sys.path)\n"
    "import cv2  # what a loading thread may do at any time (mistral_common's tokenizers do, for vLLM)\n"
    "print(sys.path is path and sys.path == entries)\n"
)


def later_import_keeps_sys_path(before: str) -> bool:
    code = LATER_IMPORT.format(before=before)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


def test_libraries_that_edit_sys_path_while_importing_are_imported_before_models_load() -> None:
    pytest.importorskip("cv2")
    # The hazard: importing cv2 puts its own folder on sys.path (where cv2/typing shadows the standard library's
    # typing for a child spawned meanwhile) and replaces sys.path afterwards.
    assert not later_import_keeps_sys_path("")
    # Imported once up front, as the server does before loading models, a later import changes nothing.
    setup = "from server.worker_processes import import_path_editing_libraries\nimport_path_editing_libraries()\n"
    assert later_import_keeps_sys_path(setup)
