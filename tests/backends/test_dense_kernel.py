"""The CPU one-row dense kernel against the same product in float64."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.transformers import dense_kernel  # noqa: E402


@pytest.mark.parametrize(("in_features", "out_features"), [(768, 2304), (37, 5), (16, 1), (3, 130)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_row_matches_the_product_in_float64(
    dense_row_kernel: dense_kernel.DenseRowKernel,
    in_features: int,
    out_features: int,
    bias: bool,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
    intra_op_threads,
) -> None:
    """Input sizes on and off the kernel's lane width; split between threads or not (outputs fewer than threads
    included); a strided input row, as a slice of a step's rows."""
    generator = torch.Generator().manual_seed(in_features * 10 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    offsets = torch.randn(out_features, generator=generator) if bias else None
    x = torch.randn(in_features, 2, generator=generator)[:, 1]  # stride 2
    monkeypatch.setattr(dense_kernel, "_BYTES_PER_THREAD", 1)  # small weights still split between threads
    with intra_op_threads(threads):
        out = dense_row_kernel.project(x, weight, offsets)
    expected = weight.double() @ x.double() + (offsets.double() if bias else 0)
    assert out.shape == (out_features,)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_split_does_not_change_the_result(
    dense_row_kernel: dense_kernel.DenseRowKernel, monkeypatch: pytest.MonkeyPatch, intra_op_threads
) -> None:
    """Each output is summed in the same order whichever thread computes it, so a split is bit for bit the same."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1000, 300, generator=generator)
    x = torch.randn(300, generator=generator)
    whole = dense_row_kernel.project(x, weight, None)
    monkeypatch.setattr(dense_kernel, "_BYTES_PER_THREAD", 1)
    with intra_op_threads(2):
        assert torch.equal(dense_row_kernel.project(x, weight, None), whole)
