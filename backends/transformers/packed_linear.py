"""Dense layers whose weights are packed once, at load time, into oneDNN's blocked layout (the CPU only).

A language model's step on the CPU is mostly its dense layers' matrix products (75 % of the server's samples at 64
clients, py-spy). ``transformers`` runs them as written (GPT-2's ``Conv1D`` as ``addmm`` on a row-major weight,
``nn.Linear`` as ``linear``), and MKL then reads the weight in its stored layout on every call. oneDNN's inner-product
kernel on a weight reordered once into its own blocked layout (what vLLM's CPU build does, and what ``torch.compile``
does with ``freezing``) took 1.4-1.8x less time on this machine for the shapes of a step with 16-64 rows
(768x2304 at 16 rows: 1.65 ms against 2.82 ms). Only float32 on the CPU, where PyTorch has oneDNN; the model's
output head keeps its own module (it is tied to the input embeddings). ``parameters.pack_linear_weights: false``
leaves the model as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN picks its blocking for; a step's rows vary (one per decoding sequence, more for prompts).
_ROWS_HINT = 16


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight in oneDNN's layout; the original weight is not kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def can_pack(model: nn.Module, device: torch.device) -> bool:
    dtype = next(model.parameters()).dtype
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linear_layers(model: nn.Module) -> int:
    """Replace the model's dense layers (``nn.Linear`` and GPT-2's ``Conv1D``, not the output head) by packed
    ones; returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head:
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
            elif isinstance(child, Conv1D):  # weight stored [in, out]
                setattr(parent, name, PackedLinear(child.weight.t(), child.bias))
            else:
                continue
            replaced += 1
    return replaced
