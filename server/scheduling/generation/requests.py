"""What a caller of the generation engine sends and receives, independent of the API it came through.

Triton's generate extension, the KServe infer path and the OpenAI routes all build a ``GenerateRequest`` and read
``GenerationOutput`` chunks, so sampling options mean the same thing whichever API carried them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidInput

FinishReason = Literal["stop", "length", "abort"]


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

    ``messages`` (OpenAI chat messages) are rendered with the tokenizer's chat template, generation prompt added.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class GenerationOutput:
    """A chunk of a request's completion: what is new since the previous chunk, and the totals so far.

    ``text`` may be empty while bytes of a character or a possible stop string are held back; the final chunk
    (``finished``) carries the reason and whatever text was still held.
    """

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
