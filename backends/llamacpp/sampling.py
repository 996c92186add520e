"""How a request's ``SamplingParams`` become llama.cpp's sampling, and what llama.cpp cannot honour, refused up front.

Sampling runs in llama.cpp's own sampler chain (``Llama.generate``): penalties, then the grammar, then top-k,
top-p and temperature, or the argmax when the temperature is 0. ``min_p`` and ``typical_p`` stay off, so a request
means what it means to OpenAI and vLLM. Repetition, presence and frequency penalties are llama.cpp's, which look
back over the last ``last_n_tokens_size`` tokens (64 unless config.yaml says otherwise), not the whole sequence.
``logit_bias`` and ``min_tokens`` (the end tokens banned until that many tokens are out) are applied to the logits
before the chain samples, through ``Llama.generate``'s ``logits_processor``.

Structured outputs use llama.cpp's grammars (GBNF): ``json`` goes through llama-cpp-python's JSON-schema converter,
``json_object`` is llama.cpp's JSON grammar, ``grammar`` is taken as GBNF, ``choice`` becomes a grammar of the
alternatives. ``regex`` and ``structural_tag`` have no GBNF equivalent here and are refused with a 400 naming the
field, rather than ignored. With ``disable_any_whitespace`` the JSON grammars' optional whitespace matches nothing,
so the answer is compact JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidInput
from server.protocol.generation import SamplingParams, StructuredOutputsParams

_GBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True, slots=True)
class LlamaSampling:
    """One request's sampling as llama.cpp takes it."""

    #: Keyword arguments of ``Llama.generate``.
    generate_arguments: dict[str, Any]
    #: GBNF the output must match, or None.
    grammar: str | None = None
    #: Token id -> bias added to its logit.
    logit_bias: dict[int, float] = field(default_factory=dict)


def llama_sampling(sampling: SamplingParams, logits_all: bool) -> LlamaSampling:
    """``sampling`` in llama.cpp's terms; ``InvalidInput`` naming the field llama.cpp cannot honour."""
    if (sampling.logprobs is not None or sampling.prompt_logprobs is not None) and not logits_all:
        name = "logprobs" if sampling.logprobs is not None else "prompt_logprobs"
        raise InvalidInput(
            f"field '{name}': this llamacpp model keeps no logits to take log-probabilities from; serve it with "
            "parameters.logits_all: true in its config.yaml"
        )
    arguments = {
        "temp": sampling.temperature,
        "top_k": max(sampling.top_k, 0),
        "top_p": sampling.top_p,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
    }
    grammar = None
    if sampling.structured_outputs is not None:
        grammar = structured_output_grammar(sampling.structured_outputs)
    return LlamaSampling(arguments, grammar, dict(sampling.logit_bias))


def structured_output_grammar(structured: StructuredOutputsParams) -> str:
    """The GBNF grammar for a request's ``structured_outputs`` (exactly one field set)."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    chosen = structured.given_specs()
    if len(chosen) != 1:
        raise InvalidInput(f"field 'structured_outputs': set exactly one of its fields, got {chosen or 'none'}")
    if structured.json_schema is not None:
        schema = structured.json_schema
        try:
            text = schema if isinstance(schema, str) else json.dumps(schema)
            grammar = json_schema_to_gbnf(text)
        except Exception as exc:  # the converter raises plain errors for schemas it cannot express
            raise InvalidInput(f"field 'structured_outputs.json': cannot be turned into a grammar: {exc}") from None
        return _without_free_whitespace(grammar, "space") if structured.disable_any_whitespace else grammar
    if structured.json_object:
        return _without_free_whitespace(JSON_GBNF, "ws") if structured.disable_any_whitespace else JSON_GBNF
    if structured.grammar is not None:
        if not structured.grammar.strip():
            raise InvalidInput("field 'structured_outputs.grammar': the grammar is empty")
        return structured.grammar
    if structured.choice is not None:
        if not structured.choice or any(not c for c in structured.choice):
            raise InvalidInput("field 'structured_outputs.choice': give one or more non-empty strings")
        return "root ::= " + " | ".join(_gbnf_literal(c) for c in structured.choice)
    field_name = "regex" if structured.regex is not None else "structural_tag"
    raise InvalidInput(
        f"field 'structured_outputs.{field_name}': backend llamacpp takes GBNF grammars only "
        "(structured_outputs.json, json_object, grammar or choice)"
    )


def _without_free_whitespace(grammar: str, rule: str) -> str:
    """``grammar`` with its optional-whitespace ``rule`` (``space`` in llama-cpp-python's schema grammars, ``ws`` in
    its JSON grammar) matching nothing: the JSON comes out compact, with no whitespace outside its strings."""
    compact, found = re.subn(rf"^{rule}\s*::=.*$", f'{rule} ::= ""', grammar, count=1, flags=re.MULTILINE)
    return compact if found else grammar


def _gbnf_literal(text: str) -> str:
    return '"' + "".join(_GBNF_ESCAPES.get(c, c) for c in text) + '"'
