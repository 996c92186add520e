"""Paged allocation of the KV cache: fixed-size blocks handed to sequences as they grow.

The cache memory itself belongs to the backend (it knows the model's layers, heads and device); the engine owns
which slots of it each sequence may use. A sequence's tokens live in its blocks in order, so token ``i`` of a
sequence sits in slot ``table[i // block_size] * block_size + i % block_size``. Allocation by block rather than
by a sequence's maximum length is what lets many sequences share the cache: memory is taken as tokens arrive.
"""

from __future__ import annotations


class OutOfBlocks(Exception):
    """No free block is left; the engine preempts or waits."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest-numbered blocks first, so a lightly loaded cache stays compact.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= len(self._free)

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` so it holds ``tokens`` tokens; all or nothing."""
        needed = self.blocks_for(tokens) - len(table)
        if needed <= 0:
            return
        if needed > len(self._free):
            raise OutOfBlocks(f"{needed} blocks needed, {len(self._free)} free")
        table.extend(self._free.pop() for _ in range(needed))

    def release(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()
