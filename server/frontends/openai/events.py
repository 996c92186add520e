"""Streams of generation outputs: several merged into one, and sent to the client as Server-Sent Events.

A client that goes away must free its sequences at once, not when the engine next produces a token for nobody, so
the response watches the connection and, on disconnect, cancels the task that is streaming and closes the
generators, which aborts their sequences in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import orjson
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from server.protocol.generation import GenerationOutput

T = TypeVar("T")
_DONE = object()


async def merged(streams: Sequence[AsyncIterator[GenerationOutput]]) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """The outputs of all ``streams`` as they come, each tagged with its stream's index.

    One stream (the usual case) is read directly; several are read by one task each. Closing the merged stream
    closes every stream in it; the first error raised by any stream is raised here.
    """
    if len(streams) == 1:
        only = streams[0]
        try:
            async for output in only:
                yield 0, output
        finally:
            await only.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def started(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """``stream`` once its first item is in, so errors such as an unknown model or a too-long prompt are raised
    here, while they can still be answered with an error status instead of a broken event stream."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return stream
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise

    async def replay() -> AsyncIterator[T]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    return replay()


async def while_connected(receive: Receive, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None when the client disconnected first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        watcher.cancel()
        task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def choice_event(head: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> bytes:
    """A streamed chunk of one choice, from plain dicts: per-token chunks skip model validation, which costs more
    than the token. ``head`` and ``choice`` hold the response model's fields in its order, so the bytes match what
    the model writes; ``"usage": null`` is there only when the client asked for usage at the end, as OpenAI does."""
    body = {**head, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return b"data: " + orjson.dumps(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of encoded events; the iterator is closed however it ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], source: AsyncIterator[object]) -> None:
        """``source`` is what ``events`` reads from; it is closed too, even when ``events`` never started."""
        # No ``body``, so no Content-Length: the length of a stream is not known up front.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            # The request body has been read, so the next message that matters is the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.events.aclose()  # type: ignore[attr-defined]
            await self.source.aclose()  # type: ignore[attr-defined]
            if disconnected:
                task.uncancel()
