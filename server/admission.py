"""Whether the server admits new inference requests, and how many admitted ones it is still answering.

A shutdown closes admission first: readiness turns false and new requests are refused with 503 / UNAVAILABLE, so
load balancers send them to another replica, while every request already admitted (executing, or queued in a
batcher) runs to its end. ``wait_idle`` tells the shutdown when the last one has, so the models can be unloaded
without failing anyone. It sits beside ``server.core`` (the one place every inference passes through).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import ServerShuttingDown


class Admission:
    def __init__(self) -> None:
        self.open = True
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Requests admitted and not yet answered."""
        return self._active

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one request for as long as the block runs; refused at once once admission has closed."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """Hold one request (``leave`` lets it go); refused at once once admission has closed."""
        if not self.open:
            raise ServerShuttingDown("the server is shutting down and accepts no new inference requests")
        self._active += 1
        if self._active == 1:
            self._idle.clear()

    def leave(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    def close(self) -> None:
        self.open = False

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no admitted request is left; False if some still are after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True
