"""The CPU one-row dense kernel against the same product in float64."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.transformers import dense_kernel  # noqa: E402


@pytest.fixture(scope="module")
def kernel() -> dense_kernel.DenseRowKernel:
    built = dense_kernel.load()
    assert built is not None, "the machine has a C compiler (CI installs one), so the kernel must build"
    return built


@pytest.mark.parametrize(("in_features", "out_features"), [(768, 2304), (37, 5), (16, 1), (3, 130)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_row_matches_the_product_in_float64(
    kernel: dense_kernel.DenseRowKernel,
    in_features: int,
    out_features: int,
    bias: bool,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Input sizes on and off the kernel's lane width; split between threads or not (outputs fewer than threads
    included); a strided input row, as a slice of a step's rows."""
    generator = torch.Generator().manual_seed(in_features * 10 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    offsets = torch.randn(out_features, generator=generator) if bias else None
    x = torch.randn(in_features, 2, generator=generator)[:, 1]  # stride 2
    monkeypatch.setattr(dense_kernel, "_BYTES_PER_THREAD", 1)  # small weights still split between threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernel.project(x, weight, offsets)
    finally:
        torch.set_num_threads(previous)
    expected = weight.double() @ x.double() + (offsets.double() if bias else 0)
    assert out.shape == (out_features,)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_split_does_not_change_the_result(
    kernel: dense_kernel.DenseRowKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each output is summed in the same order whichever thread computes it, so a split is bit for bit the same."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(1000, 300, generator=generator)
    x = torch.randn(300, generator=generator)
    whole = kernel.project(x, weight, None)
    monkeypatch.setattr(dense_kernel, "_BYTES_PER_THREAD", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(kernel.project(x, weight, None), whole)
    finally:
        torch.set_num_threads(previous)
