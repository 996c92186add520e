"""What a worker process and the server share: errors sent over the pipe, and how a stuck worker is stopped.

Both the instances that run a backend in a worker process and the Python backend's own worker use these, so an
error raised in a child reaches the client exactly as it would from a thread.
"""

from __future__ import annotations

from typing import Any

from server import errors
from server.errors import ModelDockError


def error_payload(exc: BaseException) -> tuple[str, str]:
    """An exception as (type name, message): user exception classes need not be picklable or importable."""
    if isinstance(exc, ModelDockError):
        return type(exc).__name__, exc.message
    return type(exc).__name__, str(exc)


def rebuilt_error(payload: tuple[str, str], kind: type[ModelDockError]) -> ModelDockError | None:
    """The server error a worker process reported as ``error_payload``, if it is of ``kind``; None otherwise."""
    type_name, message = payload
    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, kind):
        return cls(message)
    return None


def stop_process(process: Any) -> None:
    """Stop a worker that does not answer: SIGTERM, then SIGKILL if it ignores that."""
    process.terminate()
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
