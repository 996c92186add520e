"""Grammar compilation and matching, against the tiny GPT-2 tokenizer: what each kind of spec allows, the errors a
bad spec gives (naming its field), the size limits, the cache, and the batched mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
xgr = pytest.importorskip("xgrammar")

from server.errors import InvalidInput  # noqa: E402
from server.protocol.generation import StructuredOutputsParams  # noqa: E402
from server.structured_output.compiler import (  # noqa: E402
    MAX_CHOICES,
    MAX_SPEC_CHARS,
    InvalidGrammar,
    StructuredOutputCompiler,
    compact_json_grammar,
)
from server.structured_output.matcher import GrammarMasks  # noqa: E402

EOS = 0


@pytest.fixture(scope="module")
def tokenizer(causal_lm_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(causal_lm_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> StructuredOutputCompiler:
    return StructuredOutputCompiler(tokenizer, len(tokenizer))


def spec(**fields) -> StructuredOutputsParams:
    return StructuredOutputsParams.model_validate(fields)


def accepts(compiler: StructuredOutputCompiler, tokenizer, params: StructuredOutputsParams, text: str) -> bool:
    """Whether the grammar takes ``text`` whole and may end after it (the end token is allowed there)."""
    matcher = compiler.matcher(compiler.compile(params).result(timeout=30), {EOS})
    for token in tokenizer.encode(text):
        if not matcher.accept(token):
            return False
    return matcher.accept(EOS) and matcher.terminated


def test_json_schema_allows_only_matching_documents(compiler, tokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params = spec(json=schema)
    assert accepts(compiler, tokenizer, params, '{"name": "Ann", "age": 3}')
    assert not accepts(compiler, tokenizer, params, '{"name": "Ann"}')
    assert not accepts(compiler, tokenizer, params, '{"name": "Annabel", "age": 3}')
    assert not accepts(compiler, tokenizer, params, '{"name": "A\x07", "age": 3}')  # no raw control characters
    assert accepts(compiler, tokenizer, spec(json=json.dumps(schema)), '{"name":"B","age":-1}')


def test_json_object_any_object_but_nothing_else(compiler, tokenizer) -> None:
    params = spec(json_object=True)
    assert accepts(compiler, tokenizer, params, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(compiler, tokenizer, params, "[1, 2]")
    assert not accepts(compiler, tokenizer, params, '"text"')


def test_disable_any_whitespace_leaves_json_only_its_separators_spaces(compiler, tokenizer) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "tags": {"type": "array"}},
        "required": ["name", "tags"],
    }
    for loose, tight in (
        (spec(json=schema), spec(json=schema, disable_any_whitespace=True)),
        (spec(json_object=True), spec(json_object=True, disable_any_whitespace=True)),
    ):
        assert accepts(compiler, tokenizer, tight, '{"name": "A b", "tags": [1, "x"]}')  # strings keep theirs
        for spaced in (
            '{ "name": "A b", "tags": [1, "x"]}',
            '{"name":  "A b", "tags": [1, "x"]}',
            '{"name": "A b",\n"tags": [1, "x"]}',
            '{"name": "A b", "tags": [1,\t"x"]}',
            '{"name": "A b", "tags": [1, "x"] }',
        ):
            assert accepts(compiler, tokenizer, loose, spaced), spaced
            assert not accepts(compiler, tokenizer, tight, spaced), spaced
    # Other specs spell out their own whitespace: the flag leaves them as they are (the same compiled grammar).
    regex = compiler.compile(spec(regex="a b"))
    assert compiler.compile(spec(regex="a b", disable_any_whitespace=True)) is regex


def test_compact_json_grammar_is_the_compiled_ones_text(compiler, tokenizer) -> None:
    """What an engine with its own structured outputs (vLLM) is sent: the grammar compiled here, for JSON only."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = compact_json_grammar(spec(json=schema, disable_any_whitespace=True))
    assert grammar is not None
    assert accepts(compiler, tokenizer, spec(grammar=grammar), '{"a": 12}')
    assert not accepts(compiler, tokenizer, spec(grammar=grammar), '{ "a": 12}')
    assert not accepts(compiler, tokenizer, spec(grammar=grammar), '{"a": "12"}')
    assert compact_json_grammar(spec(json=schema)) is None
    assert compact_json_grammar(spec(regex="a b", disable_any_whitespace=True)) is None
    assert compact_json_grammar(spec(json_object=True, disable_any_whitespace=True)) is not None
    with pytest.raises(InvalidInput, match="structured_outputs.json"):
        compact_json_grammar(spec(json={"type": "objectx"}, disable_any_whitespace=True))


