"""Automatic prefix caching: shared starts are computed once, and what a sequence generates does not change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.scheduling.generation.kv_blocks import BlockAllocator, block_hash

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from server.errors import BackendError  # noqa: E402
from server.extensions.generation_metrics import generation_families  # noqa: E402
from server.protocol.generation import GenerateRequest, SamplingParams  # noqa: E402
from server.scheduling.generation.engine import GenerationEngine  # noqa: E402
from tests.scheduling.generation_engines import greedy, greedy_reference, make_engine  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Tell me a story", "1 2 3", "Hello world!", "def main():"]


# -- the allocator ---------------------------------------------------------------------------------------------------
def named_table(blocks: BlockAllocator, tokens: list[int]) -> tuple[list[int], list[int]]:
    """A sequence's blocks for ``tokens``, every full one named as the engine names them."""
    table: list[int] = []
    blocks.grow(table, len(tokens))
    hashes = blocks.full_block_hashes(tokens, [])
    for index, name in enumerate(hashes):
        parent = hashes[index - 1] if index else None
        blocks.register(table[index], name, parent, tuple(tokens[index * 4 : (index + 1) * 4]))
    return table, hashes


def test_a_shared_start_is_found_block_by_block_and_reference_counted() -> None:
    blocks = BlockAllocator(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first, _ = named_table(blocks, list(range(10)))  # blocks 0-3, 4-7 named; 8-9 partial
    other = [0, 1, 2, 3, 4, 5, 6, 99, 8, 9]
    cached = blocks.cached_prefix(other, blocks.full_block_hashes(other, []))
    assert cached == first[:1]  # the second block differs in one token, and so does everything after it
    same = list(range(12))
    cached = blocks.cached_prefix(same, blocks.full_block_hashes(same, []))
    assert cached == first[:2]
    second: list[int] = []
    blocks.share(second, cached)
    blocks.grow(second, 12)
    assert second[:2] == first[:2] and blocks.used_blocks == 4  # 3 of the first, 1 new
    blocks.release(first)
    assert blocks.used_blocks == 3  # the shared blocks are still held by the second sequence
    blocks.release(second)
    assert blocks.used_blocks == 0 and blocks.free_blocks == 16


def test_released_blocks_stay_cached_until_needed_and_go_least_recently_used_first() -> None:
    blocks = BlockAllocator(num_blocks=4, block_size=4, enable_prefix_caching=True)
    old, old_hashes = named_table(blocks, [1] * 8)
    new, new_hashes = named_table(blocks, [2] * 8)
    old_blocks, new_blocks = list(old), list(new)
    blocks.release(old)
    blocks.release(new)
    assert blocks.free_blocks == 4
    taken: list[int] = []
    blocks.grow(taken, 4)  # no empty block: one cached block is evicted, the older sequence's last one first
    assert taken == [old_blocks[1]] and blocks.evictions == 1
    assert blocks.cached_prefix([1] * 8, old_hashes) == old_blocks[:1]
    assert blocks.cached_prefix([2] * 8, new_hashes) == new_blocks


def test_a_hash_collision_is_not_a_hit() -> None:
    blocks = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_caching=True)
    table: list[int] = []
    blocks.grow(table, 2)
    blocks.register(table[0], block_hash(None, (5, 6)), None, (7, 8))  # a name that does not match its tokens
    assert blocks.cached_prefix([5, 6, 1], [block_hash(None, (5, 6))]) == []


def test_without_prefix_caching_nothing_is_named_or_found() -> None:
    blocks = BlockAllocator(num_blocks=8, block_size=4)
    table, hashes = named_table(blocks, list(range(8)))
    blocks.release(table)
    assert blocks.cached_prefix(list(range(8)), hashes) == [] and blocks.free_blocks == 8


# -- the engine ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test GPT-2 with room for a ~500-token system prompt."""
    from tests.conftest import _language_models

    return _language_models().build_causal_lm(tmp_path_factory.mktemp("long-lm") / "model", n_positions=1024)


@pytest.fixture(scope="module")
def system_prompt(long_lm_dir: Path) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(long_lm_dir)
    words = "ModelDock serves models from a folder over HTTP and gRPC; the quick brown fox jumps over the lazy dog. "
    text = ""
    while len(tokenizer.encode(text)) < 500:
        text += words
    return text


@pytest.fixture(scope="module")
def reference(long_lm_dir: Path) -> Callable[[str, int], list[int]]:
    return greedy_reference(long_lm_dir)


async def run(engine: GenerationEngine, prompt: str, max_tokens: int) -> list[int]:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [
        t async for o in engine.generate(GenerateRequest("t", prompt=prompt, sampling=sampling)) for t in o.token_ids
    ]


@pytest.fixture(scope="module")
def cached_engine(long_lm_dir: Path) -> Iterator[GenerationEngine]:
    engine = make_engine(long_lm_dir)
    yield engine
    engine.stop()


