"""``POST /v1/completions``: one or more raw prompts (text or token ids) completed, answered whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive

from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.events import EventStreamResponse, choice_event, sse, started, while_connected
from server.frontends.openai.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from server.frontends.openai.serving_engine import ServingEngine, choice_events, request_id, usage
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


class OpenAIServingCompletion(ServingEngine):
    route = "completions"

    async def create(self, request: CompletionRequest, receive: Receive) -> Response:
        self.check_model(request.model)
        if request.logprobs is not None:
            raise OpenAIRequestError("'logprobs' is not supported by this server", "logprobs")
        if request.suffix is not None:
            raise OpenAIRequestError("'suffix' is not supported by this server", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIRequestError("'best_of' other than 'n' is not supported by this server", "best_of")
        prompts = prompt_list(request.prompt)
        if request.echo and any("prompt" not in p for p in prompts):
            raise OpenAIRequestError("'echo' is supported for text prompts only, not token ids", "echo")
        echoes = [p["prompt"] if request.echo else "" for p in prompts]
        sampling = self.sampling(request, request.max_tokens, "max_tokens")
        completion_id = request_id("cmpl")
        # A client that leaves while its request waits for a first token is let go too.
        stream = await while_connected(
            receive, started(self.generate(request.model, completion_id, prompts, sampling, request.n))
        )
        if stream is None:
            return Response(status_code=499)
        count = len(prompts) * request.n
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            events = self._events(request, completion_id, stream, count, echoes, include_usage)
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
                    finish_reason=choice.finish_reason,
                )
                for i, choice in enumerate(choices)
            ],
            usage=usage(choices, request.n),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    async def _events(
        self,
        request: CompletionRequest,
        completion_id: str,
        stream: AsyncIterator[tuple[int, GenerationOutput]],
        count: int,
        echoes: list[str],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage_info: UsageInfo | None = None) -> bytes:
            body = CompletionResponse(
                id=completion_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        # The same fields, in the same order, as ``chunk`` writes: one dict per token instead of three models.
        head = {"id": completion_id, "object": "text_completion", "created": created, "model": request.model}

        def choice_chunk(index: int, output: GenerationOutput) -> bytes:
            choice = {"index": index, "text": output.text, "logprobs": None, "finish_reason": output.finish_reason}
            return choice_event(head, choice, include_usage)

        if request.echo:
            for i in range(count):
                yield chunk([CompletionChoice(index=i, text=echoes[i // request.n])])
        usage_chunk = (lambda info: chunk([], info)) if include_usage else None
        async for event in choice_events(stream, count, request.n, choice_chunk, usage_chunk):
            yield event
