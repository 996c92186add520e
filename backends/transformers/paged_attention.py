"""Attention over a paged KV cache, plugged into ``transformers`` models as an attention implementation.

``transformers`` lets a model's attention layers call a registered function instead of their built-in one, and
passes extra keyword arguments of ``forward`` through to it. The function here writes the step's new keys and
values into the cache slots the engine chose, gathers every cached token of each sequence, and attends with a mask
that is causal per sequence and hides padding. Any model that uses the standard attention interface (GPT-2,
Llama, Qwen, Mistral, Phi, ...) runs unchanged.

Rows are left-padded, so each row's last new token sits in the last column and ``logits_to_keep=1`` returns the
logits the engine needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from backends.base import StepBatch

ATTENTION_NAME = "modeldock_paged"
STEP_ARGUMENT = "modeldock_step"


class PagedKVCache:
    """Keys and values of every layer, one row per cache slot."""

    def __init__(
        self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (layers, slots, kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True, slots=True)
class StepTensors:
    """One step's batch as tensors: what the model reads and where the attention layers write."""

    cache: PagedKVCache
    input_ids: torch.Tensor  # [rows, width], left-padded
    position_ids: torch.Tensor  # [rows, width]
    query_valid: torch.Tensor  # [rows, width] bool: False on padding
    write_slots: torch.Tensor  # [valid tokens], in row-major order of query_valid
    read_slots: torch.Tensor  # [rows, context], padded with slot 0
    mask: torch.Tensor  # [rows, 1, width, context] bool: True where a query may attend

    @classmethod
    def build(cls, batch: StepBatch, cache: PagedKVCache, pad_id: int, device: torch.device) -> StepTensors:
        rows = len(batch.token_ids)
        width = max(len(t) for t in batch.token_ids)
        context = max(len(s) for s in batch.read_slots)
        input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        valid = torch.zeros((rows, width), dtype=torch.bool)
        read = torch.zeros((rows, context), dtype=torch.long)
        for row, (tokens, start, slots) in enumerate(zip(batch.token_ids, batch.start, batch.read_slots, strict=True)):
            first = width - len(tokens)
            input_ids[row, first:] = torch.tensor(tokens, dtype=torch.long)
            positions[row, first:] = torch.arange(start, start + len(tokens))
            valid[row, first:] = True
            read[row, : len(slots)] = torch.tensor(slots, dtype=torch.long)
        # A query at position p sees keys 0..p of its own sequence; padded queries see key 0 only (kept finite).
        mask = torch.arange(context)[None, None, :] <= positions[:, :, None]
        write = torch.tensor([slot for slots in batch.write_slots for slot in slots], dtype=torch.long)
        return cls(
            cache=cache,
            input_ids=input_ids.to(device),
            position_ids=positions.to(device),
            query_valid=valid.to(device),
            write_slots=write.to(device),
            read_slots=read.to(device),
            mask=mask.unsqueeze(1).to(device),
        )


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [rows, heads, width, dim]; key/value [rows, kv_heads, width, dim] for the step's new tokens only."""
    step = kwargs.get(STEP_ARGUMENT)
    if not isinstance(step, StepTensors):
        raise RuntimeError(f"the {ATTENTION_NAME} attention needs the engine's step; run the model through the engine")
    layer = module.layer_idx
    cache_key, cache_value = step.cache.key[layer], step.cache.value[layer]
    cache_key.index_copy_(0, step.write_slots, key.transpose(1, 2)[step.query_valid].to(cache_key.dtype))
    cache_value.index_copy_(0, step.write_slots, value.transpose(1, 2)[step.query_valid].to(cache_value.dtype))
    keys = cache_key[step.read_slots].transpose(1, 2)
    values = cache_value[step.read_slots].transpose(1, 2)
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    output = F.scaled_dot_product_attention(query, keys, values, attn_mask=step.mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
