"""Dense layers whose weights are packed once, at load time, into oneDNN's blocked layout (the CPU only).

A language model's step on the CPU is mostly its dense layers' matrix products (75 % of the server's samples at 64
clients, py-spy). ``transformers`` runs them as written (GPT-2's ``Conv1D`` as ``addmm`` on a row-major weight,
``nn.Linear`` as ``linear``), and MKL then reads the weight in its stored layout on every call. oneDNN's inner-product
kernel on a weight reordered once into its own blocked layout (what vLLM's CPU build does, and what ``torch.compile``
does with ``freezing``) took 1.4-1.8x less time on this machine for the shapes of a step with 16-64 rows
(768x2304 at 16 rows: 1.65 ms against 2.82 ms). Only float32 on the CPU, where PyTorch has oneDNN; the model's
output head keeps its own module (it is tied to the input embeddings). ``parameters.pack_linear_weights: false``
leaves the model as loaded.

A layout blocked for 16 rows is slow for one: a single stream's decode steps have one row, and there the 48 dense
layers of GPT-2 small took 24.3 ms with the 16-row layout against 19.8 ms with a layout blocked for one row (weights
read from memory, not cache, one thread), while the one-row layout is 1.5x slower at 16 rows. So each layer can keep
both, and a one-row step reads the second: ``parameters.single_row_weights`` (by default on when the packed dense
weights come to at most 1 GiB, since the second copy doubles them).
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN picks its blocking for; a step's rows vary (one per decoding sequence, more for prompts).
_ROWS_HINT = 16


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight in oneDNN's layout (and, optionally, in the layout blocked for one
    row); the original weight is not kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, single_row: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT))
        self.register_buffer("packed_row", torch.ops.mkldnn._reorder_linear_weight(weight, 1) if single_row else None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        packed = self.packed_row if self.packed_row is not None and rows.shape[0] == 1 else self.packed
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def can_pack(model: nn.Module, device: torch.device) -> bool:
    dtype = next(model.parameters()).dtype
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


# Up to this many bytes of dense weights, each layer also keeps the one-row layout unless the config says otherwise.
SINGLE_ROW_AUTO_BYTES = 1 << 30


def dense_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights ``pack_linear_layers`` would pack."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(
        module.weight.numel() * module.weight.element_size()
        for module in model.modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    )


def pack_linear_layers(model: nn.Module, single_row: bool | None = None) -> int:
    """Replace the model's dense layers (``nn.Linear`` and GPT-2's ``Conv1D``, not the output head) by packed
    ones; ``single_row`` keeps the one-row layout too (None: when the dense weights are at most 1 GiB). Returns how
    many were replaced."""
    from transformers.pytorch_utils import Conv1D

    if single_row is None:
        single_row = dense_weight_bytes(model) <= SINGLE_ROW_AUTO_BYTES
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head:
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias, single_row))
            elif isinstance(child, Conv1D):  # weight stored [in, out]
                setattr(parent, name, PackedLinear(child.weight.t(), child.bias, single_row))
            else:
                continue
            replaced += 1
    return replaced
