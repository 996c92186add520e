"""``POST /v1/chat/completions``: messages rendered with the model's chat template (tools included), answered
whole or streamed, with tool calls, reasoning and logprobs in OpenAI's shapes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive

from server.frontends.openai.answer_format import (
    AnswerDelta,
    AnswerFormat,
    answer_format,
    refuse_unsupported,
    structured_outputs,
)
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.events import EventStreamResponse, choice_event, sse, while_connected
from server.frontends.openai.logprobs import chat_logprobs, prompt_logprobs
from server.frontends.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    ToolCallFunction,
    ToolCallMessage,
    UsageInfo,
)
from server.frontends.openai.serving_engine import ChoiceTotals, ServingEngine, choice_events, request_id, usage
from server.frontends.openai.tool_parsers import ToolCallDelta
from server.protocol.generation import GenerationOutput


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: ``content`` a string (text parts joined by newlines), an assistant's
    tool calls with their arguments as objects (templates write them with ``tojson``, as vLLM passes them)."""
    rendered: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list) and any(part.get("type") == "image_url" for part in content):
            # Images stay OpenAI content parts, for the engines of models that read them (vision_language.py).
            content = image_content_parts(content, i)
        elif isinstance(content, list):
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
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments, f"messages.{i}.tool_calls.{j}"),
                    },
                }
                for j, call in enumerate(message.tool_calls)
            ]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        rendered.append(entry)
    return rendered


def image_content_parts(content: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """A message's text and ``image_url`` parts, each checked for the field it needs."""
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if kind == "image_url" and isinstance(url, str):
            parts.append({"type": "image_url", "image_url": {"url": url}})
            continue
        raise OpenAIRequestError(
            f"messages[{i}].content[{j}]: expected a text part or an image_url part with a 'url'",
            f"messages.{i}.content.{j}",
        )
    return parts


def _arguments(text: str, where: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        raise OpenAIRequestError(
            f"'{where}.function.arguments' is not valid JSON", f"{where}.function.arguments"
        ) from None


def template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
    """``chat_template_kwargs`` with the request's template options that have fields of their own."""
    kwargs = dict(request.chat_template_kwargs or {})
    if request.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", request.reasoning_effort)
    if request.add_generation_prompt is not None:
        kwargs["add_generation_prompt"] = request.add_generation_prompt
    if request.continue_final_message is not None:
        kwargs["continue_final_message"] = request.continue_final_message
    return kwargs


def answer_message(answer_format: AnswerFormat, choice: ChoiceTotals) -> ChatResponseMessage:
    parsed = answer_format.parse("".join(choice.text))
    calls = [
        ToolCallMessage(id=call.id, function=ToolCallFunction(name=call.name, arguments=call.arguments))
        for call in parsed.tool_calls
    ]
    return ChatResponseMessage(content=parsed.content, reasoning_content=parsed.reasoning, tool_calls=calls or None)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` for an answer that ended by itself in calls; a cut-off answer stays ``length``."""
    return "tool_calls" if called and reason == "stop" else reason


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A streamed call piece as ``ToolCallDeltaMessage`` writes it: id, type and name in the first piece only."""
    function: dict[str, Any] = {"arguments": delta.arguments}
    if delta.name is not None:
        function = {"name": delta.name, **function}
    piece: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        piece["id"] = delta.id
        piece["type"] = "function"
    piece["function"] = function
    return piece


class OpenAIServingChat(ServingEngine):
    route = "chat completions"

    async def create(self, request: ChatCompletionRequest, receive: Receive) -> Response:
        self.check_model(request.model)
        refuse_unsupported(request, request.REFUSED, request.KEPT_VALUES)
        if request.top_logprobs and not request.logprobs:
            raise OpenAIRequestError("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
        answer = answer_format(
            self.parameters(request.model),
            request.model,
            request.tools,
            request.tool_choice,
            request.parallel_tool_calls,
            structured_outputs(request),
        )
        max_tokens, max_field = request.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_field = request.max_tokens, "max_tokens"
        top = request.top_logprobs or 0
        sampling = self.sampling(
            request,
            max_tokens,
            max_field,
            logprobs=top if request.logprobs else None,
            logprobs_field="top_logprobs",
            structured=answer.structured_outputs,
        )
        self.check_vocabulary(request.model, sampling)
        chat_id = request_id("chatcmpl")
        prompt = {
            "messages": message_dicts(request.messages),
            "tools": answer.template_tools,
            "chat_template_kwargs": template_kwargs(request),
        }
        # A client that leaves while its request waits for a first token is let go too.
        stream = await self.start(receive, self.generate(request.model, chat_id, [prompt], sampling, request.n), answer)
        if stream is None:
            return Response(status_code=499)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return EventStreamResponse(self._events(request, answer, chat_id, stream, include_usage), stream)
        choices = await while_connected(receive, self.collect(stream, request.n))
        if choices is None:
            return Response(status_code=499)
        messages = [answer_message(answer, choice) for choice in choices]
        response = ChatCompletionResponse(
            id=chat_id,
            model=request.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=chat_logprobs(choice.logprobs, top) if request.logprobs else None,
                    finish_reason=finish_reason(choice.finish_reason, bool(message.tool_calls)),
                )
                for i, (choice, message) in enumerate(zip(choices, messages, strict=True))
            ],
            usage=usage(choices, request.n),
            prompt_logprobs=(
                prompt_logprobs(choices[0].prompt_logprobs or []) if request.prompt_logprobs is not None else None
            ),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    async def _events(
        self,
        request: ChatCompletionRequest,
        answer: AnswerFormat,
        chat_id: str,
        stream: AsyncIterator[tuple[int, GenerationOutput]],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        top = request.top_logprobs or 0
        streamers = [answer.streamer() for _ in range(request.n)]

        def chunk(choices: list[ChatChunkChoice], usage_info: UsageInfo | None = None) -> bytes:
            body = ChatCompletionChunk(
                id=chat_id, created=created, model=request.model, choices=choices, usage=usage_info
            )
            # OpenAI sends "usage": null on every chunk only when the client asked for usage at the end.
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        # The same fields, in the same order, as ``chunk`` writes: one dict per token instead of four models.
        head = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": request.model}

        def choice_chunk(index: int, output: GenerationOutput) -> bytes:
            streamer = streamers[index]
            parsed = streamer.feed(output.text) if output.text else AnswerDelta()
            if output.finished:
                rest = streamer.finish()
                parsed.reasoning += rest.reasoning
                parsed.content += rest.content
                parsed.tool_calls += rest.tool_calls
            logprobs = None
            if request.logprobs and output.logprobs:
                logprobs = chat_logprobs(output.logprobs, top).model_dump()
            if not (parsed.content or parsed.reasoning or parsed.tool_calls or logprobs or output.finished):
                return b""  # text a parser holds back until it knows what it is
            delta: dict[str, Any] = {"role": None, "content": parsed.content or None}
            if parsed.reasoning:
                delta["reasoning_content"] = parsed.reasoning
            if parsed.tool_calls:
                delta["tool_calls"] = [tool_call_delta(piece) for piece in parsed.tool_calls]
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason(output.finish_reason, streamer.called),
            }
            return choice_event(head, choice, include_usage)

        for i in range(request.n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        usage_chunk = (lambda info: chunk([], info)) if include_usage else None
        async for event in choice_events(stream, request.n, request.n, choice_chunk, usage_chunk):
            yield event
