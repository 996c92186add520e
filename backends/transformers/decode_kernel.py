"""The CPU decode-attention kernel (``decode_attention.c``): compiled once per machine, loaded with ``ctypes``.

Why a kernel of our own: at decode sizes, PyTorch's CPU flash attention costs its setup once per row and layer
(192 calls a step for 16 rows of a 12-layer model), and that setup, not the memory the keys take, was a third of a
step. vLLM reads its paged cache with its own kernel for the same reason. It is built and cached as
``native_kernels`` builds every kernel of ours.

Where no compiler is at hand (or it fails), the engine uses PyTorch's attention and logs why once: slower, the same
answers. ``parameters.decode_attention_kernel: false`` chooses that too.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from backends.transformers import native_kernels

SOURCE = Path(__file__).with_name("decode_attention.c")
# Fast first (vectorized exponentials from glibc's libmvec need -ffast-math, which the link step leaves out so the
# library never switches the process's floating point to flush denormals), then portable.
_BUILDS: tuple[native_kernels.Build, ...] = (
    (["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], ["-lmvec", "-lm"]),
    (["-O3", "-fopenmp-simd"], ["-lm"]),
)
# A thread takes a share of the rows only when the step reads at least this many keys per thread: below it, the
# hand-off costs more than it saves.
_KEYS_PER_THREAD = 2048


class DecodeKernel:
    """Every decoding row of a step against its paged keys, in one call per layer (see ``decode_attention.c``)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.paged_decode_attention
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [
            pointer, integer, integer,  # query and its strides
            pointer, pointer, integer,  # key, value, slots
            pointer, integer, pointer, pointer, pointer,  # tables, width, begins, ends, merge
            integer, integer, integer, integer, integer, integer,  # rows, heads, kv heads, dim, block size
            ctypes.c_float, pointer, pointer,  # scale, out, lse
        ]  # fmt: skip
        function.restype = ctypes.c_int
        self._function = function

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rows: DecodeRows,
        scale: float,
        out: torch.Tensor,
        lse: torch.Tensor | None = None,
    ) -> None:
        """query [rows, heads, dim] (any row and head strides); key, value [kv_heads, slots, dim] contiguous;
        out [rows, heads, dim] and lse [rows, heads] contiguous float32, written in place. Where ``rows.merge``
        is 1, they hold an earlier part's output and log-sum-exp on entry (see the C source)."""
        merge = rows.merge
        if query.stride(-1) != 1:
            query = query.contiguous()
        heads, dim = query.shape[1:]
        arguments = (
            query.data_ptr(), query.stride(0), query.stride(1),
            key.data_ptr(), value.data_ptr(), key.shape[1],
            rows.tables.data_ptr(), rows.tables.shape[1], rows.begins.data_ptr(), rows.ends.data_ptr(),
            merge.data_ptr() if merge is not None else None,
        )  # fmt: skip
        tail = (
            heads,
            key.shape[0],
            dim,
            rows.block_size,
            scale,
            out.data_ptr(),
            lse.data_ptr() if lse is not None else None,
        )

        def call(first: int, last: int) -> None:
            if self._function(*arguments, first, last, *tail) != 0:
                raise MemoryError("decode attention: no memory for the scores")

        native_kernels.run_shares(call, self._splits(rows, heads))

    @staticmethod
    def _splits(rows: DecodeRows, heads: int) -> list[tuple[int, int]]:
        """Consecutive shares of the rows with about equal numbers of keys, one per intra-op thread that pays."""
        count = len(rows.lengths)
        threads = min(torch.get_num_threads(), count, max(1, rows.total_keys * heads // _KEYS_PER_THREAD))
        if threads <= 1:
            return [(0, count)]
        splits, first, done = [], 0, 0
        for index, length in enumerate(rows.lengths):
            done += length
            if done * threads >= rows.total_keys * (len(splits) + 1) and len(splits) < threads - 1:
                splits.append((first, index + 1))
                first = index + 1
        splits.append((first, count))
        return [split for split in splits if split[0] < split[1]]


class DecodeRows:
    """A step's decoding rows as the kernel reads them: block tables, the token positions [begin, end) each row
    attends to here, and which rows merge that with an earlier part (a shared prompt start attended apart)."""

    __slots__ = ("begins", "block_size", "ends", "lengths", "merge", "tables", "total_keys")

    def __init__(self, tables: list[list[int]], begins: list[int], ends: list[int], block_size: int) -> None:
        width = max(len(table) for table in tables)
        self.tables = torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.long)
        self.begins = torch.tensor(begins, dtype=torch.long)
        self.ends = torch.tensor(ends, dtype=torch.long)
        self.merge = torch.tensor([1 if begin else 0 for begin in begins], dtype=torch.long) if any(begins) else None
        self.block_size = block_size
        self.lengths = [end - begin for begin, end in zip(begins, ends, strict=True)]
        self.total_keys = sum(self.lengths)


@cache
def load() -> DecodeKernel | None:
    """The kernel, built on first use; None (logged once) where it cannot be built here."""
    library = native_kernels.build(SOURCE, _BUILDS, "decode attention")
    return DecodeKernel(library) if library is not None else None
