"""Fixtures shared by the tests of ModelDock's own CPU kernels (``backends/transformers/native_kernels.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest


def _built(load: Callable[[], Any]) -> Any:
    kernel = load()
    assert kernel is not None, "the machine has a C compiler (CI installs one), so the kernel must build"
    return kernel


@pytest.fixture(scope="module")
def decode_attention_kernel() -> Any:
    from backends.transformers import decode_kernel

    return _built(decode_kernel.load)


@pytest.fixture(scope="module")
def dense_row_kernel() -> Any:
    from backends.transformers import dense_kernel

    return _built(dense_kernel.load)


@pytest.fixture
def intra_op_threads() -> Callable[[int], AbstractContextManager[None]]:
    """``with intra_op_threads(n):`` runs the block with torch at n intra-op threads (the count a kernel splits
    its work by), and puts the previous count back after it."""
    torch = pytest.importorskip("torch")

    @contextmanager
    def threads(count: int) -> Iterator[None]:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    return threads
