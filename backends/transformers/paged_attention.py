"""Attention over a paged KV cache, plugged into ``transformers`` models as an attention implementation.

``transformers`` lets a model's attention layers call a registered function instead of their built-in one, and
passes extra keyword arguments of ``forward`` through to it. The function here writes the step's new keys and
values into the cache slots the engine chose, gathers every cached token of each sequence, and attends with a mask
that is causal per sequence and hides padding. On the CPU, where that gather costs more than the attention, the
decoding sequences attend through a kernel of ModelDock's own that reads each one's keys through its block table
(``decode_kernel.py``), or, without it, one at a time, reading their keys in place when their blocks are
consecutive. Any model that uses the standard attention interface (GPT-2, Llama, Qwen, Mistral, Phi, ...) runs
unchanged.

A step mixes decoding sequences (one new token each) with prompt chunks, all in one row with no padding, so a new
prompt joins the running batch instead of pausing it. The model returns logits only where the engine samples:
each sequence's last new token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from backends.base import StepBatch

if TYPE_CHECKING:
    from backends.transformers.decode_kernel import DecodeKernel, DecodeRows

ATTENTION_NAME = "modeldock_paged"
STEP_ARGUMENT = "modeldock_step"
# Runs of consecutive blocks a decoding sequence's keys are read from in place (on the CPU); past that, gathered.
MAX_DECODE_RUNS = 4


class PagedKVCache:
    """Keys and values of every layer, head-major: ``key[layer, head]`` holds one row per cache slot.

    Head-major because attention reads a sequence's keys one head at a time: a run of consecutive slots is then one
    contiguous ``[tokens, head_dim]`` matrix per head, which the attention kernel reads as it lies. Slot-major
    (``[slots, heads, head_dim]``), the same run interleaves the heads, and on the CPU a decoding row's attention
    took 1.4x (220 keys) to 1.9x (500 keys) as long reading it.
    """

    def __init__(
        self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (layers, kv_heads, slots, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        # Set by the backend on the CPU (float32) where the kernel builds: decoding rows then attend through it.
        self.decode_kernel: DecodeKernel | None = None

    @property
    def slots(self) -> int:
        return int(self.key.shape[2])


@dataclass(frozen=True, slots=True)
class StepTensors:
    """One step's batch as tensors on the model's device.

    Every new token of the step sits in one row: the decoding sequences' single tokens first, then the prompt
    chunks, so the model's dense layers run once over all of them. Attention is the only per-sequence part, and it
    runs in two groups: the decoding tokens one per row against their own padded context (on the CPU, one sequence
    at a time against its keys where they lie), the prompt tokens packed against the keys of their own sequences
    only (a block-diagonal causal mask), so a long context of one sequence never widens another's attention.
    """

    cache: PagedKVCache
    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens]
    write_slots: torch.Tensor  # [tokens]: where each new token's key and value go
    decode_count: int  # the first ``decode_count`` tokens are decoding sequences, one token each
    decode_slots: torch.Tensor  # [decode_count, context]: each one's cached slots, padded with slot 0
    decode_mask: torch.Tensor  # [decode_count, 1, 1, context] bool: True on real (not padding) keys
    prefill_slots: torch.Tensor  # [keys]: the cached slots of every prefilling sequence, one after the other
    prefill_mask: torch.Tensor  # [1, 1, prompt tokens, keys] bool: True where a query may attend
    # Each sequence's last new token in the row, in the batch's order: where the engine samples.
    logits_to_keep: torch.Tensor
    # On the CPU, each prompt attends on its own instead (see ``_prompt_attention``): (first query, queries, first
    # key, keys, causal mask or None when the prompt starts at position 0) per prefilling sequence.
    prefill_segments: list[tuple[int, int, int, int, torch.Tensor | None]] | None = None
    # On the CPU, each decoding sequence attends on its own too (see ``_decode_attention``): its keys as slices of
    # the cache, one (first slot, count) per run of consecutive blocks, or the slots to gather when they are many.
    decode_spans: list[list[tuple[int, int]] | torch.Tensor] | None = None
    # With the CPU decode kernel instead (see ``_kernel_decode_attention``): every decoding row's block table, and
    # the runs of a cached prompt start that several rows share, each (those rows, first slot, keys), attended once.
    decode_rows: DecodeRows | None = None
    decode_shared: list[tuple[torch.Tensor, int, int]] | None = None

    @classmethod
    def build(
        cls, batch: StepBatch, cache: PagedKVCache, device: torch.device, padded_decode: bool | None = None
    ) -> StepTensors:
        """``padded_decode``: the decoding sequences' keys as one padded batch (CUDA graphs need fixed shapes);
        by default only on a GPU, where one batched attention beats a loop of small ones."""
        count = len(batch.token_ids)
        decode = [i for i in range(count) if len(batch.token_ids[i]) == 1]
        prefill = [i for i in range(count) if len(batch.token_ids[i]) > 1]
        tokens: list[int] = []
        token_sequence: list[int] = []
        last = [0] * count
        for i in decode + prefill:
            tokens.extend(batch.token_ids[i])
            token_sequence.extend([i] * len(batch.token_ids[i]))
            last[i] = len(tokens) - 1
        width = max(len(t) for t in batch.block_tables)
        tables = [t + [0] * (width - len(t)) for t in batch.block_tables]
        starts = batch.start
        lengths = [len(t) for t in batch.token_ids]
        # One host-to-device copy for everything the step needs; the slots and masks are worked out there.
        parts = [tokens, token_sequence, [v for t in tables for v in t], starts, lengths, last, decode, prefill]
        sizes = [len(part) for part in parts]
        flat = torch.tensor([v for part in parts for v in part], dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        tokens_t, seq_t, tables_t, starts_t, lengths_t, last_t, decode_t, prefill_t = flat.split(sizes)
        tables_t = tables_t.view(count, width)
        size = batch.block_size

        def slots(sequence: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return tables_t[sequence, position // size] * size + position % size

        # Position of each new token: its sequence's start plus its offset among that sequence's new tokens.
        row_offsets = torch.zeros(count, dtype=torch.long, device=flat.device)
        order = torch.cat([decode_t, prefill_t])
        row_offsets[order] = torch.cumsum(lengths_t[order], 0) - lengths_t[order]
        index = torch.arange(len(tokens), device=flat.device)
        positions = starts_t[seq_t] + index - row_offsets[seq_t]

        if padded_decode is None:
            padded_decode = device.type != "cpu"
        if decode and padded_decode:
            context_lengths = starts_t[decode_t] + 1
            context = max(starts[i] for i in decode) + 1
            key_position = torch.arange(context, device=flat.device)
            decode_slots = slots(decode_t[:, None], key_position[None, :])
            decode_mask = (key_position[None, :] < context_lengths[:, None])[:, None, None, :]
        else:  # no padded decode group
            decode_slots = torch.zeros((0, 1), dtype=torch.long, device=flat.device)
            decode_mask = torch.zeros((0, 1, 1, 1), dtype=torch.bool, device=flat.device)
        decode_spans = decode_rows = decode_shared = None
        if decode and not padded_decode and cache.decode_kernel is not None:
            decode_rows, decode_shared = _kernel_rows(
                [batch.block_tables[i] for i in decode], [starts[i] + 1 for i in decode], size
            )
        elif decode and not padded_decode:
            decode_spans = [_decode_span(batch.block_tables[i], starts[i] + 1, size, i, slots) for i in decode]
        prefill_segments = None
        if prefill:
            ends = starts_t[prefill_t] + lengths_t[prefill_t]
            total = sum(starts[i] + lengths[i] for i in prefill)
            key_sequence = torch.repeat_interleave(prefill_t, ends, output_size=total)
            key_first = torch.repeat_interleave(torch.cumsum(ends, 0) - ends, ends, output_size=total)
            key_position = torch.arange(total, device=flat.device) - key_first
            query_sequence = seq_t[len(decode) :]
            query_position = positions[len(decode) :]
            prefill_slots = slots(key_sequence, key_position)
            if device.type == "cpu" and len(prefill) > 1:
                prefill_segments = _prompt_segments([starts[i] for i in prefill], [lengths[i] for i in prefill])
                prefill_mask = torch.zeros((1, 1, 0, 0), dtype=torch.bool)  # not used: each prompt has its own
            else:
                prefill_mask = (query_sequence[:, None] == key_sequence[None, :]) & (
                    key_position[None, :] <= query_position[:, None]
                )
                prefill_mask = prefill_mask[None, None]
        else:
            prefill_slots = torch.zeros(0, dtype=torch.long, device=flat.device)
            prefill_mask = torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=flat.device)
        return cls(
            cache=cache,
            input_ids=tokens_t[None, :],
            position_ids=positions[None, :],
            write_slots=slots(seq_t, positions),
            decode_count=len(decode),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefill_slots=prefill_slots,
            prefill_mask=prefill_mask,
            prefill_segments=prefill_segments,
            decode_spans=decode_spans,
            decode_rows=decode_rows,
            decode_shared=decode_shared,
            logits_to_keep=last_t,
        )


def _decode_span(
    table: list[int], count: int, size: int, row: int, slots: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> list[tuple[int, int]] | torch.Tensor:
    """Where a decoding sequence's ``count`` keys are: one slice of the cache per run of consecutive blocks (a
    sequence that shares a cached prompt start has two: the shared blocks, then its own), or its slots when the
    runs are too many for a slice each to pay."""
    blocks = -(-count // size)
    runs: list[tuple[int, int]] = []
    start = 0
    for index in range(1, blocks + 1):
        if index == blocks or table[index] != table[index - 1] + 1:
            if len(runs) == MAX_DECODE_RUNS:
                return slots(torch.full((count,), row, dtype=torch.long), torch.arange(count))
            runs.append((table[start] * size, min(index * size, count) - start * size))
            start = index
    return runs


def _kernel_rows(
    tables: list[list[int]], contexts: list[int], size: int
) -> tuple[DecodeRows, list[tuple[torch.Tensor, int, int]]]:
    """The decoding rows for the kernel, and the cached prompt starts they share. Rows whose tables start with the
    same consecutive blocks (one cached prefix) attend to those keys together, once, and the kernel then reads only
    their own keys: 16 rows after a 500-token system prompt would otherwise read it 16 times a layer."""
    from backends.transformers.decode_kernel import DecodeRows

    begins = [0] * len(tables)
    by_first: dict[int, list[int]] = {}
    for row, table in enumerate(tables):
        by_first.setdefault(table[0], []).append(row)
    shared = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        lead = tables[rows[0]]
        limit = min(len(tables[row]) for row in rows)
        common = 1
        while (
            common < limit
            and lead[common] == lead[common - 1] + 1
            and all(tables[row][common] == lead[common] for row in rows)
        ):
            common += 1
        # A block two sequences hold is a full block of a cached prompt; each row keeps its newest key to itself.
        keys = min(common * size, min(contexts[row] for row in rows) - 1)
        if keys <= 0:
            continue
        shared.append((torch.tensor(rows, dtype=torch.long), lead[0] * size, keys))
        for row in rows:
            begins[row] = keys
    return DecodeRows(tables, begins, contexts, size), shared


def _prompt_segments(starts: list[int], lengths: list[int]) -> list[tuple[int, int, int, int, torch.Tensor | None]]:
    """Where each prompt's queries and keys sit in the step's packed rows, with the causal mask of a later chunk
    (its queries are at positions ``start..`` of ``start + length`` keys; a whole prompt uses SDPA's own)."""
    segments = []
    query_first = key_first = 0
    for start, length in zip(starts, lengths, strict=True):
        causal = None
        if start:
            causal = torch.arange(start + length)[None, :] <= torch.arange(start, start + length)[:, None]
        segments.append((query_first, length, key_first, start + length, causal))
        query_first += length
        key_first += start + length
    return segments


def _expand_heads(keys: torch.Tensor, values: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: each key/value head serves ``heads / kv_heads`` query heads."""
    groups = heads // keys.shape[1]
    if groups > 1:
        return keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return keys, values


def _prompt_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    segments: list[tuple[int, int, int, int, torch.Tensor | None]],
    scaling: float | None,
) -> torch.Tensor:
    """Each prompt against its own keys. The packed block-diagonal mask computes every query against every key of
    the step: with 16 prompts that is 16 times the attention work, which a GPU absorbs but a CPU pays in full."""
    out = torch.empty_like(queries)
    for first, count, key_first, key_count, causal in segments:
        segment_keys = keys[:, :, key_first : key_first + key_count]
        segment_values = values[:, :, key_first : key_first + key_count]
        out[:, :, first : first + count] = F.scaled_dot_product_attention(
            queries[:, :, first : first + count],
            segment_keys,
            segment_values,
            attn_mask=causal,
            is_causal=causal is None,
            scale=scaling,
        )
    return out


def _kernel_decode_attention(
    queries: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    step: StepTensors,
    scaling: float | None,
) -> torch.Tensor:
    """Every decoding row in one kernel call per layer (see ``decode_kernel.py``), after the prompt starts that
    rows share, each attended once by PyTorch's flash kernel with all its rows' queries (one matrix product, the
    keys read once), whose outputs and log-sum-exps the kernel then merges with each row's own keys.
    queries [heads, rows, dim] -> [1, rows, heads, dim]."""
    assert step.decode_rows is not None and step.cache.decode_kernel is not None
    heads, rows, dim = queries.shape
    out = torch.empty((rows, heads, dim), dtype=queries.dtype)
    lse = None
    if step.decode_shared:
        lse = torch.empty((rows, heads), dtype=torch.float32)
        for members, first, count in step.decode_shared:
            keys, values = cache_key[:, first : first + count], cache_value[:, first : first + count]
            output, group_lse = _attend_slice(queries[:, members][None], keys, values, scaling)
            out[members] = output.transpose(0, 1)
            lse[members] = group_lse.transpose(0, 1).float()
    scale = scaling if scaling is not None else dim**-0.5
    step.cache.decode_kernel.attend(queries.transpose(0, 1), cache_key, cache_value, step.decode_rows, scale, out, lse)
    return out[None]


def _decode_attention(
    queries: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    spans: list[list[tuple[int, int]] | torch.Tensor],
    scaling: float | None,
) -> torch.Tensor:
    """Each decoding sequence against its own keys, read in place, a run of consecutive blocks at a time.

    The batched form gathers every sequence's keys into one padded tensor per layer, a copy of the whole context
    that on the CPU costs more than the attention itself (2.5 ms against 0.9 ms a layer for 13 sequences of 171
    tokens). A sequence whose keys lie in several runs (one that shares a cached prompt start) attends to each run
    in place and the partial results are merged by their log-sum-exp, as flash attention merges its tiles: for a
    500-token shared start, one row and layer alone took 0.7 ms against 5.4 ms gathering it, and a whole decode
    step of 16 such rows about 5 % less time (a shared machine). queries [heads, rows, dim] -> [1, rows, heads, dim].
    """
    heads, rows, dim = queries.shape
    out = torch.empty((rows, heads, dim), dtype=queries.dtype, device=queries.device)
    shared = _shared_runs(queries, cache_key, cache_value, spans, scaling)
    for row, span in enumerate(spans):
        query = queries[:, row : row + 1][None]  # [1, heads, 1, dim]
        if isinstance(span, torch.Tensor):
            out[row] = _attend(query, cache_key.index_select(1, span), cache_value.index_select(1, span), scaling)
        elif len(span) == 1:
            first, count = span[0]
            out[row] = _attend(
                query, cache_key[:, first : first + count], cache_value[:, first : first + count], scaling
            )
        else:
            out[row] = _attend_runs(query, row, cache_key, cache_value, span, scaling, shared)
    return out[None]


# A run of the cache attended once for every row that reads it: (outputs [heads, rows, dim], log-sum-exps
# [heads, rows], each row's column).
SharedRun = tuple[torch.Tensor, torch.Tensor, dict[int, int]]


def _shared_runs(
    queries: torch.Tensor,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    spans: list[list[tuple[int, int]] | torch.Tensor],
    scaling: float | None,
) -> dict[tuple[int, int], SharedRun]:
    """Runs of blocks that several decoding rows read (a cached prompt start they share), each attended once with
    all those rows' queries. Row by row, 16 rows after a 500-token start read its keys 16 times a layer, more bytes
    than the model's weights; together the keys are read once and the scores are one matrix product."""
    readers: dict[tuple[int, int], list[int]] = {}
    for row, span in enumerate(spans):
        if not isinstance(span, torch.Tensor) and len(span) > 1:
            for run in span:
                readers.setdefault(run, []).append(row)
    shared: dict[tuple[int, int], SharedRun] = {}
    for (first, count), rows in readers.items():
        if len(rows) < 2:
            continue
        query = queries[:, rows][None]  # [1, heads, rows, dim]
        keys, values = cache_key[:, first : first + count], cache_value[:, first : first + count]
        output, lse = _attend_slice(query, keys, values, scaling)
        shared[(first, count)] = (output, lse, {row: column for column, row in enumerate(rows)})
    return shared


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One query row against keys and values laid out as the cache holds them ([kv_heads, keys, dim])."""
    keys, values = _expand_heads(keys[None], values[None], query.shape[1])
    return F.scaled_dot_product_attention(query, keys, values, scale=scaling)[0, :, 0]


def _attend_slice(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows [1, heads, rows, dim] against one slice of the cache, in place (PyTorch's CPU flash kernel, which
    also returns the log-sum-exp of its scores): outputs [heads, rows, dim] and log-sum-exps [heads, rows]."""
    keys, values = _expand_heads(keys[None], values[None], query.shape[1])
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, scale=scaling)
    return output[0], lse[0]


def _attend_runs(
    query: torch.Tensor,
    row: int,
    cache_key: torch.Tensor,
    cache_value: torch.Tensor,
    runs: list[tuple[int, int]],
    scaling: float | None,
    shared: dict[tuple[int, int], SharedRun],
) -> torch.Tensor:
    """One query row against several slices of the cache, each attended in place (or taken from the rows that
    share it), then weighted by the share of the softmax's mass it holds."""
    outputs, lses = [], []
    for first, count in runs:
        if (first, count) in shared:
            output, lse, columns = shared[(first, count)]
            column = columns[row]
            outputs.append(output[:, column])  # [heads, dim]
            lses.append(lse[:, column])  # [heads]
            continue
        keys, values = cache_key[:, first : first + count], cache_value[:, first : first + count]
        output, lse = _attend_slice(query, keys, values, scaling)
        outputs.append(output[:, 0])
        lses.append(lse[:, 0])
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # [runs, heads, 1]
    return (torch.stack(outputs) * weights).sum(0).to(query.dtype)


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
    """query [1, heads, tokens, dim]; key/value [1, kv_heads, tokens, dim] for the step's new tokens only."""
    step = kwargs.get(STEP_ARGUMENT)
    if not isinstance(step, StepTensors):
        raise RuntimeError(f"the {ATTENTION_NAME} attention needs the engine's step; run the model through the engine")
    layer = module.layer_idx
    cache_key, cache_value = step.cache.key[layer], step.cache.value[layer]
    cache_key.index_copy_(1, step.write_slots, key[0].to(cache_key.dtype))
    cache_value.index_copy_(1, step.write_slots, value[0].to(cache_value.dtype))
    heads = query.shape[1]
    decoded = step.decode_count
    outputs = []
    if decoded and step.decode_rows is not None:
        outputs.append(_kernel_decode_attention(query[0, :, :decoded], cache_key, cache_value, step, scaling))
    elif decoded and step.decode_spans is not None:
        outputs.append(_decode_attention(query[0, :, :decoded], cache_key, cache_value, step.decode_spans, scaling))
    elif decoded:
        # index_select on the flattened slots: several times faster than indexing with the 2-D slot tensor.
        rows, context = step.decode_slots.shape
        flat = step.decode_slots.reshape(-1)
        kv_heads, _, dim = cache_key.shape
        keys = cache_key.index_select(1, flat).view(kv_heads, rows, context, dim).transpose(0, 1)
        values = cache_value.index_select(1, flat).view(kv_heads, rows, context, dim).transpose(0, 1)
        keys, values = _expand_heads(keys, values, heads)
        queries = query[0, :, :decoded].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=step.decode_mask, scale=scaling)
        outputs.append(out.squeeze(2).unsqueeze(0))  # [1, rows, heads, dim]
    if query.shape[2] > decoded:
        keys = cache_key.index_select(1, step.prefill_slots).unsqueeze(0)
        values = cache_value.index_select(1, step.prefill_slots).unsqueeze(0)
        keys, values = _expand_heads(keys, values, heads)
        queries = query[:, :, decoded:]
        if step.prefill_segments is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=step.prefill_mask, scale=scaling)
        else:
            out = _prompt_attention(queries, keys, values, step.prefill_segments, scaling)
        outputs.append(out.transpose(1, 2))  # [1, prompt tokens, heads, dim]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return output.contiguous(), None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
