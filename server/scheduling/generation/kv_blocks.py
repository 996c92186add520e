"""Paged allocation of the KV cache: fixed-size blocks handed to sequences as they grow.

The cache memory itself belongs to the backend (it knows the model's layers, heads and device); the engine owns
which slots of it each sequence may use. A sequence's tokens live in its blocks in order, so token ``i`` of a
sequence sits in slot ``table[i // block_size] * block_size + i % block_size``. Allocation by block rather than
by a sequence's maximum length is what lets many sequences share the cache: memory is taken as tokens arrive.

Blocks are placed so that a sequence's blocks stay consecutive when there is room: a growing sequence takes the
block right after its last one when that is free, and a new sequence starts in the middle of the longest free run,
which leaves room to grow both to it and to the sequence before the run. A backend can then read a sequence's
keys and values as one slice of the cache instead of gathering them slot by slot (on the CPU that copy was a
fifth of a decode step); a sequence that could not stay consecutive is still correct, just gathered.
"""

from __future__ import annotations

import re

_FREE = 1
_FREE_RUNS = re.compile(b"\x01+")


class OutOfBlocks(Exception):
    """No free block is left; the engine preempts or waits."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_map = bytearray([_FREE]) * num_blocks
        self._free_count = num_blocks

    @property
    def free_blocks(self) -> int:
        return self._free_count

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._free_count

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= self._free_count

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` so it holds ``tokens`` tokens; all or nothing."""
        needed = self.blocks_for(tokens) - len(table)
        if needed <= 0:
            return
        if needed > self._free_count:
            raise OutOfBlocks(f"{needed} blocks needed, {self._free_count} free")
        for _ in range(needed):
            after = table[-1] + 1 if table else self.num_blocks
            block = after if after < self.num_blocks and self._free_map[after] == _FREE else self._run_start()
            self._free_map[block] = 0
            table.append(block)
        self._free_count -= needed

    def release(self, table: list[int]) -> None:
        for block in table:
            self._free_map[block] = _FREE
        self._free_count += len(table)
        table.clear()

    def _run_start(self) -> int:
        """Where a sequence that cannot extend its own run goes: into the longest free run, at its start when the
        run starts the cache (no sequence before it needs the room), else in its middle."""
        longest = max(_FREE_RUNS.finditer(self._free_map), key=lambda run: run.end() - run.start())
        return 0 if longest.start() == 0 else (longest.start() + longest.end()) // 2
