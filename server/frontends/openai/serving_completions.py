"""``POST /v1/completions``: one or more raw prompts (text or token ids) completed, answered whole or streamed, with
logprobs (of the echoed prompt too) in OpenAI's parallel lists."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive

from server.frontends.openai.answer_format import AnswerFormat, refuse_unsupported, structured_outputs
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.events import EventStreamResponse, choice_event, sse, while_connected
from server.frontends.openai.logprobs import CompletionLogprobsBuilder, prompt_logprobs
from server.frontends.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from server.frontends.openai.serving_engine import ChoiceTotals, ServingEngine, choice_events, request_id, usage
from server.protocol.generation import GenerationOutput


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[dict[str, Any]]:
    """The prompts in ``prompt`` as ``GenerateRequest`` fields: text as ``prompt``, token ids as ``prompt_token_ids``."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise OpenAIRequestError("'prompt' must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    prompts: list[dict[str, Any]] = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append({"prompt": p})
        elif not p:
            raise OpenAIRequestError("'prompt' must not contain an empty list of token ids", "prompt")
        else:
            prompts.append({"prompt_token_ids": list(p)})  # type: ignore[arg-type]
    return prompts


def merged_logprobs(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    whole = CompletionLogprobs()
    for part in parts:
        whole.tokens += part.tokens
        whole.token_logprobs += part.token_logprobs
        whole.top_logprobs += part.top_logprobs
        whole.text_offset += part.text_offset
    return whole


class OpenAIServingCompletion(ServingEngine):
    route = "completions"

    async def create(self, request: CompletionRequest, receive: Receive) -> Response:
        self.check_model(request.model)
        refuse_unsupported(request, request.REFUSED, request.KEPT_VALUES)
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIRequestError("'best_of' other than 'n' is not supported by this server", "best_of")
        prompts = prompt_list(request.prompt)
        if request.echo and any("prompt" not in p for p in prompts):
            raise OpenAIRequestError("'echo' is supported for text prompts only, not token ids", "echo")
        echoes = [p["prompt"] if request.echo else "" for p in prompts]
        constraint, source = structured_outputs(request)
        answer = AnswerFormat(structured_outputs=constraint, field=source)
        sampling = self.sampling(
            request, request.max_tokens, "max_tokens", logprobs=request.logprobs, structured=constraint
        )
        self.check_vocabulary(request.model, sampling)
        # The echoed prompt's logprobs come from the engine's prompt logprobs.
        first_tokens: list[str] = []
        if request.echo and request.logprobs is not None:
            wanted = max(request.logprobs, sampling.prompt_logprobs or 0)
            sampling = sampling.model_copy(update={"prompt_logprobs": wanted})
            first_tokens = await asyncio.to_thread(self._first_tokens, request.model, echoes)
        completion_id = request_id("cmpl")
        # A client that leaves while its request waits for a first token is let go too.
        stream = await self.start(
            receive, self.generate(request.model, completion_id, prompts, sampling, request.n), answer
        )
        if stream is None:
            return Response(status_code=499)
        count = len(prompts) * request.n
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            events = self._events(request, completion_id, stream, count, echoes, first_tokens, include_usage)
            return EventStreamResponse(events, stream)
        choices = await while_connected(receive, self.collect(stream, count))
        if choices is None:
            return Response(status_code=499)
        response = CompletionResponse(
            id=completion_id,
            model=request.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=echoes[i // request.n] + "".join(choice.text),
                    logprobs=self._logprobs(request, choice, first_tokens[i // request.n : i // request.n + 1]),
                    finish_reason=choice.finish_reason,
                    prompt_logprobs=(
                        prompt_logprobs(choice.prompt_logprobs or []) if request.prompt_logprobs is not None else None
                    ),
                )
                for i, choice in enumerate(choices)
            ],
            usage=usage(choices, request.n),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    def _first_tokens(self, model: str, prompts: list[str]) -> list[str]:
        """The text of each prompt's first token: the engine has no logprob for it, but echo lists it."""
        tokenizer, _ = self.core.language_model(model)
        firsts = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            firsts.append(tokenizer.decode(ids[:1]) if ids else "")
        return firsts

    @staticmethod
    def _logprobs(
        request: CompletionRequest, choice: ChoiceTotals, first_token: list[str]
    ) -> CompletionLogprobs | None:
        if request.logprobs is None:
            return None
        builder = CompletionLogprobsBuilder(request.logprobs)
        parts = []
        if request.echo:
            parts.append(builder.add(list(choice.prompt_logprobs or []), first_token))
        parts.append(builder.add(list(choice.logprobs)))
        return merged_logprobs(parts)

    async def _events(
        self,
        request: CompletionRequest,
        completion_id: str,
        stream: AsyncIterator[tuple[int, GenerationOutput]],
        count: int,
        echoes: list[str],
        first_tokens: list[str],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        builders = [CompletionLogprobsBuilder(request.logprobs or 0) for _ in range(count)]
        # A choice's echo goes out with its first chunk, which also brings the prompt's logprobs.
        echo_pending = [request.echo] * count

        def chunk(choices: list[CompletionChoice], usage_info: UsageInfo | None = None) -> bytes:
            body = CompletionResponse(
                id=completion_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        # The same fields, in the same order, as ``chunk`` writes: one dict per token instead of three models.
        head = {"id": completion_id, "object": "text_completion", "created": created, "model": request.model}

        def choice_chunk(index: int, output: GenerationOutput) -> bytes:
            text = output.text
            parts: list[CompletionLogprobs] = []
            prompt = index // request.n
            if echo_pending[index]:
                echo_pending[index] = False
                text = echoes[prompt] + text
                if request.logprobs is not None:
                    first = first_tokens[prompt : prompt + 1]
                    parts.append(builders[index].add(list(output.prompt_logprobs or []), first))
            if request.logprobs is not None and output.logprobs:
                parts.append(builders[index].add(list(output.logprobs)))
            logprobs = merged_logprobs(parts).model_dump() if parts else None
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason}
            if request.prompt_logprobs is not None and output.prompt_logprobs is not None:
                choice["prompt_logprobs"] = [
                    None if entry is None else {k: v.model_dump() for k, v in entry.items()}
                    for entry in prompt_logprobs(output.prompt_logprobs)
                ]
            return choice_event(head, choice, include_usage)

        usage_chunk = (lambda info: chunk([], info)) if include_usage else None
        async for event in choice_events(stream, count, request.n, choice_chunk, usage_chunk):
            yield event
