"""``POST /v1/chat/completions``: messages rendered with the model's chat template, answered whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive

from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.events import EventStreamResponse, choice_event, sse, started, while_connected
from server.frontends.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    UsageInfo,
)
from server.frontends.openai.serving_engine import ServingEngine, choice_events, request_id, usage
from server.protocol.generation import GenerationOutput


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: ``content`` a string, text parts joined by newlines."""
    rendered: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIRequestError(
                        f"messages[{i}]: only text content parts are supported, got type '{part.get('type')}'",
                        f"messages.{i}.content",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


class OpenAIServingChat(ServingEngine):
    route = "chat completions"

    async def create(self, request: ChatCompletionRequest, receive: Receive) -> Response:
        self.check_model(request.model)
        if request.tools:
            raise OpenAIRequestError("'tools' are not supported by this server", "tools")
        if request.logprobs or request.top_logprobs:
            raise OpenAIRequestError("'logprobs' is not supported by this server", "logprobs")
        max_tokens, max_field = request.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_field = request.max_tokens, "max_tokens"
        sampling = self.sampling(request, max_tokens, max_field)
        chat_id = request_id("chatcmpl")
        prompt = {"messages": message_dicts(request.messages)}
        # A client that leaves while its request waits for a first token is let go too.
        stream = await while_connected(
            receive, started(self.generate(request.model, chat_id, [prompt], sampling, request.n))
        )
        if stream is None:
            return Response(status_code=499)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return EventStreamResponse(self._events(request, chat_id, stream, include_usage), stream)
        choices = await while_connected(receive, self.collect(stream, request.n))
        if choices is None:
            return Response(status_code=499)
        response = ChatCompletionResponse(
            id=chat_id,
            model=request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content="".join(choice.text)),
                    finish_reason=choice.finish_reason,
                )
                for i, choice in enumerate(choices)
            ],
            usage=usage(choices, request.n),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    async def _events(
        self,
        request: ChatCompletionRequest,
        chat_id: str,
        stream: AsyncIterator[tuple[int, GenerationOutput]],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage_info: UsageInfo | None = None) -> bytes:
            body = ChatCompletionChunk(
                id=chat_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            # OpenAI sends "usage": null on every chunk only when the client asked for usage at the end.
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        # The same fields, in the same order, as ``chunk`` writes: one dict per token instead of four models.
        head = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": request.model}

        def choice_chunk(index: int, output: GenerationOutput) -> bytes:
            delta = {"role": None, "content": output.text or None}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": output.finish_reason}
            return choice_event(head, choice, include_usage)

        for i in range(request.n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        usage_chunk = (lambda info: chunk([], info)) if include_usage else None
        async for event in choice_events(stream, request.n, request.n, choice_chunk, usage_chunk):
            yield event
