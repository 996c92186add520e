"""Dense layers packed for oneDNN: the same products as the layer they replace, in the one-row layout and the other,
and with one-row steps read by ModelDock's kernel (the output head too, still tied to the embeddings)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.transformers import dense_kernel, packed_linear  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")


@pytest.mark.parametrize("single_row", ["no", "onednn", "kernel"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_packed_layer_computes_what_the_layer_did(
    single_row: str, rows: int, dense_row_kernel: dense_kernel.DenseRowKernel
) -> None:
    generator = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(96, 40)
    x = torch.randn(2, rows, 96, generator=generator)[:1]  # a step's rows: [1, rows, features]
    kernel = dense_row_kernel if single_row == "kernel" else None
    packed = packed_linear.PackedLinear(layer.weight, layer.bias, single_row != "no", kernel)
    assert (packed.packed_row is not None) == (single_row != "no")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)


def test_a_small_model_keeps_both_layouts_unless_told_not_to() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).logits
    # 2 layers of 4 dense weights each (attention in and out, MLP in and out); the output head is left alone.
    assert packed_linear.pack_linear_layers(model) == 8
    layers = [m for m in model.modules() if isinstance(m, packed_linear.PackedLinear)]
    assert all(layer.packed_row is not None for layer in layers)  # a few KiB of weights: under the 1 GiB limit
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:, :1]).logits, expected[:, :1], rtol=1e-4, atol=1e-4)  # one row

    plain = transformers.GPT2LMHeadModel(config).eval()
    packed_linear.pack_linear_layers(plain, single_row=False)
    assert all(m.packed_row is None for m in plain.modules() if isinstance(m, packed_linear.PackedLinear))


def test_the_row_kernel_reads_one_row_steps_and_the_tied_head_in_place(
    dense_row_kernel: dense_kernel.DenseRowKernel,
) -> None:
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=67, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[5, 2, 9, 4, 7]])
    with torch.no_grad():
        expected = model(ids).logits
    packed_linear.pack_linear_layers(model, row_kernel=dense_row_kernel)
    head = model.get_output_embeddings()
    assert isinstance(head, packed_linear.RowKernelHead)
    assert head.weight is model.get_input_embeddings().weight  # still tied, not copied
    calls = []
    project = dense_row_kernel.project
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dense_row_kernel, "project", lambda *args: calls.append(1) or project(*args))
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not calls  # five rows: oneDNN's packing
        torch.testing.assert_close(model(ids[:, :1]).logits, expected[:, :1], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * 4 + 1  # one row: every dense layer and the head through the kernel
