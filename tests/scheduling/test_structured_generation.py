"""ModelDock's engine under constraints: grammars, logprobs, logit_bias and min_tokens, on the tiny random GPT-2.

A model with random weights writes whatever its logits say, so every property checked here comes from the engine:
a constrained output parses and validates however nonsensical its values, and log-probabilities are compared with
a ``log_softmax`` of the logits transformers' own model gives for the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from server.errors import InvalidInput  # noqa: E402
from server.protocol.generation import GenerateRequest, GenerationOutput, SamplingParams  # noqa: E402
from server.scheduling.generation.engine import GenerationEngine  # noqa: E402
from tests.scheduling.generation_engines import make_engine  # noqa: E402

PROMPT = "Once upon a time"
EOS = 0

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "number"},
        "y": {"type": "number"},
        "label": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["x", "y", "label"],
}


@pytest.fixture(scope="module")
def engine(causal_lm_dir: Path) -> Iterator[GenerationEngine]:
    engine = make_engine(causal_lm_dir)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def model(causal_lm_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(causal_lm_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(causal_lm_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(causal_lm_dir)


class Completion:
    def __init__(self, chunks: list[GenerationOutput]) -> None:
        self.chunks = chunks
        self.text = "".join(c.text for c in chunks)
        self.token_ids = [t for c in chunks for t in c.token_ids]
        self.finish_reason = chunks[-1].finish_reason
        self.logprobs = [lp for c in chunks for lp in (c.logprobs or [])]
        self.prompt_logprobs = chunks[0].prompt_logprobs


async def complete(engine: GenerationEngine, prompt: str = PROMPT, **sampling: Any) -> Completion:
    request = GenerateRequest(request_id="t", prompt=prompt, sampling=SamplingParams.model_validate(sampling))
    return Completion([chunk async for chunk in engine.generate(request)])


def run(engine: GenerationEngine, prompt: str = PROMPT, **sampling: Any) -> Completion:
    return asyncio.run(complete(engine, prompt, **sampling))


def model_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' own logits at every position of ``ids``."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("schema", [PERSON, POINT], ids=["person", "point"])
def test_every_json_schema_output_parses_and_validates(engine: GenerationEngine, schema: dict) -> None:
    async def all_seeds() -> list[Completion]:
        greedy = complete(engine, max_tokens=200, temperature=0, structured_outputs={"json": schema})
        sampled = [
            complete(engine, max_tokens=200, temperature=1.0, seed=seed, structured_outputs={"json": schema})
            for seed in range(6)
        ]
        return await asyncio.gather(greedy, *sampled)

    for completion in asyncio.run(all_seeds()):
        assert completion.finish_reason == "stop", completion.text
        assert completion.token_ids[-1] == EOS  # the grammar allowed the end only once the document was whole
        jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.slow
def test_json_object_is_an_object(engine: GenerationEngine) -> None:
    for seed in range(3):
        completion = run(engine, max_tokens=200, temperature=0.7, seed=seed, structured_outputs={"json_object": True})
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:  # random weights may keep writing a string: still a prefix of an object
            assert completion.finish_reason == "length" and completion.text.startswith("{")


def test_regex_choice_and_grammar_are_honoured(engine: GenerationEngine) -> None:
    for seed in range(4):
        text = run(engine, max_tokens=40, temperature=1.0, seed=seed, structured_outputs={"regex": r"[A-Z]{2}-\d{3}"})
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", text.text) and text.finish_reason == "stop"
        choices = ["red", "green", "deep blue"]
        picked = run(engine, max_tokens=40, temperature=1.0, seed=seed, structured_outputs={"choice": choices})
        assert picked.text in choices and picked.finish_reason == "stop"
        grammar = 'root ::= "(" num ("," num)? ")"\nnum ::= [1-9] [0-9]?'
        tuple_text = run(engine, max_tokens=40, temperature=1.0, seed=seed, structured_outputs={"grammar": grammar})
        assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)?\)", tuple_text.text)


def test_grammar_ends_the_sequence_even_without_end_tokens(engine: GenerationEngine) -> None:
    completion = run(
        engine, max_tokens=40, temperature=0, ignore_eos=True, structured_outputs={"choice": ["yes", "no"]}
    )
    assert completion.text in ("yes", "no") and completion.finish_reason == "stop"
    assert EOS not in completion.token_ids


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(engine: GenerationEngine) -> None:
    schema = {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]}
    completion = run(engine, max_tokens=4, temperature=0, structured_outputs={"json": schema})
    assert completion.finish_reason == "length" and len(completion.token_ids) == 4
    assert '{"description"'.startswith(completion.text) or completion.text.startswith("{")


def test_greedy_logprobs_match_the_models_own(engine: GenerationEngine, model: Any, tokenizer: Any) -> None:
    completion = run(engine, max_tokens=8, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    prompt_ids = tokenizer.encode(PROMPT)
    reference = model_logprobs(model, prompt_ids + completion.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids) == 8
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = reference[len(prompt_ids) - 1 + i]
        assert entry.chosen.token_id == token == entry.top[0].token_id  # greedy: the chosen token is the top one
        assert entry.chosen.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry.chosen.token == tokenizer.decode([token])
        values, ids = torch.topk(row, 5)
        assert [t.token_id for t in entry.top] == ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    # Prompt log-probabilities: none for the first token, then each token under the model given those before it.
    assert completion.prompt_logprobs is not None and len(completion.prompt_logprobs) == len(prompt_ids)
    assert completion.prompt_logprobs[0] is None
    for position in range(1, len(prompt_ids)):
        entry = completion.prompt_logprobs[position]
        assert entry is not None and entry.chosen.token_id == prompt_ids[position]
        assert entry.chosen.logprob == pytest.approx(float(reference[position - 1, prompt_ids[position]]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0].logprob >= entry.chosen.logprob - 1e-6
    assert all(chunk.prompt_logprobs is None for chunk in completion.chunks[1:])


def test_sampled_logprobs_are_the_models_before_temperature(
    engine: GenerationEngine, model: Any, tokenizer: Any
) -> None:
    completion = run(engine, max_tokens=6, temperature=1.7, seed=5, ignore_eos=True, logprobs=0)
    prompt_ids = tokenizer.encode(PROMPT)
    reference = model_logprobs(model, prompt_ids + completion.token_ids)
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        assert entry.top == []
        assert entry.chosen.logprob == pytest.approx(float(reference[len(prompt_ids) - 1 + i, token]), abs=1e-4)


def test_prompt_logprobs_of_a_prompt_prefilled_in_chunks(causal_lm_dir: Path, model: Any, tokenizer: Any) -> None:
    chunked = make_engine(causal_lm_dir, max_num_batched_tokens="5")
    try:
        prompt = "ModelDock serves machine learning models from a folder of files"
        completion = run(chunked, prompt, max_tokens=2, temperature=0, prompt_logprobs=1)
    finally:
        chunked.stop()
    prompt_ids = tokenizer.encode(prompt)
    assert len(prompt_ids) > 10
    reference = model_logprobs(model, prompt_ids)
    got = [entry.chosen.logprob for entry in completion.prompt_logprobs[1:]]
    expected = [float(reference[p - 1, prompt_ids[p]]) for p in range(1, len(prompt_ids))]
    assert got == pytest.approx(expected, abs=1e-4)


def test_constrained_logprobs_leave_out_forbidden_tokens(engine: GenerationEngine) -> None:
    completion = run(engine, max_tokens=10, temperature=0, logprobs=20, structured_outputs={"regex": r"[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{4}", completion.text)
    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert entry.chosen.token_id == token == entry.top[0].token_id
        assert all(alt.logprob > float("-inf") for alt in entry.top)
    # The digits' probabilities renormalised over what the grammar allows sum to at most one.
    first = completion.logprobs[0]
    assert all(alt.token.isdigit() for alt in first.top)
    assert sum(2.718281828**alt.logprob for alt in first.top) <= 1.0 + 1e-4


def test_logit_bias_forces_and_bans_tokens(engine: GenerationEngine, tokenizer: Any) -> None:
    forced = tokenizer.encode(" the")[-1]
    completion = run(engine, max_tokens=5, temperature=1.0, seed=3, logit_bias={str(forced): 100})
    assert completion.token_ids == [forced] * 5
    greedy = run(engine, max_tokens=1, temperature=0, ignore_eos=True).token_ids[0]
    banned = run(engine, max_tokens=3, temperature=0, ignore_eos=True, logit_bias={str(greedy): -100}).token_ids
    assert greedy not in banned
    with pytest.raises(InvalidInput, match="logit_bias"):
        run(engine, max_tokens=1, logit_bias={"100000": 5})


def test_min_tokens_holds_back_end_tokens(engine: GenerationEngine, tokenizer: Any) -> None:
    # A +100 bias makes the end token the model's only choice; min_tokens keeps it out for the first 4 tokens.
    eager = run(engine, max_tokens=20, temperature=0, logit_bias={str(EOS): 100})
    assert eager.token_ids == [EOS] and eager.finish_reason == "stop"
    held = run(engine, max_tokens=20, temperature=0, logit_bias={str(EOS): 100}, min_tokens=4)
    assert held.finish_reason == "stop" and held.token_ids[-1] == EOS and len(held.token_ids) == 5
    assert EOS not in held.token_ids[:4]
    stop_id = tokenizer.encode(" the")[-1]
    by_stop_id = run(
        engine, max_tokens=20, temperature=0, logit_bias={str(stop_id): 100}, stop_token_ids=[stop_id], min_tokens=3
    )
    assert by_stop_id.token_ids[-1] == stop_id and len(by_stop_id.token_ids) == 4


def test_bad_specs_are_refused_and_the_engine_keeps_serving(engine: GenerationEngine) -> None:
    with pytest.raises(InvalidInput, match=r"structured_outputs\.regex: the regular expression"):
        run(engine, max_tokens=5, structured_outputs={"regex": "[a-"})
    with pytest.raises(InvalidInput, match=r"structured_outputs\.json: the JSON schema is invalid"):
        run(engine, max_tokens=5, structured_outputs={"json": {"type": "object", "required": "name"}})
    with pytest.raises(InvalidInput, match=r"structured_outputs\.grammar"):
        run(engine, max_tokens=5, structured_outputs={"grammar": "root ::= ("})
    assert run(engine, max_tokens=3, temperature=0, ignore_eos=True).finish_reason == "length"


def test_many_constrained_and_free_sequences_at_once_each_get_their_own_answer(engine: GenerationEngine) -> None:
    """16 sequences in the same steps: greedy ones, constrained or not, give what they give alone."""
    kinds: list[dict[str, Any]] = [
        {"structured_outputs": {"json": PERSON}, "max_tokens": 200},
        {"structured_outputs": {"json": POINT}, "max_tokens": 200},
        {"structured_outputs": {"regex": r"[a-z]{3,6}@[a-z]{2,4}\.com"}, "max_tokens": 40},
        {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}, "max_tokens": 10},
        {"max_tokens": 12, "ignore_eos": True},
        {"max_tokens": 12, "ignore_eos": True, "logprobs": 2},
        {"max_tokens": 12, "ignore_eos": True, "logit_bias": {"5": 8.0}},
        {"max_tokens": 12, "min_tokens": 6},
    ]
    prompts = ["Hello world", "The quick brown fox jumps over"]
    requests = [(prompt, {**kind, "temperature": 0}) for prompt in prompts for kind in kinds]

    async def together() -> list[Completion]:
        return await asyncio.gather(*(complete(engine, prompt, **kind) for prompt, kind in requests))

    batched = asyncio.run(together())
    for (prompt, kind), completion in zip(requests, batched, strict=True):
        alone = run(engine, prompt, **kind)
        assert completion.token_ids == alone.token_ids, kind
        constraint = kind.get("structured_outputs", {})
        if "json" in constraint:
            jsonschema.validate(json.loads(completion.text), constraint["json"])
        elif "regex" in constraint:
            assert re.fullmatch(constraint["regex"], completion.text)
        elif "choice" in constraint:
            assert completion.text in constraint["choice"]
        if kind.get("logprobs") is not None:
            assert [e.chosen.token_id for e in completion.logprobs] == completion.token_ids