def test_regex_choice_and_grammar(compiler, tokenizer) -> None:
    assert accepts(compiler, tokenizer, spec(regex=r"\d{3}-[a-z]+"), "123-abc")
    assert not accepts(compiler, tokenizer, spec(regex=r"\d{3}-[a-z]+"), "12-abc")
    choices = ["yes", 'no "way"\n', "ünï"]
    for choice in choices:
        assert accepts(compiler, tokenizer, spec(choice=choices), choice)
    assert not accepts(compiler, tokenizer, spec(choice=choices), "ye")
    grammar = 'root ::= "(" digits ("," digits)* ")"\ndigits ::= [0-9]+'
    assert accepts(compiler, tokenizer, spec(grammar=grammar), "(1,22,333)")
    assert not accepts(compiler, tokenizer, spec(grammar=grammar), "(1,)")


def test_structural_tag_in_vllms_form(compiler, tokenizer) -> None:
    tag = {
        "structures": [
            {"begin": "<f>", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}, "end": "</f>"}
        ],
        "triggers": ["<f>"],
    }
    params = spec(structural_tag=json.dumps(tag))
    assert accepts(compiler, tokenizer, params, 'free text <f>{"x": 1}</f> more')
    assert not accepts(compiler, tokenizer, params, 'free text <f>{"x": "one"}</f>')


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"json": {"type": "objectx"}}, "json", "JSON schema is invalid"),
        ({"json": {"type": "object", "properties": {"a": {"minLength": "three"}}}}, "json", "JSON schema is invalid"),
        ({"json": "{not json"}, "json", "not valid JSON"),
        ({"json": "[1, 2]"}, "json", "must be a JSON object"),
        ({"regex": "a(b"}, "regex", "regular expression cannot be compiled"),
        ({"grammar": "root ::= missing_rule"}, "grammar", "EBNF grammar cannot be compiled"),
        ({"choice": []}, "choice", "is empty"),
        ({"structural_tag": '{"structures": [{"begin": "<f>"}], "triggers": ["<f>"]}'}, "structural_tag", "tag"),
        ({"regex": "a" * (MAX_SPEC_CHARS + 1)}, "regex", "too large"),
        ({"choice": ["x"] * (MAX_CHOICES + 1)}, "choice", "too large"),
    ],
)
def test_bad_specs_are_invalid_input_naming_their_field(compiler, fields, field, words) -> None:
    with pytest.raises(InvalidGrammar) as caught:
        compiler.compile(spec(**fields)).result(timeout=30)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"structured_outputs.{field}: ")
    assert words in caught.value.message
    assert isinstance(caught.value, InvalidInput)  # a 400, never a 500


def test_exactly_one_field(compiler) -> None:
    with pytest.raises(InvalidInput, match="exactly one"):
        compiler.compile(spec(regex="a", choice=["b"]))
    with pytest.raises(InvalidInput, match="exactly one"):
        compiler.compile(spec())


def test_cache_reuses_grammars_by_spec_and_forgets_failures(tokenizer) -> None:
    compiler = StructuredOutputCompiler(tokenizer, len(tokenizer), cache_size=2)
    first = compiler.compile(spec(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    # The same schema as text, spaced otherwise: one grammar.
    same = compiler.compile(spec(json='{"type":"object",  "properties":{"a":{"type":"integer"}}}'))
    assert same is first
    bad = compiler.compile(spec(regex="a(b"))
    with pytest.raises(InvalidGrammar):
        bad.result(timeout=30)
    assert compiler.compile(spec(regex="a(b")) is not bad
    compiler.compile(spec(regex="x")).result(timeout=30)
    compiler.compile(spec(regex="y")).result(timeout=30)
    assert compiler.cached <= 2
    assert compiler.compile(spec(json={"type": "object", "properties": {"a": {"type": "integer"}}})) is not first


def test_masks_are_applied_to_the_constrained_rows_only(compiler, tokenizer) -> None:
    vocab = len(tokenizer)
    digits = compiler.matcher(compiler.compile(spec(regex=r"[0-9]+")).result(timeout=30), {EOS})
    choice = compiler.matcher(compiler.compile(spec(choice=["yes"])).result(timeout=30), {EOS})
    logits = torch.zeros(3, vocab)
    GrammarMasks(vocab).apply(logits, [0, 2], [digits, choice])
    allowed = [set(torch.nonzero(row == 0).flatten().tolist()) for row in logits]
    assert allowed[1] == set(range(vocab))
    assert allowed[0] and all(tokenizer.decode([t]).isdigit() for t in allowed[0])
    assert allowed[2] and all("yes".startswith(tokenizer.decode([t])) for t in allowed[2])
    assert EOS not in allowed[0] | allowed[2]  # neither grammar may end before its first character
