"""Fixtures of the generation engine's tests (``generation_engines`` holds what they are built from)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def reference(causal_lm_dir: Path) -> Callable[[str, int], list[int]]:
    """transformers' greedy tokens for a prompt alone, on the test GPT-2 (see ``greedy_reference``)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.scheduling.generation_engines import greedy_reference

    return greedy_reference(causal_lm_dir)
