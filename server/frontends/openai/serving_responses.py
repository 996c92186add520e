"""``POST /v1/responses``: OpenAI's Responses API (what the Agents SDK speaks by default) over the same engine and
answer parsing as chat, answered whole or as its typed stream of events through ``response.completed``.

Input items (messages, earlier function calls and their outputs) become chat messages for the model's template;
the answer comes back as output items: the thinking as a ``reasoning`` item, the text as a ``message``, each call
as a ``function_call``. Responses are kept (``store``, OpenAI's default) in a bounded store in this process's
memory, the newest ``STORE_SIZE``: ``previous_response_id`` continues from one of them and
``GET /v1/responses/{id}`` returns it; one forgotten (older, or from before a restart) is answered with a 400
naming ``previous_response_id``, as is any id this server did not give.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.types import Receive

from server.errors import ModelDockError
from server.frontends.openai.answer_format import (
    AnswerDelta,
    AnswerFormat,
    ParsedAnswer,
    answer_format,
    refuse_unsupported,
)
from server.frontends.openai.errors import OpenAIRequestError, error_info, field_error
from server.frontends.openai.events import EventStreamResponse, while_connected
from server.frontends.openai.protocol import (
    ChatTool,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseIncompleteDetails,
    ResponseOutputItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningText,
    ResponsesFunctionTool,
    ResponsesReasoning,
    ResponsesRequest,
    ResponsesResponse,
    ResponsesUsage,
    SamplingFields,
)
from server.frontends.openai.serving_engine import ChoiceTotals, ServingEngine
from server.protocol.generation import GenerationOutput, StructuredOutputsParams

STORE_SIZE = 1024
_TEXT_PARTS = ("input_text", "output_text", "text")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class StoredResponse:
    """A kept response: its body, and the conversation a follow-up continues (its input and its output, as chat
    messages; ``instructions`` are not carried over, as OpenAI does not carry them)."""

    response: ResponsesResponse
    messages: list[dict[str, Any]]


class ResponseStore:
    """The newest ``capacity`` stored responses, oldest forgotten first."""

    def __init__(self, capacity: int = STORE_SIZE) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self._items[stored.response.id] = stored
        self._items.move_to_end(stored.response.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


# -- input items to chat messages -----------------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIRequestError(f"'{where}' must be text or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise OpenAIRequestError(
                f"'{where}.{j}': only text content parts are supported, got type '{kind}'", f"{where}.{j}.type"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages; consecutive function calls become one assistant message's ``tool_calls``."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise OpenAIRequestError(
                    f"'input.{i}.role' must be user, assistant, system or developer", f"input.{i}.role"
                )
            messages.append({"role": role, "content": _text_of(item.get("content", ""), f"input.{i}.content")})
        elif kind == "function_call":
            arguments = item.get("arguments", "")
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
            except ValueError:
                raise OpenAIRequestError(f"'input.{i}.arguments' is not valid JSON", f"input.{i}.arguments") from None
            call = {
                "id": item.get("call_id", ""),
                "type": "function",
                "function": {"name": item.get("name", ""), "arguments": parsed},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and ("tool_calls" in last or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            content = output if isinstance(output, str) else _text_of(output, f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""), "content": content})
        elif kind == "reasoning":
            continue  # earlier thinking: chat templates leave it out of the prompt
        else:
            raise OpenAIRequestError(f"'input.{i}.type' '{kind}' is not supported by this server", f"input.{i}.type")
    return messages


def output_messages(output: list[ResponseOutputItem]) -> list[dict[str, Any]]:
    """A response's output as the chat messages a follow-up sends back to the template."""
    items: list[dict[str, Any]] = []
    for item in output:
        if isinstance(item, ResponseOutputMessage):
            items.append({"type": "message", "role": "assistant", "content": "".join(p.text for p in item.content)})
        elif isinstance(item, ResponseFunctionCall):
            items.append(
                {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            )
    return input_messages(items)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[ChatTool] | None:
    if not tools:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise OpenAIRequestError(
                f"'tools.{i}.type' '{tool.get('type')}' is not supported by this server: only function tools",
                f"tools.{i}.type",
            )
        try:
            flat = ResponsesFunctionTool.model_validate(tool)
        except ValidationError as exc:
            error = field_error(exc)
            raise OpenAIRequestError(error.message, f"tools.{i}.{error.param}") from None
        converted.append(
            ChatTool(
                function=FunctionDefinition(
                    name=flat.name, description=flat.description, parameters=flat.parameters, strict=flat.strict
                )
            )
        )
    return converted


def text_constraint(request: ResponsesRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    form = request.text.format if request.text is not None else None
    if form is None or form.type == "text":
        return None, None
    if form.type == "json_object":
        return StructuredOutputsParams(json_object=True), "text.format"
    if not form.json_schema:
        raise OpenAIRequestError("'text.format.schema' is missing or empty", "text.format.schema")
    return StructuredOutputsParams.model_validate({"json": form.json_schema}), "text.format.schema"


# -- output items, whole and streamed --------------------------------------------------------------------------------
def output_items(parsed: ParsedAnswer) -> list[ResponseOutputItem]:
    items: list[ResponseOutputItem] = []
    if parsed.reasoning:
        items.append(ResponseReasoningItem(id=_item_id("rs"), content=[ResponseReasoningText(text=parsed.reasoning)]))
    if parsed.content or not parsed.tool_calls:
        items.append(ResponseOutputMessage(id=_item_id("msg"), content=[ResponseOutputText(text=parsed.content or "")]))
    items.extend(
        ResponseFunctionCall(id=_item_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments)
        for call in parsed.tool_calls
    )
    return items


@dataclass
class _OpenItem:
    kind: str
    item_id: str
    index: int
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class ResponseEvents:
    """The typed events of one streamed response, numbered in order, built from the answer's deltas."""

    def __init__(self, base: ResponsesResponse) -> None:
        self.base = base
        self.sequence = 0
        self.output: list[ResponseOutputItem] = []
        self.open: _OpenItem | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def start(self) -> list[bytes]:
        snapshot = self.base.model_dump(mode="json")
        return [
            self.event("response.created", response=snapshot),
            self.event("response.in_progress", response=snapshot),
        ]

    def add(self, delta: AnswerDelta) -> list[bytes]:
        events: list[bytes] = []
        if delta.reasoning:
            events += self._ensure("reasoning")
            assert self.open is not None
            self.open.text.append(delta.reasoning)
            events.append(
                self.event(
                    "response.reasoning_text.delta",
                    item_id=self.open.item_id,
                    output_index=self.open.index,
                    content_index=0,
                    delta=delta.reasoning,
                )
            )
        if delta.content:
            events += self._ensure("message")
            assert self.open is not None
            self.open.text.append(delta.content)
            events.append(
                self.event(
                    "response.output_text.delta",
                    item_id=self.open.item_id,
                    output_index=self.open.index,
                    content_index=0,
                    delta=delta.content,
                    logprobs=[],
                )
            )
        for piece in delta.tool_calls:
            if piece.id is not None:
                events += self._close()
                self.open = _OpenItem("function_call", _item_id("fc"), len(self.output), call_id=piece.id)
                self.open.name = piece.name or ""
                item = ResponseFunctionCall(
                    id=self.open.item_id, call_id=piece.id, name=self.open.name, arguments="", status="in_progress"
                )
                events.append(
                    self.event("response.output_item.added", output_index=self.open.index, item=item.model_dump())
                )
            if piece.arguments and self.open is not None:
                self.open.text.append(piece.arguments)
                events.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self.open.item_id,
                        output_index=self.open.index,
                        delta=piece.arguments,
                    )
                )
        return events

    def _ensure(self, kind: str) -> list[bytes]:
        if self.open is not None and self.open.kind == kind:
            return []
        events = self._close()
        self.open = _OpenItem(kind, _item_id("msg" if kind == "message" else "rs"), len(self.output))
        if kind == "message":
            item: Any = ResponseOutputMessage(id=self.open.item_id, content=[], status="in_progress")
        else:
            item = ResponseReasoningItem(id=self.open.item_id, status="in_progress")
        events.append(self.event("response.output_item.added", output_index=self.open.index, item=item.model_dump()))
        if kind == "message":
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.open.item_id,
                    output_index=self.open.index,
                    content_index=0,
                    part=ResponseOutputText(text="").model_dump(),
                )
            )
        return events

    def _close(self) -> list[bytes]:
        current, self.open = self.open, None
        if current is None:
            return []
        text = "".join(current.text)
        where = {"item_id": current.item_id, "output_index": current.index}
        events: list[bytes] = []
        item: ResponseOutputItem
        if current.kind == "message":
            part = ResponseOutputText(text=text)
            events.append(self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            events.append(self.event("response.content_part.done", **where, content_index=0, part=part.model_dump()))
            item = ResponseOutputMessage(id=current.item_id, content=[part])
        elif current.kind == "reasoning":
            events.append(self.event("response.reasoning_text.done", **where, content_index=0, text=text))
            item = ResponseReasoningItem(id=current.item_id, content=[ResponseReasoningText(text=text)])
        else:
            events.append(
                self.event("response.function_call_arguments.done", **where, name=current.name, arguments=text)
            )
            item = ResponseFunctionCall(id=current.item_id, call_id=current.call_id, name=current.name, arguments=text)
        self.output.append(item)
        events.append(self.event("response.output_item.done", output_index=current.index, item=item.model_dump()))
        return events

    def finish(self) -> list[bytes]:
        events = self._close()
        if not self.output:
            events += self._ensure("message")
            events += self._close()
        return events


# -- the route ------------------------------------------------------------------------------------------------------
class OpenAIServingResponses(ServingEngine):
    route = "responses"

    def __init__(self, core: Any, store: ResponseStore | None = None) -> None:
        super().__init__(core)
        self.store = store or ResponseStore()

    def retrieve(self, response_id: str) -> ResponsesResponse:
        stored = self.store.get(response_id)
        if stored is None:
            raise ResponseNotFound(response_id)
        return stored.response

    def delete(self, response_id: str) -> None:
        if not self.store.delete(response_id):
            raise ResponseNotFound(response_id)

    async def create(self, request: ResponsesRequest, receive: Receive) -> Response:
        self.check_model(request.model)
        refuse_unsupported(request, request.REFUSED, request.KEPT_VALUES)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id)
            if previous is None:
                raise OpenAIRequestError(
                    f"Previous response with id '{request.previous_response_id}' not found: responses are kept in "
                    f"this server's memory, the newest {self.store.capacity}, and only with store true",
                    "previous_response_id",
                )
            history = previous.messages
        conversation = history + input_messages(request.input)
        messages = (
            [{"role": "system", "content": request.instructions}] if request.instructions else []
        ) + conversation
        tool_choice: str | NamedToolChoice | None = None
        if isinstance(request.tool_choice, str):
            tool_choice = request.tool_choice
        elif request.tool_choice is not None:
            tool_choice = NamedToolChoice(function=NamedFunction(name=request.tool_choice.name))
        answer = answer_format(
            self.parameters(request.model),
            request.model,
            chat_tools(request.tools),
            tool_choice,
            request.parallel_tool_calls,
            text_constraint(request),
        )
        sampling_fields = SamplingFields(temperature=request.temperature, top_p=request.top_p)
        sampling = self.sampling(
            sampling_fields, request.max_output_tokens, "max_output_tokens", structured=answer.structured_outputs
        )
        kwargs: dict[str, Any] = {}
        if request.reasoning is not None and request.reasoning.effort is not None:
            kwargs["reasoning_effort"] = request.reasoning.effort
        response_id = _item_id("resp")
        prompt = {"messages": messages, "tools": answer.template_tools, "chat_template_kwargs": kwargs}
        stream = await self.start(receive, self.generate(request.model, response_id, [prompt], sampling, 1), answer)
        if stream is None:
            return Response(status_code=499)
        base = self._base(request, response_id)
        if request.stream:
            events = self._events(request, answer, base, conversation, stream)
            return EventStreamResponse(events, stream)
        choices = await while_connected(receive, self.collect(stream, 1))
        if choices is None:
            return Response(status_code=499)
        response = self._finished(base, output_items(answer.parse("".join(choices[0].text))), choices[0])
        self._keep(request, response, conversation)
        return Response(response.model_dump_json(), media_type="application/json")

    @staticmethod
    def _base(request: ResponsesRequest, response_id: str) -> ResponsesResponse:
        text_format = request.text.format if request.text is not None and request.text.format is not None else None
        return ResponsesResponse(
            id=response_id,
            status="in_progress",
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=request.model,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id,
            reasoning=request.reasoning or ResponsesReasoning(),
            store=request.store,
            temperature=request.temperature,
            text={
                "format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}
            },
            tool_choice=(
                request.tool_choice.model_dump()
                if request.tool_choice is not None and not isinstance(request.tool_choice, str)
                else (request.tool_choice or "auto")
            ),
            tools=request.tools or [],
            top_p=request.top_p,
            user=request.user,
            metadata=request.metadata or {},
        )

    @staticmethod
    def _finished(base: ResponsesResponse, output: list[ResponseOutputItem], totals: ChoiceTotals) -> ResponsesResponse:
        cut = totals.finish_reason == "length"
        return base.model_copy(
            update={
                "status": "incomplete" if cut else "completed",
                "incomplete_details": ResponseIncompleteDetails(reason="max_output_tokens") if cut else None,
                "output": output,
                "usage": ResponsesUsage(
                    input_tokens=totals.prompt_tokens,
                    output_tokens=totals.completion_tokens,
                    total_tokens=totals.prompt_tokens + totals.completion_tokens,
                ),
            }
        )

    def _keep(self, request: ResponsesRequest, response: ResponsesResponse, conversation: list[dict[str, Any]]) -> None:
        if request.store:
            self.store.put(StoredResponse(response, conversation + output_messages(response.output)))

    async def _events(
        self,
        request: ResponsesRequest,
        answer: AnswerFormat,
        base: ResponsesResponse,
        conversation: list[dict[str, Any]],
        stream: AsyncIterator[tuple[int, GenerationOutput]],
    ) -> AsyncIterator[bytes]:
        events = ResponseEvents(base)
        streamer = answer.streamer()
        totals = ChoiceTotals()
        for event in events.start():
            yield event
        try:
            async for _, output in stream:
                totals.add(output)
                if output.text:
                    for event in events.add(streamer.feed(output.text)):
                        yield event
                if output.finished:
                    for event in events.add(streamer.finish()):
                        yield event
        except ModelDockError as exc:
            info = error_info(exc)
            yield events.event("error", code=info.code, message=info.message, param=info.param)
            return
        for event in events.finish():
            yield event
        response = self._finished(base, events.output, totals)
        self._keep(request, response, conversation)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        yield events.event(kind, response=response.model_dump(mode="json"))


class ResponseNotFound(ModelDockError):
    """A response id this server does not hold (never given, deleted, or forgotten from the bounded store)."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found")
        self.param = "response_id"
