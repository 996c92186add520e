"""The CPU decode-attention kernel against PyTorch's attention over the same keys, gathered."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backends.transformers import decode_kernel, native_kernels  # noqa: E402
from backends.transformers.decode_kernel import DecodeRows  # noqa: E402


def _slots(table: list[int], positions: range, size: int) -> torch.Tensor:
    return torch.tensor([table[p // size] * size + p % size for p in positions])


def _reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's attention over the given slots: output [heads, dim] and log-sum-exp [heads], in float64."""
    heads, kv_heads = query.shape[0], key.shape[0]
    keys = key.index_select(1, slots).double().repeat_interleave(heads // kv_heads, 0)  # [heads, n, dim]
    values = value.index_select(1, slots).double().repeat_interleave(heads // kv_heads, 0)
    scores = torch.einsum("hd,hnd->hn", query.double(), keys) * scale
    return torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), values), torch.logsumexp(scores, -1)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "size"),
    [(12, 12, 64, 16), (8, 2, 32, 16), (4, 1, 80, 3), (2, 2, 17, 1)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_match_attention_over_their_gathered_keys(
    decode_attention_kernel: decode_kernel.DecodeKernel,
    heads: int,
    kv_heads: int,
    dim: int,
    size: int,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
    intra_op_threads,
) -> None:
    """Scattered and consecutive block tables, contexts from 1 key to several blocks, grouped-query heads, a head
    size that is not a multiple of the vector width; split between threads or not."""
    generator = torch.Generator().manual_seed(heads * 100 + dim + size)
    blocks = 64
    key = torch.randn(kv_heads, blocks * size, dim, generator=generator)
    value = torch.randn(kv_heads, blocks * size, dim, generator=generator)
    contexts = [1, size, size + 1, 5 * size - 1, 7 * size, 3]
    order = torch.randperm(blocks, generator=generator).tolist()
    tables, used = [], 0
    for index, context in enumerate(contexts):
        count = -(-context // size)
        tables.append(order[used : used + count] if index % 2 else list(range(used, used + count)))
        used += count
    query = torch.randn(heads, len(contexts), dim, generator=generator).transpose(0, 1)  # strided, as the model's
    rows = DecodeRows(tables, [0] * len(contexts), contexts, size)
    out = torch.empty(len(contexts), heads, dim)
    lse = torch.empty(len(contexts), heads)
    scale = dim**-0.5
    monkeypatch.setattr(decode_kernel, "_KEYS_PER_THREAD", 1)  # these few keys still split between threads
    with intra_op_threads(threads):
        assert len(decode_attention_kernel._splits(rows, heads)) == threads
        decode_attention_kernel.attend(query, key, value, rows, scale, out, lse)
    for row, (table, context) in enumerate(zip(tables, contexts, strict=True)):
        expected, expected_lse = _reference(query[row], key, value, _slots(table, range(context), size), scale)
        torch.testing.assert_close(out[row].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[row].double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_a_part_merges_with_an_earlier_parts_result(decode_attention_kernel: decode_kernel.DecodeKernel) -> None:
    """Rows sharing a prompt start: the start attended apart (its output and log-sum-exp given), the rest here."""
    generator = torch.Generator().manual_seed(7)
    heads, dim, size = 4, 32, 4
    key = torch.randn(heads, 32 * size, dim, generator=generator)
    value = torch.randn(heads, 32 * size, dim, generator=generator)
    tables = [[0, 1, 2, 5, 6], [0, 1, 2, 9], [3, 4]]
    contexts, begins = [19, 14, 7], [12, 12, 0]
    query = torch.randn(len(tables), heads, dim, generator=generator)
    out = torch.empty(len(tables), heads, dim)
    lse = torch.empty(len(tables), heads)
    for row in (0, 1):
        start_out, start_lse = _reference(query[row], key, value, _slots(tables[row], range(12), size), 0.2)
        out[row], lse[row] = start_out.float(), start_lse.float()
    rows = DecodeRows(tables, begins, contexts, size)
    decode_attention_kernel.attend(query, key, value, rows, 0.2, out, lse)
    for row, (table, context) in enumerate(zip(tables, contexts, strict=True)):
        expected, expected_lse = _reference(query[row], key, value, _slots(table, range(context), size), 0.2)
        torch.testing.assert_close(out[row].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[row].double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_the_engine_is_told_to_use_pytorch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MODELDOCK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    decode_kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native_kernels.__name__):
            assert decode_kernel.load() is None
        assert "could not be built" in caplog.text
    finally:
        decode_kernel.load.cache_clear()


def test_the_built_library_is_cached_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELDOCK_CACHE_DIR", str(tmp_path))
    decode_kernel.load.cache_clear()
    try:
        assert decode_kernel.load() is not None
        built = list((tmp_path / "kernels").glob("decode_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        decode_kernel.load.cache_clear()
        assert decode_kernel.load() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not compiled again
    finally:
        decode_kernel.load.cache_clear()
