"""GPT-2's written-out tanh GELU replaced by PyTorch's fused one: the same function, to float32's rounding."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.transformers.fused_activations import fuse_tanh_gelu  # noqa: E402


def test_the_fused_gelu_gives_the_models_logits() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[5, 1, 7, 3, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    assert fuse_tanh_gelu(model) == 3  # one in each layer's MLP
    assert not any(type(m).__name__ == "NewGELUActivation" for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert fuse_tanh_gelu(model) == 0