async def test_a_shared_system_prompt_is_prefilled_once_and_answers_match_generate(
    cached_engine: GenerationEngine, system_prompt: str, reference
) -> None:
    first = await run(cached_engine, system_prompt + QUESTIONS[0], 12)
    assert first == reference(system_prompt + QUESTIONS[0], 12)
    stats = cached_engine.stats
    hits_before = stats.prefix_cache_hits
    answers = await asyncio.gather(
        *(run(cached_engine, system_prompt + q, 12 + 3 * i) for i, q in enumerate(QUESTIONS))
    )
    block = cached_engine.blocks.block_size
    shared_blocks = len(cached_engine.tokenizer.encode(system_prompt)) // block - 1
    # Every concurrent request found the system prompt's blocks (less one at most, where the question's first
    # token may merge with its last word).
    assert stats.prefix_cache_hits - hits_before >= len(QUESTIONS) * shared_blocks * block
    for i, (question, answer) in enumerate(zip(QUESTIONS, answers, strict=True)):
        assert answer == reference(system_prompt + question, 12 + 3 * i), question
    assert 0 < stats.prefix_cache_hit_rate < 1
    families = {f.name: f for f in generation_families([("lm", "1", stats)])}
    assert families["modeldock_llm_prefix_cache_hits"].samples[0].value == stats.prefix_cache_hits


async def test_greedy_answers_are_the_same_with_prefix_caching_off(
    long_lm_dir: Path, cached_engine: GenerationEngine, system_prompt: str
) -> None:
    plain = make_engine(long_lm_dir, enable_prefix_caching="false")
    try:
        prompts = [system_prompt + q for q in QUESTIONS] + [system_prompt[:300] + q for q in QUESTIONS[:2]]
        with_cache = await asyncio.gather(*(run(cached_engine, p, 16) for p in prompts))
        without = await asyncio.gather(*(run(plain, p, 16) for p in prompts))
        assert with_cache == without
        assert plain.stats.prefix_cache_queries == 0 and plain.blocks.evictions == 0
    finally:
        plain.stop()


async def test_preempted_sequences_with_shared_blocks_still_match(long_lm_dir: Path, reference) -> None:
    """Eight sequences with a common 64-token start in a cache too small for all of them: blocks are shared,
    evicted and preempted, and every answer is still transformers' own."""
    engine = make_engine(long_lm_dir, kv_cache_blocks="24", kv_block_size="8", max_model_len="160")
    tokenizer = engine.tokenizer
    start = tokenizer.decode(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64])
    prompts = [start + q for q in QUESTIONS + ["Paris", "seven, eight", "sunny"]]
    try:
        answers = await asyncio.gather(*(run(engine, p, 40) for p in prompts))
        assert engine.stats.preempted > 0 and engine.stats.prefix_cache_hits > 0
        for prompt, answer in zip(prompts, answers, strict=True):
            assert answer == reference(prompt, 40), prompt
        assert engine.blocks.used_blocks == 0
    finally:
        engine.stop()


