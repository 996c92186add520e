"""N-gram speculative decoding: drafts from the sequence's own text, verified in one forward pass, and exactly the
tokens of greedy decoding one at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from server.config import ModelConfig
from server.errors import ConfigError
from server.scheduling.generation.speculative import NgramDrafter, SpeculativeConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from server.protocol.generation import GenerateRequest, SamplingParams  # noqa: E402
from server.scheduling.generation.engine import GenerationEngine  # noqa: E402
from tests.scheduling.generation_engines import greedy, make_engine  # noqa: E402

SPECULATIVE = '{"method": "ngram", "num_tokens": 4}'
# Prompts that repeat themselves, so the lookup finds drafts, and others that do not.
PROMPTS = [
    "1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 1 2",
    "Hello world! Hello world! Hello world! Hello",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "What is the capital of France?",
    "def main(): print(",
]


def test_the_config_is_read_from_a_yaml_mapping_with_vllm_names() -> None:
    text = "name: lm\nbackend: transformers\nparameters:\n  speculative: {method: ngram, num_speculative_tokens: 3}\n"
    config = ModelConfig.model_validate(yaml.safe_load(text))
    parsed = SpeculativeConfig.from_parameter("lm", config.parameters["speculative"])
    assert parsed is not None and parsed.num_tokens == 3 and parsed.prompt_lookup_max == 4
    assert SpeculativeConfig.from_parameter("lm", SPECULATIVE).num_tokens == 4  # type: ignore[union-attr]
    assert SpeculativeConfig.from_parameter("lm", None) is None
    for bad in ('{"method": "eagle", "num_tokens": 2}', '{"method": "ngram"}', '{"method": "ngram", "num_tokens": 0}'):
        with pytest.raises(ConfigError, match="parameters.speculative"):
            SpeculativeConfig.from_parameter("lm", bad)


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_matching_end() -> None:
    drafter = NgramDrafter(SpeculativeConfig(method="ngram", num_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1))
    assert drafter.propose([1, 2, 3, 9, 1, 2], limit=10) == [3, 9, 1]
    # The sequence grows: the end "2 3" last appeared before 4 (not before 9).
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 4, 2, 3], limit=10) == [4, 2, 3]
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 4, 2, 3, 7], limit=10) == []  # 7 never appeared before
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 4, 2, 3, 7, 1, 2], limit=1) == [3]  # limited by the request
    assert drafter.propose([5, 5], limit=0) == []


# -- the engine ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speculating(causal_lm_dir: Path) -> Iterator[GenerationEngine]:
    engine = make_engine(causal_lm_dir, speculative=SPECULATIVE)
    yield engine
    engine.stop()


async def run(engine: GenerationEngine, prompt: str, sampling: SamplingParams) -> tuple[list[int], str]:
    outputs = [o async for o in engine.generate(GenerateRequest("t", prompt=prompt, sampling=sampling))]
    return [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs)


async def test_greedy_answers_are_unchanged_and_drafts_are_accepted(speculating: GenerationEngine, reference) -> None:
    answers = await asyncio.gather(*(run(speculating, p, greedy(30 + 5 * i)) for i, p in enumerate(PROMPTS)))
    for i, (prompt, (tokens, text)) in enumerate(zip(PROMPTS, answers, strict=True)):
        assert tokens == reference(prompt, 30 + 5 * i), prompt
        assert text == speculating.tokenizer.decode(tokens, skip_special_tokens=True)
    stats = speculating.stats
    assert stats.spec_accepted_tokens > 0 and stats.spec_draft_tokens >= stats.spec_accepted_tokens


async def test_max_tokens_and_stop_strings_hold_when_drafts_run_past_them(
    speculating: GenerationEngine, reference
) -> None:
    prompt = PROMPTS[0]
    for max_tokens in (1, 2, 3, 7):
        tokens, _ = await run(speculating, prompt, greedy(max_tokens))
        assert tokens == reference(prompt, max_tokens)
    full = (await run(speculating, prompt, greedy(40)))[1]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    tokens, text = await run(speculating, prompt, greedy(40, stop=[stop]))
    assert text == full[: full.index(stop)]


async def test_sampled_and_penalised_rows_do_not_speculate_and_match_an_engine_without_it(
    causal_lm_dir: Path, speculating: GenerationEngine
) -> None:
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    penalised = greedy(24, repetition_penalty=1.3)
    plain = make_engine(causal_lm_dir)
    try:
        for sampling in (sampled, penalised):
            drafts_before = speculating.stats.spec_draft_tokens
            crowd = [asyncio.create_task(run(speculating, p, greedy(20))) for p in PROMPTS]
            beside = await run(speculating, PROMPTS[1], sampling)
            await asyncio.gather(*crowd)
            assert beside == await run(plain, PROMPTS[1], sampling)
            assert speculating.stats.spec_draft_tokens > drafts_before  # the greedy crowd did speculate
    finally:
        plain.stop()


async def test_speculation_in_a_full_cache_with_preemption_still_matches(causal_lm_dir: Path, reference) -> None:
    engine = make_engine(
        causal_lm_dir, speculative=SPECULATIVE, kv_cache_blocks="12", kv_block_size="8", max_model_len="96"
    )
    try:
        answers = await asyncio.gather(*(run(engine, p, greedy(40)) for p in PROMPTS * 2))
        assert engine.stats.preempted > 0 and engine.stats.spec_accepted_tokens > 0
        for prompt, (tokens, _) in zip(PROMPTS * 2, answers, strict=True):
            assert tokens == reference(prompt, 40), prompt
        assert engine.blocks.used_blocks == 0
    finally:
        engine.stop()


@pytest.mark.slow
async def test_the_model_in_a_worker_process_verifies_drafts_too(causal_lm_dir: Path, reference) -> None:
    engine = make_engine(causal_lm_dir, speculative=SPECULATIVE, model_process="true")
    try:
        tokens, _ = await run(engine, PROMPTS[2], greedy(40))
        assert tokens == reference(PROMPTS[2], 40) and engine.stats.spec_accepted_tokens > 0
    finally:
        engine.stop()
