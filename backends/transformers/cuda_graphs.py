"""CUDA graphs of decode steps: one captured launch per step instead of hundreds of small ones.

A decode step of a small or mid-sized model on a GPU is bound by launching kernels from Python (a dozen per layer),
not by the GPU: a GPT-2-small step takes about 6 ms eager and under 1 ms replayed from a graph. A graph fixes its
shapes, so steps are padded up to a few batch sizes and context lengths, all captured when the model loads (largest
first, sharing one memory pool, so a new shape never stalls a running batch). Padding rows decode token 0 at
position 0, write their keys and values to a scratch slot past the end of the cache, and attend to it alone, so
they never touch a real sequence. Prefill and mixed steps, and any step past the largest bucket, run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backends.base import StepBatch
from backends.transformers.paged_attention import PagedKVCache, StepTensors

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def context_buckets(max_context: int) -> list[int]:
    sizes = []
    size = 128
    while size < max_context:
        sizes.append(size)
        size *= 2
    return [*sizes, max_context]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None off a GPU: the same padded step, run eagerly (how tests check it)
    inputs: StepTensors  # the static tensors the graph reads; each step copies its own values into them
    logits: torch.Tensor  # the static tensor the graph writes


class DecodeGraphs:
    def __init__(
        self,
        run_model: Callable[[StepTensors], torch.Tensor],
        cache: PagedKVCache,
        scratch_slot: int,
        max_batch: int,
        max_context: int,
        device: torch.device,
    ) -> None:
        self._run_model = run_model
        self._cache = cache
        self._scratch = scratch_slot
        self._device = device
        self._batches = batch_buckets(max_batch)
        self._contexts = context_buckets(max_context)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.disabled = False

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def capture_all(self) -> None:
        """Every shape, largest first; if one cannot be captured, graphs are off and every step runs eagerly."""
        for size in reversed(self._batches):
            for context in reversed(self._contexts):
                graph = self._capture(size, context)
                if graph is None:
                    return
                self._graphs[(size, context)] = graph

    def fits(self, batch: StepBatch) -> bool:
        return (
            not self.disabled
            and len(batch.token_ids) <= self._batches[-1]
            and all(len(tokens) == 1 for tokens in batch.token_ids)
            and max(batch.start) < self._contexts[-1]
        )

    def run(self, batch: StepBatch) -> torch.Tensor:
        """The step's logits from its graph; only for a batch that ``fits`` (every graph was captured at load)."""
        rows = len(batch.token_ids)
        size = next(b for b in self._batches if b >= rows)
        context = next(c for c in self._contexts if c > max(batch.start))
        graph = self._graphs[(size, context)]
        self._load(graph.inputs, batch, size)
        if graph.graph is None:
            return self._run_model(graph.inputs)[:rows]
        graph.graph.replay()
        return graph.logits[:rows]

    def _load(self, inputs: StepTensors, batch: StepBatch, size: int) -> None:
        padding = size - len(batch.token_ids)
        block = batch.block_size
        # A padding row's only token sits in the scratch slot (block ``scratch // block``, offset 0).
        padded = StepBatch(
            token_ids=[*batch.token_ids, *([[0]] * padding)],
            start=[*batch.start, *([0] * padding)],
            block_tables=[*batch.block_tables, *([[self._scratch // block]] * padding)],
            block_size=block,
            sample_rows=list(range(size)),
        )
        step = StepTensors.build(padded, self._cache, self._device, padded_decode=True)
        width = step.decode_slots.shape[1]
        inputs.input_ids.copy_(step.input_ids)
        inputs.position_ids.copy_(step.position_ids)
        inputs.write_slots.copy_(step.write_slots)
        inputs.decode_slots[:, :width].copy_(step.decode_slots)
        inputs.decode_slots[:, width:].fill_(self._scratch)
        if padding:  # past their one token, padding rows would read beyond the scratch slot: keep them on it
            inputs.decode_slots[size - padding :].fill_(self._scratch)
        inputs.decode_mask[..., :width].copy_(step.decode_mask)
        inputs.decode_mask[..., width:].fill_(False)

    def _capture(self, size: int, context: int) -> _Graph | None:
        device = self._device
        inputs = StepTensors(
            cache=self._cache,
            input_ids=torch.zeros((1, size), dtype=torch.long, device=device),
            position_ids=torch.zeros((1, size), dtype=torch.long, device=device),
            write_slots=torch.full((size,), self._scratch, dtype=torch.long, device=device),
            decode_count=size,
            decode_slots=torch.full((size, context), self._scratch, dtype=torch.long, device=device),
            decode_mask=torch.zeros((size, 1, 1, context), dtype=torch.bool, device=device),
            prefill_slots=torch.zeros(0, dtype=torch.long, device=device),
            prefill_mask=torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=device),
            logits_to_keep=torch.arange(size, device=device),
        )
        inputs.decode_mask[..., 0] = True
        if device.type != "cuda":
            return _Graph(None, inputs, self._run_model(inputs))
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisation (kernel choice, workspaces) must happen outside capture
                    self._run_model(inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._run_model(inputs)
        except Exception:
            log.warning("a CUDA graph of a decode step could not be captured; decoding runs eagerly", exc_info=True)
            self.disabled = True
            return None
        return _Graph(graph, inputs, logits)