async def test_requests_arriving_together_compute_their_shared_start_once_in_their_first_step(
    long_lm_dir: Path, system_prompt: str, reference
) -> None:
    """As in vLLM, the blocks a step will fill are named when it is scheduled: requests that arrive together with
    the same system prompt share it in the step that computes it, instead of each computing it until the first
    of them has finished a step; every answer is still transformers' own."""
    engine = make_engine(long_lm_dir, max_num_batched_tokens="4096")
    engine.stop()  # its steps run on this thread below, one at a time
    prompts = [system_prompt + q for q in QUESTIONS]
    sequences = [
        engine.new_sequence(GenerateRequest("t", prompt=p, sampling=greedy(8)), engine.tokenizer.encode(p))
        for p in prompts
    ]
    engine._waiting.extend(sequences)
    work = engine._schedule()
    assert [s for s, _ in work] == sequences  # all admitted in one step
    block = engine.blocks.block_size
    shared = (len(engine.tokenizer.encode(system_prompt)) // block - 1) * block
    lengths = [len(s.prompt_ids) for s in sequences]
    assert sum(count for _, count in work) <= lengths[0] + sum(length - shared for length in lengths[1:])
    engine._run(work)
    assert all(len(s.output_ids) == 1 for s in sequences)  # every first token from that one step
    while engine._running:
        engine._step()
    for prompt, sequence in zip(prompts, sequences, strict=True):
        assert sequence.output_ids == reference(prompt, 8), prompt
    assert engine.blocks.used_blocks == 0


async def test_blocks_named_for_a_step_that_failed_are_not_found_later(
    long_lm_dir: Path, system_prompt: str, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names given ahead of a step stand for keys and values it never wrote if it fails: they are dropped, so
    the next request with the same start computes it instead of reading what the blocks held before."""
    engine = make_engine(long_lm_dir)
    try:
        await run(engine, "Hello", 1)  # the engine's warm-up steps are over
        forward = engine.backend.forward
        failures = iter([RuntimeError("the device fell over")])

        def failing_once(batch):  # the first step of the request below fails, then the model works again
            error = next(failures, None)
            if error is not None:
                raise error
            return forward(batch)

        monkeypatch.setattr(engine.backend, "forward", failing_once)
        prompt = system_prompt + QUESTIONS[1]
        with pytest.raises(BackendError):
            await run(engine, prompt, 4)
        hits = engine.stats.prefix_cache_hits
        assert await run(engine, prompt, 12) == reference(prompt, 12)
        assert engine.stats.prefix_cache_hits == hits
    finally:
        engine.stop()


def test_rows_sharing_a_cached_start_read_it_once_and_attend_as_to_their_whole_context() -> None:
    """Decode attention in place: rows whose keys start with the same cached run attend to it in one call, and each
    row's result is what attending to its whole context at once gives."""
    from backends.transformers import paged_attention

    generator = torch.Generator().manual_seed(0)
    heads, dim, rows = 4, 16, 5
    cache_key, cache_value = (torch.randn(heads, 512, dim, generator=generator) for _ in range(2))
    queries = torch.randn(heads, rows, dim, generator=generator)
    # Row 0 holds the start and its own blocks as one run; rows 1-4 share the start (0, 64), then their own.
    spans = [[(0, 80)]] + [[(0, 64), (128 + 64 * row, 10 + row)] for row in range(1, rows)]
    shared = paged_attention._shared_runs(queries, cache_key, cache_value, spans, None)
    assert list(shared) == [(0, 64)] and shared[(0, 64)][2] == {1: 0, 2: 1, 3: 2, 4: 3}
    out = paged_attention._decode_attention(queries, cache_key, cache_value, spans, None)[0]
    for row, span in enumerate(spans):
        slots = torch.cat([torch.arange(first, first + count) for first, count in span])
        keys, values = cache_key[:, slots], cache_value[:, slots]
        whole = torch.nn.functional.scaled_dot_product_attention(queries[:, row : row + 1], keys, values)
        torch.testing.assert_close(out[row], whole[:, 0], rtol=1e-5, atol=1e-5)


def test_rows_sharing_a_cached_start_attend_to_it_once_beside_the_decode_kernel() -> None:
    """With the CPU decode kernel: the start the rows' block tables share is attended once for all of them, the
    kernel reads each row's own keys and merges the two, and each row gets what its whole context at once gives."""
    from types import SimpleNamespace

    from backends.transformers import decode_kernel, paged_attention

    kernel = decode_kernel.load()
    assert kernel is not None
    generator = torch.Generator().manual_seed(1)
    heads, dim, size = 4, 16, 16
    cache_key, cache_value = (torch.randn(heads, 512, dim, generator=generator) for _ in range(2))
    # Rows 0-3 share blocks 0-3 (a 64-token start); row 0's own blocks follow them; row 4 shares nothing.
    tables = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 9], [0, 1, 2, 3, 12, 13], [0, 1, 2, 3, 20], [30, 31]]
    contexts = [80, 66, 90, 65, 20]
    rows, shared = paged_attention._kernel_rows(tables, contexts, size)
    assert [(members.tolist(), first, count) for members, first, count in shared] == [([0, 1, 2, 3], 0, 64)]
    assert rows.begins.tolist() == [64, 64, 64, 64, 0]
    queries = torch.randn(heads, len(tables), dim, generator=generator)
    step = SimpleNamespace(decode_rows=rows, decode_shared=shared, cache=SimpleNamespace(decode_kernel=kernel))
    out = paged_attention._kernel_decode_attention(queries, cache_key, cache_value, step, None)[0]
    for row, (table, context) in enumerate(zip(tables, contexts, strict=True)):
        slots = torch.tensor([table[p // size] * size + p % size for p in range(context)])
        keys, values = cache_key[:, slots], cache_value[:, slots]
        whole = torch.nn.functional.scaled_dot_product_attention(queries[:, row : row + 1], keys, values)
        torch.testing.assert_close(out[row], whole[:, 0], rtol=1e-5, atol=1e-5)


def test_forgotten_blocks_are_empty_again() -> None:
    blocks = BlockAllocator(num_blocks=4, block_size=4, enable_prefix_caching=True)
    table, hashes = named_table(blocks, list(range(8)))
    forgotten = table[:1]
    blocks.forget(forgotten)
    assert blocks.cached_prefix(list(range(8)), hashes) == []
    blocks.release(table)
    assert blocks.free_blocks == 4
    blocks.forget(table[1:])  # a released (evictable) named block goes back to the empty ones
    assert blocks.free_blocks == 4 and blocks.cached_prefix(list(range(8)), hashes) == []
