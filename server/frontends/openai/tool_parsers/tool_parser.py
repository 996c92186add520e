"""What every tool-call format shares: the calls found in an answer, and the streaming of them as text arrives.

A format says where its calls begin (``find_start``), how much of the text before that might still be the start of
one (``held_back``), and which calls the text from there holds so far (``partial_calls``): each with its name once
the name is whole, and the raw text of its arguments so far. Raw text grows only at its end, so the streamer sends
each call's arguments as the new characters of that text, and the fragments joined are exactly the arguments of
the whole answer: what a client joins from the stream is what ``extract_tool_calls`` returns.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

_WHITESPACE = " \t\r\n"


def new_call_id() -> str:
    """An id in OpenAI's form (``call_`` and 24 characters), unique for every call of every answer."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    """A whole call: the function's name and its arguments as JSON text (an object), as OpenAI sends them."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass(slots=True)
class ExtractedToolCalls:
    """An answer split into the text the model said (None when it said nothing besides its calls) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass(slots=True)
class PartialCall:
    """A call as far as the text goes: the name once whole, the raw arguments so far, and whether it has ended."""

    name: str | None
    arguments: str
    complete: bool


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of call ``index``: its ``id`` and ``name`` in the first piece, argument text after."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class StreamedDelta:
    """What one chunk of model text adds: content for the client, and pieces of tool calls."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


