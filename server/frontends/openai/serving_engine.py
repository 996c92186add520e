"""What chat and completions share: checking the model, turning OpenAI's fields into ``SamplingParams``, starting
one engine sequence per choice, adding up the answer and its token usage, and the event stream's course."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.types import Receive

from server.core import InferenceServer
from server.errors import InvalidInput, ModelDockError, ModelNotFound
from server.frontends.openai.answer_format import AnswerFormat, logit_bias
from server.frontends.openai.errors import OpenAIRequestError, error_info, field_error
from server.frontends.openai.events import SSE_DONE, merged, sse, started, while_connected
from server.frontends.openai.protocol import ErrorResponse, SamplingFields, UsageInfo
from server.protocol.generation import (
    GenerateRequest,
    GenerationOutput,
    SamplingParams,
    StructuredOutputsParams,
    TokenLogprobs,
)

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ChoiceTotals:
    """One choice's answer so far: its text, why it ended, the engine's token counts and any logprobs."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, output: GenerationOutput) -> None:
        self.text.append(output.text)
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens
        if output.logprobs:
            self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finished:
            self.finish_reason = output.finish_reason


def usage(choices: list[ChoiceTotals], n: int) -> UsageInfo:
    """OpenAI counts each prompt once however many choices (``n``) it was sampled for."""
    prompt = sum(choice.prompt_tokens for choice in choices[::n])
    completion = sum(choice.completion_tokens for choice in choices)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def choice_events(
    stream: AsyncIterator[tuple[int, GenerationOutput]],
    count: int,
    n: int,
    chunk: Callable[[int, GenerationOutput], bytes],
    usage_chunk: Callable[[UsageInfo], bytes] | None,
) -> AsyncIterator[bytes]:
    """The part of a chat or completion stream after its opening chunks: one chunk per output with new text,
    logprobs or an end (``chunk`` may still send nothing while a parser holds text back), an error event if the
    engine fails, the usage chunk when asked for, and ``[DONE]``."""
    totals = [ChoiceTotals() for _ in range(count)]
    try:
        async for index, output in stream:
            totals[index].add(output)
            if output.text or output.finished or output.logprobs:
                event = chunk(index, output)
                if event:
                    yield event
    except ModelDockError as exc:
        yield sse(ErrorResponse(error=error_info(exc)).model_dump_json())
    else:
        if usage_chunk is not None:
            yield usage_chunk(usage(totals, n))
    yield SSE_DONE


class ServingEngine:
    """The part of an OpenAI generation route between its request model and the core."""

    route = ""

    def __init__(self, core: InferenceServer) -> None:
        self.core = core

    def check_model(self, model: str) -> None:
        try:
            task = self.core.model_task(model)
        except ModelNotFound:
            raise ModelNotFoundError(model) from None
        if task != "generate":
            kind = "an embedding model" if task == "embed" else "not a language model"
            raise OpenAIRequestError(f"model '{model}' does not support {self.route} ({kind})", "model")

    def parameters(self, model: str) -> dict[str, str]:
        """The model configuration's ``parameters`` (``tool_call_parser``, ``reasoning_parser``) as plain strings."""
        return self.core.model_parameters(model)

    @staticmethod
    def sampling(
        request: SamplingFields,
        max_tokens: int | None,
        max_tokens_field: str,
        *,
        logprobs: int | None = None,
        logprobs_field: str = "logprobs",
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        values: dict[str, Any] = {
            name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None
        }
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        values["logit_bias"] = logit_bias(request.logit_bias)
        values["logprobs"] = logprobs
        values["prompt_logprobs"] = request.prompt_logprobs
        values["structured_outputs"] = structured
        try:
            return SamplingParams.model_validate(values)
        except ValidationError as exc:
            raise field_error(exc, {"max_tokens": max_tokens_field, "logprobs": logprobs_field}) from None

    def check_vocabulary(self, model: str, sampling: SamplingParams) -> None:
        """``logit_bias`` keys must be tokens of the model: refused by name here, before the engine sees them."""
        if not sampling.logit_bias:
            return
        tokenizer, _ = self.core.language_model(model)
        vocab = len(tokenizer)
        outside = sorted(token for token in sampling.logit_bias if token >= vocab)
        if outside:
            raise OpenAIRequestError(
                f"'logit_bias': token ids {outside[:5]} are outside the vocabulary (0..{vocab - 1})", "logit_bias"
            )

    @staticmethod
    async def start(
        receive: Receive, stream: AsyncIterator[tuple[int, GenerationOutput]], answer_format: AnswerFormat | None
    ) -> AsyncIterator[tuple[int, GenerationOutput]] | None:
        """The stream once its first output is in (None if the client left first); a grammar the engine cannot
        compile is refused under the request field it came from."""
        try:
            return await while_connected(receive, started(stream))
        except InvalidInput as exc:
            if answer_format is None:
                raise
            raise answer_format.client_error(exc) from None

    def generate(
        self, model: str, request_prefix: str, prompts: list[dict[str, Any]], sampling: SamplingParams, n: int
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """One sequence per prompt and choice, choice ``i`` of prompt ``p`` at index ``p * n + i``.

        With a seed, each choice gets its own (seed + i) so ``n`` seeded choices differ yet stay reproducible.
        """
        streams = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                choice_sampling = sampling
                if n > 1 and sampling.seed is not None:
                    choice_sampling = sampling.model_copy(update={"seed": sampling.seed + i})
                generate_request = GenerateRequest(
                    request_id=f"{request_prefix}-{p * n + i}", sampling=choice_sampling, **prompt
                )
                streams.append(self.core.generate(model, "", generate_request))
        return merged(streams)

    @staticmethod
    async def collect(stream: AsyncIterator[tuple[int, GenerationOutput]], count: int) -> list[ChoiceTotals]:
        choices = [ChoiceTotals() for _ in range(count)]
        async for index, output in stream:
            choices[index].add(output)
        return choices


class ModelNotFoundError(ModelNotFound):
    """An unknown ``model``, worded and tagged as OpenAI words it."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist")
        self.param = "model"
