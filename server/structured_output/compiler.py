"""Compiling a request's ``StructuredOutputsParams`` into an xgrammar grammar, once per tokenizer and per spec.

Compilation walks the whole vocabulary against the grammar (milliseconds for a small schema, far longer for a
large one or a large vocabulary), so it never runs on the engine thread, which would stall every running sequence,
nor on the event loop: it runs in a small thread pool, and the request waits on the future before it joins the
engine. Grammars are cached by what was asked for (an LRU of bounded size), so a client that sends the same schema
with every request compiles it once. A failed compilation is not cached: the next request gets the same error.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jsonschema
import xgrammar as xgr

from server.errors import InvalidInput
from server.protocol.generation import StructuredOutputsParams
from server.structured_output.matcher import SequenceGrammar

# Longest spec accepted, in characters (a JSON schema as JSON text, a regex, a grammar, a structural tag, or all
# choices together). Compile time grows with the grammar, and the pool is shared by every request of the model:
# a 1 MB schema would hold a compile thread for seconds, so a client gets a clear 400 instead.
MAX_SPEC_CHARS = 65_536
MAX_CHOICES = 1_024
# Compiled grammars kept per tokenizer; a compiled JSON schema for a 150k-token vocabulary is a few hundred KB.
DEFAULT_CACHE_SIZE = 256
# Threads compiling grammars, for all models of the process: enough that one slow schema does not hold up the
# others, few enough that compiling never takes the cores the engines step on.
COMPILE_THREADS = 2

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
# xgrammar's JSON strings with a length bound (``maxLength``, ``minLength``) take any character but a quote, a
# backslash and a line break, so control characters (U+0000-U+001F) could be written raw, which JSON forbids and
# strict parsers (Python's json, pydantic's) refuse; its unbounded strings exclude them. The grammar's text is
# compiled with the same exclusion in both.
_LOOSE_STRING_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\r\n]"
# The specs whose grammar is JSON, where whitespace between tokens is the model's choice unless the request says not.
_JSON_SPECS = ("json", "json_object")
# What xgrammar raises for a spec it cannot compile.
_XGRAMMAR_ERRORS = (RuntimeError, ValueError, TypeError, KeyError)
# xgrammar prefixes its errors with a timestamp and its C++ source location, which tell a client nothing.
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _compile_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=COMPILE_THREADS, thread_name_prefix="grammar-compile")
        return _pool


class InvalidGrammar(InvalidInput):
    """A structured-output spec that cannot be compiled, naming the field of ``StructuredOutputsParams`` it came
    from (``field``: ``json``, ``regex``, ...) and what kind of spec it is, so a front end that received it under
    another name (OpenAI's ``response_format.json_schema``) can say so in its own terms."""

    def __init__(self, field: str, kind: str, problem: str) -> None:
        super().__init__(f"structured_outputs.{field}: {kind} {problem}")
        self.field = field
        self.kind = kind
        self.problem = problem


# Field of StructuredOutputsParams -> what the spec is, in error messages.
_KINDS = {
    "json": "the JSON schema",
    "json_object": "json_object",
    "regex": "the regular expression",
    "choice": "the choice",
    "grammar": "the EBNF grammar",
    "structural_tag": "the structural tag",
}


def _spec(params: StructuredOutputsParams) -> tuple[str, str]:
    """``(field, canonical text)``: which field is set and its spec as text (the cache key), after the checks
    that need no compiling: exactly one field, sizes, JSON that parses, a schema valid under its metaschema."""
    given = params.given_specs()
    if len(given) != 1:
        raise InvalidInput(
            f"structured_outputs: set exactly one of json, json_object, regex, choice, grammar, "
            f"structural_tag (got {', '.join(given) or 'none'})"
        )
    field = given[0]
    name = "json_schema" if field == "json" else field
    kind = _KINDS[field]
    if field == "json_object":
        return field, ""
    if field == "choice":
        choices = params.choice or []
        if not choices:
            raise InvalidGrammar(field, kind, "is empty: give at least one string")
        if len(choices) > MAX_CHOICES or sum(len(c) for c in choices) > MAX_SPEC_CHARS:
            raise InvalidGrammar(
                field, kind, f"is too large (at most {MAX_CHOICES} strings, {MAX_SPEC_CHARS} characters in all)"
            )
        return field, json.dumps(choices, ensure_ascii=False)
    value = getattr(params, name)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidGrammar(field, kind, f"is too large: {len(text)} characters, at most {MAX_SPEC_CHARS}")
    if not text.strip():
        raise InvalidGrammar(field, kind, "is empty")
    if field in ("json", "structural_tag"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise InvalidGrammar(field, kind, f"is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidGrammar(field, kind, "must be a JSON object")
        if field == "json":
            try:
                jsonschema.validators.validator_for(parsed).check_schema(parsed)
            except jsonschema.SchemaError as exc:
                where = "/".join(str(p) for p in exc.path)
                raise InvalidGrammar(
                    field, kind, f"is invalid{' at ' + where if where else ''}: {exc.message}"
                ) from None
            # Whitespace aside, the text as given: the order of properties is the order they are generated in.
            text = json.dumps(parsed, ensure_ascii=False)
    return field, text


def _json_grammar(schema: str, strict_mode: bool, any_whitespace: bool) -> str:
    """The EBNF grammar of a JSON schema, as xgrammar converts it (vLLM's settings: any whitespace unless the
    request disables it, and then ``", "`` and ``": "`` as separators), with no raw control character in any
    string."""
    grammar = str(xgr.Grammar.from_json_schema(schema, strict_mode=strict_mode, any_whitespace=any_whitespace))
    return grammar.replace(_LOOSE_STRING_CHARACTER, _JSON_STRING_CHARACTER)


def _json_spec_grammar(field: str, text: str, any_whitespace: bool) -> str:
    """The EBNF grammar of a ``json`` spec (its schema's text) or of ``json_object``: any JSON object (OpenAI's
    json_object), not any JSON value, so the schema {"type": "object"} without xgrammar's strict mode, which would
    forbid every property."""
    if field == "json":
        return _json_grammar(text, True, any_whitespace)
    return _json_grammar('{"type": "object"}', False, any_whitespace)


def _any_whitespace(params: StructuredOutputsParams, field: str) -> bool:
    """Whether the grammar lets JSON hold any whitespace; the other specs spell out their own."""
    return not (params.disable_any_whitespace and field in _JSON_SPECS)


def compact_json_grammar(params: StructuredOutputsParams) -> str | None:
    """The EBNF grammar of a ``json`` or ``json_object`` spec asked with ``disable_any_whitespace``; None for any
    other spec, or when whitespace is allowed.

    For an engine whose own structured outputs take whitespace from a server-wide setting and ignore the request's
    flag (vLLM): it is given this grammar instead, the same one this module compiles for ``backend: transformers``.
    A bad spec raises ``InvalidInput`` naming its field.
    """
    if not params.disable_any_whitespace:
        return None
    field, text = _spec(params)
    if _any_whitespace(params, field):
        return None
    try:
        return _json_spec_grammar(field, text, any_whitespace=False)
    except _XGRAMMAR_ERRORS as exc:
        raise _invalid(field, exc) from None


def _invalid(field: str, exc: Exception) -> InvalidGrammar:
    """xgrammar's error about a spec, without its timestamp and source location."""
    detail = _XGRAMMAR_LOCATION.sub("", str(exc).strip()).splitlines()
    return InvalidGrammar(field, _KINDS[field], f"cannot be compiled: {detail[0] if detail else exc}")


def _choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (EBNF string literals escape as JSON strings do)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class StructuredOutputCompiler:
    """Compiles specs for one tokenizer (one per model engine), keeping the most recently used grammars.

    The tokenizer's xgrammar description (every token's bytes) is built on first use, in the pool, since for a
    large vocabulary it takes a second and most models never see a constrained request. ``vocab_size`` is the
    width of the model's logits rows, which may exceed the tokenizer's (padded embeddings); the extra ids are
    never allowed.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, bool], Future[xgr.CompiledGrammar]] = OrderedDict()

    def compile(self, params: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of ``params``, as a future (done at once when cached).

        Checks that need no compiling (one field set, sizes, JSON syntax, the schema's metaschema) raise
        ``InvalidInput`` here; a spec the grammar engine refuses fails the future with ``InvalidGrammar``.
        """
        field, text = _spec(params)
        key = (field, text, _any_whitespace(params, field))
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = _compile_pool().submit(self._compile, *key)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda done: self._forget_failure(key, done))
        return future

    def _forget_failure(self, key: tuple[str, str, bool], future: Future[xgr.CompiledGrammar]) -> None:
        if future.exception() is not None:
            with self._lock:
                if self._cache.get(key) is future:
                    del self._cache[key]

    @property
    def cached(self) -> int:
        """Grammars held (compiled or compiling)."""
        return len(self._cache)

    def _grammar_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                # Caching is ours (keyed by spec, bounded by count); one thread each, the pool gives parallelism.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def _compile(self, field: str, text: str, any_whitespace: bool) -> xgr.CompiledGrammar:
        compiler = self._grammar_compiler()
        try:
            if field in _JSON_SPECS:
                return compiler.compile_grammar(_json_spec_grammar(field, text, any_whitespace))
            if field == "regex":
                return compiler.compile_regex(text)
            if field == "choice":
                return compiler.compile_grammar(_choice_grammar(json.loads(text)))
            if field == "grammar":
                return compiler.compile_grammar(text)
            return self._structural_tag(compiler, text)
        except _XGRAMMAR_ERRORS as exc:
            raise _invalid(field, exc) from None

    @staticmethod
    def _structural_tag(compiler: xgr.GrammarCompiler, text: str) -> xgr.CompiledGrammar:
        """vLLM's form (``structures`` of begin/schema/end, and ``triggers``) or xgrammar's own format."""
        spec = json.loads(text)
        if "structures" in spec:
            tags = [
                xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                for s in spec["structures"]
            ]
            return compiler.compile_structural_tag(tags, list(spec.get("triggers", [])))
        return compiler.compile_structural_tag(text)

    def matcher(self, grammar: xgr.CompiledGrammar, end_token_ids: frozenset[int] | set[int]) -> SequenceGrammar:
        """A matcher for one sequence; ``end_token_ids`` are the tokens that end it (allowed once the grammar may
        end)."""
        return SequenceGrammar(grammar, end_token_ids)
