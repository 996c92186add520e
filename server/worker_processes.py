"""What a worker process and the server share: errors sent over the pipe, how a stuck worker is stopped, and
the worker's end of the pipe through which its model calls other served models.

Both the instances that run a backend in a worker process and the Python backend's own worker use these, so an
error raised in a child reaches the client exactly as it would from a thread.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import logging
import queue
import signal
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

from server import errors
from server.errors import ModelDockError

log = logging.getLogger(__name__)

# Installed libraries that put a folder of their own on sys.path for the length of their import.
PATH_EDITING_IMPORTS = ("cv2",)


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


def exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"exit code {exitcode} (signal {signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"exit code {exitcode}"


class WorkerCrashed(Exception):
    """The worker process ended while the parent was waiting for it."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(exit_description(exitcode))
        self.exitcode = exitcode


class WorkerTimedOut(Exception):
    """The worker process did not answer in the time it was given."""


def receive_from_worker(conn: Connection, process: Any, timeout_s: float | None = None) -> tuple[Any, ...]:
    """The worker's next message; ``WorkerCrashed`` if it exits first, ``WorkerTimedOut`` after ``timeout_s``."""
    if not wait([conn, process.sentinel], timeout_s):
        raise WorkerTimedOut
    try:
        if conn.poll():
            return conn.recv()  # type: ignore[no-any-return]
    except (EOFError, OSError):
        pass
    process.join()
    raise WorkerCrashed(process.exitcode)


class WorkerChannel:
    """A worker process's end of its pipe to the server, shared by the worker's loop and its model's calls.

    The worker's loop receives batches to run; while one runs, the model may call other served models (Triton's
    BLS): a ``call`` message goes to the server, which runs it through the called model's own scheduler and
    answers with a ``call_result``. A reader thread takes every message off the pipe, so answers to calls reach
    the (possibly several, concurrent) callers while the loop itself is busy inside ``execute``.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._calls: dict[int, Future[tuple[str, Any]]] = {}
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="worker-channel", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the server is gone
                break
            if message[0] == "call_result":
                _, call_id, status, payload = message
                with self._calls_lock:
                    future = self._calls.pop(call_id, None)
                if future is not None:
                    future.set_result((status, payload))
            else:
                self._inbox.put(message)
        self._inbox.put(None)
        with self._calls_lock:
            calls, self._calls = self._calls, {}
        for future in calls.values():
            future.set_result(("error", ("ModelNotReady", "the server closed the worker's connection")))

    def receive(self) -> Any:
        """The next message for the worker's loop; None once the server is gone."""
        return self._inbox.get()

    def send(self, message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)

    def call(
        self,
        model_name: str,
        model_version: str,
        inputs: dict[str, Any],
        output_names: list[str],
        parameters: dict[str, Any],
    ) -> Future[tuple[str, Any]]:
        """Send a request to a served model; the future gives ("ok", outputs) or ("error", ``error_payload``)."""
        future: Future[tuple[str, Any]] = Future()
        call_id = next(self._call_ids)
        with self._calls_lock:
            self._calls[call_id] = future
        self.send(("call", call_id, model_name, model_version, inputs, output_names, parameters))
        return future


_channel: WorkerChannel | None = None


def install_channel(channel: WorkerChannel) -> None:
    """Make ``channel`` the one this worker process's model code calls other models through."""
    global _channel
    _channel = channel


def current_channel() -> WorkerChannel | None:
    """This worker process's channel to the server; None outside a worker process (no model calls there)."""
    return _channel


def worker_outputs(status: str, payload: Any, model_name: str) -> Any:
    """A worker's answer to a batch: its outputs when ``status`` is ok, else the error it reported, raised here as
    the server error it was (or a ``BackendError`` naming the model for anything else)."""
    if status == "ok":
        return payload
    known = rebuilt_error(payload, ModelDockError)
    if known is not None:
        raise known
    type_name, message = payload
    raise errors.BackendError(f"model '{model_name}': {type_name}: {message}")


def import_path_editing_libraries() -> None:
    """Import the installed ``PATH_EDITING_IMPORTS`` once, in the calling thread, before models load concurrently.

    multiprocessing's spawn gives a child the parent's sys.path as it is at the moment the child starts. OpenCV's
    ``cv2`` puts site-packages/cv2 on sys.path while it imports, and in that folder ``cv2/typing`` shadows the
    standard library's ``typing``. A worker process started by one loading thread (a Python-backend model, an
    engine process) while another thread imports cv2 (mistral_common's tokenizers, which vLLM uses, import it on
    first use) dies at its first ``import typing``, and its model fails to load. Once imported here, every later
    import finds cv2 in sys.modules and leaves sys.path alone.
    """
    for name in PATH_EDITING_IMPORTS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken optional library is the models' problem, reported when they load
            log.warning("could not import %s ahead of loading models: %s: %s", name, type(exc).__name__, exc)
