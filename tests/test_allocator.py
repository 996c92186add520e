"""glibc malloc settings for the server: applied and exported once, never over an operator's own."""

from __future__ import annotations

import os
import platform

import pytest

from server import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name == allocator.OPT_OUT_ENV:
            monkeypatch.delenv(name)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)  # so that what a test exports is removed after it
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_settings_are_applied_and_exported_to_children(clean_env: pytest.MonkeyPatch) -> None:
    assert allocator.tune_malloc() is True
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(allocator.MMAP_THRESHOLD_BYTES)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(allocator.TRIM_THRESHOLD_BYTES)
    # A child started later (a worker process) sees them and leaves them alone.
    assert allocator.tune_malloc() is False


def test_an_operators_own_malloc_settings_win(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.tune_malloc() is False
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_opting_out(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv(allocator.OPT_OUT_ENV, value)
    assert allocator.tune_malloc() is False
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
