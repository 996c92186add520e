"""Block placement in the KV cache: sequences keep their blocks consecutive while there is room, and stay correct
when there is not."""

from __future__ import annotations

import pytest

from server.scheduling.generation.kv_blocks import BlockAllocator, OutOfBlocks


def consecutive(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_growing_sequences_stay_consecutive_when_there_is_room() -> None:
    blocks = BlockAllocator(num_blocks=64, block_size=4)
    tables: list[list[int]] = [[] for _ in range(4)]
    for table in tables:  # four prompts of 10 tokens arrive
        blocks.grow(table, 10)
    for tokens in range(11, 40):  # then all four decode, one token a step
        for table in tables:
            blocks.grow(table, tokens)
    assert all(consecutive(table) and len(table) == 10 for table in tables)
    assert blocks.used_blocks == 40
    assert len({b for table in tables for b in table}) == 40


def test_a_new_sequence_starts_in_the_middle_of_the_longest_free_run() -> None:
    blocks = BlockAllocator(num_blocks=100, block_size=1)
    first: list[int] = []
    blocks.grow(first, 10)
    assert first == list(range(10))  # an empty cache: from the start
    second: list[int] = []
    blocks.grow(second, 1)
    assert second == [55]  # the free run 10..99, halved


def test_a_sequence_whose_next_block_is_taken_continues_elsewhere() -> None:
    blocks = BlockAllocator(num_blocks=8, block_size=1)
    a: list[int] = []
    b: list[int] = []
    blocks.grow(a, 4)  # 0..3
    blocks.grow(b, 4)  # 4..7: the cache is full
    blocks.release(a)
    blocks.grow(b, 6)
    assert len(b) == 6 and not consecutive(b) and len(set(b)) == 6
    with pytest.raises(OutOfBlocks):
        blocks.grow(b, 11)  # 5 more blocks, 2 free
    assert len(b) == 6 and blocks.free_blocks == 2  # all or nothing


def test_released_blocks_are_reused() -> None:
    blocks = BlockAllocator(num_blocks=6, block_size=2)
    tables = [[] for _ in range(3)]
    for _ in range(50):
        for table in tables:
            blocks.grow(table, 4)
        assert blocks.free_blocks == 0 and sorted(b for t in tables for b in t) == list(range(6))
        for table in tables:
            blocks.release(table)
        assert blocks.free_blocks == 6 and blocks.usage == 0
