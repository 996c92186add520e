"""The CPU kernel for one row through a dense layer (``dense_row.c``), built as ``native_kernels`` builds ours.

Why: a single stream decodes one row a step, and each dense layer is then a matrix-vector product that only has to
stream its weight from memory once. oneDNN's inner product, even on a weight packed for one row, read GPT-2 small's
48 dense weights (340 MB) in 20-22 ms on the machine this was measured on; one sequential pass over the row-major
weight takes 14-16 ms, close to the time to merely sum that memory (13 ms). On a decode step of ~27 ms that is a
quarter of the step. At two rows and more, oneDNN's blocked kernels reuse each weight load across rows and stay
ahead, so they keep those steps.

Where no compiler is at hand (or it fails), the one-row steps use oneDNN's one-row packing instead (slower, the same
answers within float32 rounding). ``parameters.dense_row_kernel: false`` chooses that too.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from backends.transformers import native_kernels

SOURCE = Path(__file__).with_name("dense_row.c")
_BUILDS: tuple[native_kernels.Build, ...] = ((["-O3", "-march=native"], []), (["-O3"], []))
# A thread takes a share of a layer only when it reads at least this many bytes of the weight: below it, handing
# the share over costs more than reading it.
_BYTES_PER_THREAD = 2 << 20


class DenseRowKernel:
    """``weight @ x + bias`` for one row ``x``, split between torch's intra-op threads when the weight is large."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.dense_row
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [pointer, pointer, pointer, pointer, integer, integer, integer]
        function.restype = None
        self._function = function

    def project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [in_features] float32; weight [out_features, in_features] contiguous float32; returns [out_features]."""
        out_features, in_features = weight.shape
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(out_features, dtype=weight.dtype)
        arguments = (x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None, out.data_ptr())

        def call(first: int, last: int) -> None:
            self._function(*arguments, in_features, first, last)

        threads = min(torch.get_num_threads(), weight.numel() * weight.element_size() // _BYTES_PER_THREAD)
        native_kernels.run_shares(call, native_kernels.even_shares(out_features, threads))
        return out


@cache
def load() -> DenseRowKernel | None:
    """The kernel, built on first use; None (logged once) where it cannot be built here."""
    library = native_kernels.build(SOURCE, _BUILDS, "a single row's dense layers")
    return DenseRowKernel(library) if library is not None else None