# -- JSON read as far as it goes ------------------------------------------------------------------------------------
def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """The index after the JSON string opening at ``i``; None when the text ends inside it."""
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at ``i``; None when the text ends before the value does.

    Only the nesting is followed, not the grammar inside: a malformed value is found malformed when it is parsed.
    """
    if i >= len(text):
        return None
    char = text[i]
    if char == '"':
        return string_end(text, i)
    if char in "{[":
        depth = 0
        while i < len(text):
            char = text[i]
            if char == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    # A number or a literal ends at the next delimiter; at the end of the text it may still be growing.
    while i < len(text) and text[i] not in ",}]" + _WHITESPACE:
        i += 1
    return i if i < len(text) else None


def read_call_object(
    text: str, start: int, name_keys: tuple[str, ...], argument_keys: tuple[str, ...]
) -> tuple[PartialCall, int | None]:
    """The call in the JSON object opening at ``text[start]`` (``{"name": ..., "arguments": {...}}``) as far as the
    text goes, and the index after the object once it is whole.

    Arguments sent as a JSON string holding an object (some models do) are decoded, and only once whole, so what is
    returned still only grows. A whole object without arguments has ``{}``: a function that takes none.
    """
    name: str | None = None
    arguments = ""
    arguments_whole = False
    i = start + 1
    while True:
        i = skip_whitespace(text, i)
        if i >= len(text):
            return PartialCall(name, arguments, False), None
        if text[i] == "}":
            return PartialCall(name, arguments if arguments_whole else arguments or "{}", name is not None), i + 1
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return PartialCall(name, arguments, False), None
        key_end = string_end(text, i)
        if key_end is None:
            return PartialCall(name, arguments, False), None
        key = json.loads(text[i:key_end])
        i = skip_whitespace(text, key_end)
        if i >= len(text) or text[i] != ":":
            return PartialCall(name, arguments, False), None
        i = skip_whitespace(text, i + 1)
        end = value_end(text, i)
        if key in argument_keys and not arguments_whole:
            if i < len(text) and text[i] == '"':
                if end is not None:
                    arguments = _decoded_arguments(text[i:end])
            else:
                arguments = text[i:end] if end is not None else text[i:]
            arguments_whole = end is not None
        elif key in name_keys and end is not None and text[i] == '"':
            name = json.loads(text[i:end])
        if end is None:
            return PartialCall(name, arguments, False), None
        i = end


def _decoded_arguments(encoded: str) -> str:
    try:
        return str(json.loads(encoded))
    except ValueError:
        return encoded


def object_calls(
    region: str, name_keys: tuple[str, ...] = ("name",), argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> list[PartialCall]:
    """Every call object in ``region``, whatever separates them (``[``, ``,``, ``;``, whitespace, tags)."""
    calls: list[PartialCall] = []
    i = 0
    while True:
        i = region.find("{", i)
        if i < 0:
            return calls
        call, end = read_call_object(region, i, name_keys, argument_keys)
        calls.append(call)
        if end is None:
            return calls
        i = end


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def partial_marker_suffix(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of one of ``markers``."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# -- formats --------------------------------------------------------------------------------------------------------
class ToolParser(ABC):
    """One model family's way of writing tool calls."""

    #: The name a model's ``parameters.tool_call_parser`` uses for this format.
    name: str = ""

    @abstractmethod
    def find_start(self, text: str) -> tuple[int, int] | None:
        """Where the content ends and the calls' text begins (they differ by a marker such as ``<tool_call>``)."""

    @abstractmethod
    def held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` (no call found yet) may still turn out to start a call."""

    @abstractmethod
    def partial_calls(self, region: str) -> list[PartialCall]:
        """The calls in the text after ``find_start``, as far as it goes."""

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """A whole answer split into content and calls. Text that starts like calls but does not parse as calls
        with names and JSON-object arguments is all content, as vLLM's parsers treat it: a malformed call is the
        model's text, not something to invent arguments for."""
        found = self.find_start(text)
        if found is None:
            return ExtractedToolCalls(text, [])
        content_end, region_start = found
        calls = self.partial_calls(text[region_start:])
        if not calls or not all(c.complete and c.name and is_json_object(c.arguments) for c in calls):
            return ExtractedToolCalls(text, [])
        content = text[:content_end]
        return ExtractedToolCalls(
            content if content.strip() else None, [ToolCall(c.name or "", c.arguments) for c in calls]
        )

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self)


@dataclass(slots=True)
class _SentCall:
    id: str
    arguments_sent: int = 0


class ToolCallStreamer:
    """One choice's text, fed chunk by chunk, turned into OpenAI's deltas: content, then calls by index."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.region_start: int | None = None
        self.sent: list[_SentCall] = []

    @property
    def called(self) -> bool:
        """Whether any call was sent (the choice then ends with ``finish_reason: "tool_calls"``)."""
        return bool(self.sent)

    def feed(self, delta: str) -> StreamedDelta:
        self.text += delta
        out = StreamedDelta()
        if self.region_start is None:
            found = self.parser.find_start(self.text)
            if found is None:
                safe = len(self.text) - self.parser.held_back(self.text)
                out.content = self.text[self.content_sent : safe]
                self.content_sent = max(self.content_sent, safe)
                return out
            content_end, self.region_start = found
            # Only blanks before the calls are no content, as in ``extract_tool_calls``.
            if self.content_sent or self.text[:content_end].strip():
                out.content = self.text[self.content_sent : content_end]
            self.content_sent = content_end
        for index, call in enumerate(self.parser.partial_calls(self.text[self.region_start :])):
            if call.name is None:
                break  # calls are sent in order: a later one waits for this one's name
            if index == len(self.sent):
                self.sent.append(_SentCall(new_call_id()))
                out.tool_calls.append(ToolCallDelta(index, self.sent[index].id, call.name))
            state = self.sent[index]
            fragment = call.arguments[state.arguments_sent :]
            if fragment:
                state.arguments_sent = len(call.arguments)
                if out.tool_calls and out.tool_calls[-1].index == index:
                    out.tool_calls[-1].arguments += fragment
                else:
                    out.tool_calls.append(ToolCallDelta(index, arguments=fragment))
        return out

    def finish(self) -> StreamedDelta:
        """The text still held when the choice ends: a marker's start that never became one is content after all,
        and so is text that looked like calls but never named one."""
        if self.region_start is None or not self.sent:
            rest = self.text[self.content_sent :]
            self.content_sent = len(self.text)
            return StreamedDelta(content=rest)
        return StreamedDelta()
