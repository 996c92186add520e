"""Attention over a paged KV cache, plugged into ``transformers`` models as an attention implementation.

``transformers`` lets a model's attention layers call a registered function instead of their built-in one, and
passes extra keyword arguments of ``forward`` through to it. The function here writes the step's new keys and
values into the cache slots the engine chose, gathers every cached token of each sequence, and attends with a mask
that is causal per sequence and hides padding. Any model that uses the standard attention interface (GPT-2,
Llama, Qwen, Mistral, Phi, ...) runs unchanged.

A decode step runs one row per sequence (one new token each); a prefill step packs every prompt into one row, so
prompts of mixed lengths are not padded to the longest. Either way the model returns logits only where the
engine samples: each sequence's last new token.
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
    """One step's batch as tensors: what the model reads, where the attention layers write, and which positions'
    logits the engine needs (each sequence's last new token)."""

    cache: PagedKVCache
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    query_valid: torch.Tensor  # [rows, width] bool: False on padding
    write_slots: torch.Tensor  # [valid tokens], in row-major order of query_valid
    read_slots: torch.Tensor  # [rows, context], padded with slot 0
    mask: torch.Tensor  # [rows, 1, width, context] bool: True where a query may attend
    # Whether all sequences share one row (a prefill); then ``logits_to_keep`` lists each one's last column.
    packed: bool
    logits_to_keep: int | torch.Tensor

    @classmethod
    def build(cls, batch: StepBatch, cache: PagedKVCache, pad_id: int, device: torch.device) -> StepTensors:
        if max(len(t) for t in batch.token_ids) > 1:
            return cls._packed(batch, cache, device)
        return cls._rows(batch, cache, pad_id, device)

    @classmethod
    def _rows(cls, batch: StepBatch, cache: PagedKVCache, pad_id: int, device: torch.device) -> StepTensors:
        """One row per sequence, left-padded: decode steps, where every row has one new token and no padding."""
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
            packed=False,
            logits_to_keep=1,
        )

    @classmethod
    def _packed(cls, batch: StepBatch, cache: PagedKVCache, device: torch.device) -> StepTensors:
        """All sequences' new tokens in one row, keys likewise, with a mask that keeps each sequence to its own
        keys: prompts of mixed lengths then cost what their tokens cost, with no padding to the longest."""
        tokens = [t for row in batch.token_ids for t in row]
        positions: list[int] = []
        query_sequence: list[int] = []
        key_positions: list[int] = []
        key_sequence: list[int] = []
        ends: list[int] = []
        for index, (row, start, slots) in enumerate(zip(batch.token_ids, batch.start, batch.read_slots, strict=True)):
            positions.extend(range(start, start + len(row)))
            query_sequence.extend([index] * len(row))
            key_positions.extend(range(len(slots)))
            key_sequence.extend([index] * len(slots))
            ends.append(len(positions) - 1)
        query_position = torch.tensor(positions, dtype=torch.long)
        same = torch.tensor(query_sequence)[:, None] == torch.tensor(key_sequence)[None, :]
        causal = torch.tensor(key_positions)[None, :] <= query_position[:, None]
        read = torch.tensor([slot for slots in batch.read_slots for slot in slots], dtype=torch.long)
        write = torch.tensor([slot for slots in batch.write_slots for slot in slots], dtype=torch.long)
        return cls(
            cache=cache,
            input_ids=torch.tensor([tokens], dtype=torch.long).to(device),
            position_ids=query_position[None, :].to(device),
            query_valid=torch.ones((1, len(tokens)), dtype=torch.bool).to(device),
            write_slots=write.to(device),
            read_slots=read[None, :].to(device),
            mask=(same & causal)[None, None, :, :].to(device),
            packed=True,
            logits_to_keep=torch.tensor(ends, dtype=torch.long).to(device),
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
    # index_select on the flattened slots: several times faster than indexing with the 2-D slot tensor.
    rows, context = step.read_slots.shape
    flat = step.read_slots.reshape(-1)
    keys = cache_key.index_select(0, flat).view(rows, context, *cache_key.shape[1:]).transpose(1, 2)
    values = cache_value.index_select(0, flat).view(rows, context, *cache_value.shape[1:]).transpose(1, 2)
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    output = F.scaled_dot_product_attention(query, keys, values, attn_mask=step.mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
