"""Process-wide settings the server applies once it has started."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_gc_is_frozen_and_collects_young_objects_less_often() -> None:
    # In a child interpreter: freezing and thresholds are process-wide and must not leak into the test process.
    code = (
        "import gc\n"
        "from server.runtime import GC_YOUNG_THRESHOLD, keep_gc_off_the_hot_path\n"
        "before = gc.get_threshold()\n"
        "keep_gc_off_the_hot_path()\n"
        "after = gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert after == (GC_YOUNG_THRESHOLD, before[1], before[2]), (before, after)\n"
        "assert GC_YOUNG_THRESHOLD > before[0]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
