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

Automatic prefix caching, as vLLM does it: a block full of computed tokens is named by a hash of its tokens and
its parent block's hash, so the name stands for the whole prefix up to the block's end (the engine names a block
when the step that fills it is scheduled, and ``forget``s the names if that step fails). A sequence that starts
with the same tokens takes those blocks instead of computing them again (blocks are reference-counted; a shared
block is never written, only the blocks past the shared prefix are). A released block keeps its contents and name
while nothing needs its memory: it waits in a least-recently-used list and is evicted, oldest first, only when no
empty block is left. A hit is checked token for token, not trusted to the hash.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

_FREE = 1
_FREE_RUNS = re.compile(b"\x01+")


class OutOfBlocks(Exception):
    """No free block is left; the engine preempts or waits."""


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """What a named block holds: the hash of the prefix before it, and its own tokens."""

    parent: int | None
    tokens: tuple[int, ...]


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The name of a full block: its tokens chained to its parent's name."""
    return hash((parent, tokens))


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Empty blocks (no sequence, no cached contents).
        self._free_map = bytearray([_FREE]) * num_blocks
        self._empty_count = num_blocks
        # Prefix caching: sequences holding each block, named blocks by hash, and the released named blocks in
        # least-recently-used order (their contents kept until the memory is needed).
        self._refs = [0] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._names: dict[int, tuple[int, CachedBlock]] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence may take: the empty ones and the cached ones no sequence holds."""
        return self._empty_count + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= self.free_blocks

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` so it holds ``tokens`` tokens; all or nothing."""
        needed = self.blocks_for(tokens) - len(table)
        if needed <= 0:
            return
        if needed > self.free_blocks:
            raise OutOfBlocks(f"{needed} blocks needed, {self.free_blocks} free")
        for _ in range(needed):
            if self._empty_count:
                after = table[-1] + 1 if table else self.num_blocks
                block = after if after < self.num_blocks and self._free_map[after] == _FREE else self._run_start()
                self._free_map[block] = 0
                self._empty_count -= 1
            else:
                block = self._evict()
            self._refs[block] = 1
            table.append(block)

    def release(self, table: list[int]) -> None:
        """Give a sequence's blocks back; named ones stay cached, the end of the sequence first in line to go."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._names:
                self._evictable[block] = None
            else:
                self._free_map[block] = _FREE
                self._empty_count += 1
        table.clear()

    # -- prefix caching ----------------------------------------------------------------------------------------
    def full_block_hashes(self, tokens: list[int], known: list[int]) -> list[int]:
        """Extend ``known`` (the names of the first blocks of ``tokens``) to every full block of ``tokens``."""
        size = self.block_size
        for index in range(len(known), len(tokens) // size):
            parent = known[-1] if known else None
            known.append(block_hash(parent, tuple(tokens[index * size : (index + 1) * size])))
        return known

    def cached_prefix(self, tokens: list[int], hashes: list[int]) -> list[int]:
        """The cached blocks that hold the start of ``tokens`` (``hashes``: their full blocks' names), in order."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        size = self.block_size
        for index, name in enumerate(hashes):
            block = self._by_hash.get(name)
            if block is None:
                break
            cached = self._names[block][1]
            parent = hashes[index - 1] if index else None
            if cached.parent != parent or cached.tokens != tuple(tokens[index * size : (index + 1) * size]):
                break  # a hash collision: compute it instead
            blocks.append(block)
        return blocks

    def cost(self, blocks: list[int]) -> int:
        """Free blocks that sharing ``blocks`` uses up: the cached ones no sequence holds leave the free pool."""
        return sum(1 for block in blocks if not self._refs[block])

    def share(self, table: list[int], blocks: list[int]) -> None:
        """Start an empty ``table`` with cached ``blocks`` (from ``cached_prefix``)."""
        for block in blocks:
            if not self._refs[block]:
                del self._evictable[block]
            self._refs[block] += 1
            table.append(block)

    def register(self, block: int, name: int, parent: int | None, tokens: tuple[int, ...]) -> None:
        """Record that ``block`` is full and holds ``tokens`` after the prefix ``parent``; a block already cached
        under the same name (computed twice at once) keeps the name, and this one stays private."""
        if not self.enable_prefix_caching or name in self._by_hash or block in self._names:
            return
        self._by_hash[name] = block
        self._names[block] = (name, CachedBlock(parent, tokens))

    def forget(self, blocks: list[int]) -> None:
        """Drop the names of ``blocks`` (their contents cannot be trusted); one no sequence holds becomes empty."""
        for block in blocks:
            named = self._names.pop(block, None)
            if named is None:
                continue
            del self._by_hash[named[0]]
            if block in self._evictable:
                del self._evictable[block]
                self._free_map[block] = _FREE
                self._empty_count += 1

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        name, _ = self._names.pop(block)
        del self._by_hash[name]
        self.evictions += 1
        return block

    def _run_start(self) -> int:
        """Where a sequence that cannot extend its own run goes: into the longest free run, at its start when the
        run starts the cache (no sequence before it needs the room), else in its middle."""
        longest = max(_FREE_RUNS.finditer(self._free_map), key=lambda run: run.end() - run.start())
        return 0 if longest.start() == 0 else (longest.start() + longest.end()) // 2
