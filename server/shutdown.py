"""Graceful shutdown: SIGTERM or SIGINT closes admission, admitted requests finish, then the server stops.

Kubernetes (and ``docker stop``) send SIGTERM and kill the process ``terminationGracePeriodSeconds`` later. In
between, readiness is false at once, so the replica leaves its Service's endpoints, and new inference requests are
refused with 503 / UNAVAILABLE (a client retries them on another replica) while every request already admitted,
executing or queued in a batcher, is answered. ``--shutdown-timeout`` bounds that wait; a second signal cuts it
short. The front ends keep listening during the drain, so health and refusals are answered rather than refused
at the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from server.core import InferenceServer

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownSignals:
    """SIGTERM and SIGINT as events: the first asks for a graceful shutdown, a second one to stop waiting."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.forced = asyncio.Event()

    def _received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("%s again: no longer waiting for requests in flight", name)
            self.forced.set()
            return
        log.info("%s received: shutting down gracefully", name)
        self.requested.set()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in SHUTDOWN_SIGNALS:
            try:
                loop.add_signal_handler(signum, self._received, signum)
            except NotImplementedError:  # Windows' event loops: the handler runs between bytecodes instead
                signal.signal(signum, lambda s, _frame: loop.call_soon_threadsafe(self._received, s))

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in SHUTDOWN_SIGNALS:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)


async def drain(core: InferenceServer, timeout_s: float, forced: asyncio.Event) -> bool:
    """Close admission and wait for the admitted requests; False if some were still running when the wait ended."""
    core.admission.close()
    if core.admission.active:
        log.info(
            "readiness is now false; waiting up to %.1fs for %d request(s) in flight", timeout_s, core.admission.active
        )
    idle = asyncio.ensure_future(core.admission.wait_idle(timeout_s))
    cut_short = asyncio.ensure_future(forced.wait())
    try:
        await asyncio.wait({idle, cut_short}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cut_short.cancel()
    if idle.done() and idle.result():
        return True
    idle.cancel()
    log.warning("shutting down with %d request(s) still in flight", core.admission.active)
    return False
