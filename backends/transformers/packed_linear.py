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
a second copy for one-row steps: ``parameters.single_row_weights`` (by default on when the packed dense weights come
to at most 1 GiB, since the second copy doubles them). That copy is the plain row-major weight, read by ModelDock's
one-row kernel (``dense_kernel``, 14-16 ms for the same 48 layers), or oneDNN's one-row packing where that kernel
cannot be built. The output head, tied to the input embeddings, is read by that kernel in place for one-row steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from backends.transformers.dense_kernel import DenseRowKernel

# The row count oneDNN picks its blocking for; a step's rows vary (one per decoding sequence, more for prompts).
_ROWS_HINT = 16


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight in oneDNN's layout and, optionally, a second copy for one-row steps
    (row-major for ``row_kernel``, else oneDNN's one-row packing); the original weight is not kept otherwise."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        single_row: bool = False,
        row_kernel: DenseRowKernel | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        self.row_kernel = row_kernel if single_row else None
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT))
        row_weight = None
        if single_row:
            row_weight = weight if row_kernel else torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.register_buffer("packed_row", row_weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.packed_row is not None and rows.shape[0] == 1:
            if self.row_kernel is not None:
                return self.row_kernel.project(rows[0], self.packed_row, self.bias).view(*x.shape[:-1], -1)
            packed = self.packed_row
        else:
            packed = self.packed
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


class RowKernelHead(nn.Module):
    """The model's output head (an ``nn.Linear``, usually tied to the input embeddings), read in place by the
    one-row kernel when one row needs logits, and by PyTorch otherwise."""

    def __init__(self, head: nn.Linear, row_kernel: DenseRowKernel) -> None:
        super().__init__()
        self.weight = head.weight  # the same parameter: the tie to the embeddings stays
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features
        self.row_kernel = row_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1 and self.weight.is_contiguous():
            return self.row_kernel.project(rows[0], self.weight, self.bias).view(*x.shape[:-1], -1)
        return nn.functional.linear(x, self.weight, self.bias)


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


def pack_linear_layers(
    model: nn.Module, single_row: bool | None = None, row_kernel: DenseRowKernel | None = None
) -> int:
    """Replace the model's dense layers (``nn.Linear`` and GPT-2's ``Conv1D``, not the output head) by packed
    ones; ``single_row`` keeps a copy for one-row steps too (None: when the dense weights are at most 1 GiB), read
    by ``row_kernel`` where given, which then reads the output head's one-row steps too. Returns how many dense
    layers were replaced."""
    from transformers.pytorch_utils import Conv1D

    if single_row is None:
        single_row = dense_weight_bytes(model) <= SINGLE_ROW_AUTO_BYTES
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head:
                if row_kernel is not None and type(child) is nn.Linear:
                    setattr(parent, name, RowKernelHead(child, row_kernel))
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias, single_row, row_kernel))
            elif isinstance(child, Conv1D):  # weight stored [in, out]
                setattr(parent, name, PackedLinear(child.weight.t(), child.bias, single_row, row_kernel))
            else:
                continue
            replaced += 1
    return replaced
