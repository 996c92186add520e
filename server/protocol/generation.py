"""What a caller of the generation engine sends and receives, independent of the API it came through.

Triton's generate extension, the KServe infer path and the OpenAI routes all build a ``GenerateRequest`` and read
``GenerationOutput`` chunks, so sampling options mean the same thing whichever API carried them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidInput

FinishReason = Literal["stop", "length", "abort"]


class StructuredOutputsParams(BaseModel):
    """What the generated text must match; exactly one field is set. The names are vLLM's, so a client of vLLM's
    ``structured_outputs`` needs no translation and ``backend: vllm`` passes them on as they are.

    ``json`` is a JSON schema (a dict, or its text); ``json_object`` any JSON object; ``regex`` a regular expression;
    ``choice`` one of the given strings; ``grammar`` an EBNF grammar (GBNF, as xgrammar and llama.cpp read it);
    ``structural_tag`` an xgrammar structural tag (JSON text), which tool calls use for free text with constrained
    calls inside.

    ``disable_any_whitespace`` is an option, not a spec: a ``json`` or ``json_object`` answer then has no
    whitespace of the model's choosing outside its strings (``", "`` and ``": "`` as separators on ``transformers``
    and ``vllm``, compact JSON on ``llamacpp``). JSON allows any amount between tokens, and a weak or random-weight
    model can spend its whole ``max_tokens`` on it.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def given_specs(self) -> list[str]:
        """The spec fields set, by their wire names (``json``, not ``json_schema``); a usable request sets one."""
        return [
            name
            for name in ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
            if getattr(self, "json_schema" if name == "json" else name) not in (None, False)
        ]


class SamplingParams(BaseModel):
    """Per-request sampling; the names follow vLLM and OpenAI so clients of either need no translation."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # 0 or -1: no top-k filtering.
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    # Token id -> bias added to its logit before sampling (OpenAI's -100..100).
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # How many most likely alternatives to return with each chosen token's log-probability (None: no logprobs).
    logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    structured_outputs: StructuredOutputsParams | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def parse(cls, data: Any, source: str) -> SamplingParams:
        """Validate client data, reporting the first bad field as ``InvalidInput`` naming ``source``."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidInput(f"{source}: sampling parameters must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "sampling parameters"
            raise InvalidInput(f"{source}: field '{where}': {error['msg']}") from None


@dataclass(slots=True)
class GenerateRequest:
    """One prompt to complete. Exactly one of ``prompt``, ``prompt_token_ids`` and ``messages`` is set.

    ``messages`` (OpenAI chat messages) are rendered with the tokenizer's chat template, generation prompt added;
    ``tools`` (OpenAI function tools) and ``chat_template_kwargs`` go to the template with them, so a model sees
    its tools the way it was trained to. ``adapter`` names a LoRA adapter of an engine that serves them.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None


@dataclass(slots=True)
class Logprob:
    """One token's log-probability under the model, with the token's text as decoded on its own."""

    token_id: int
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprobs:
    """The chosen token of one position and the most likely alternatives there (most likely first)."""

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass(slots=True)
class GenerationOutput:
    """A chunk of a request's completion: what is new since the previous chunk, and the totals so far.

    ``text`` may be empty while bytes of a character or a possible stop string are held back; the final chunk
    (``finished``) carries the reason and whatever text was still held. ``logprobs`` has one entry per token of
    ``token_ids`` when the request asked for them; ``prompt_logprobs`` comes once, in the first chunk.
    """

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


async def outbox_chunks(
    outbox: asyncio.Queue[GenerationOutput | BaseException], abort: Callable[[], None]
) -> AsyncIterator[GenerationOutput]:
    """The chunks an engine thread puts in ``outbox`` for one request, up to the finished one; an exception put there
    is raised. A caller that stops reading early (a client gone, a stream closed) calls ``abort``, so the engine
    stops working for nobody."""
    finished = False
    try:
        while True:
            item = await outbox.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:
            abort()
