"""Model instances and the pool that hands batches to whichever instance is idle.

Each instance owns one backend object and one worker thread, so instances run truly concurrently for backends
that release the GIL (ONNX Runtime, PyTorch) and the event loop does not wait for model code (but see below).

A backend class that declares ``releases_gil = False`` (the Python backend: arbitrary user code) gets
``ProcessModelInstance`` instead: the backend object lives in its own worker process, so GIL-bound user code
cannot stall the server and a crash in it (segfault, ``os._exit``) fails only the batch in flight; the worker is
then restarted. That class attribute is the one rule: it is a property of the backend, not a per-model setting.

The exception: a batch of a CPU instance whose backend declares ``runs_inline_when_cheap`` (its ``execute`` only
computes) runs on the event loop itself when the instance has measured its batches at well under the cost of the
hop to its thread and back (``InlineEstimate``, ``INLINE_MAX_S``): for a model as cheap as a few vector operations
that hop is most of a request's cost, and the loop waits less for the model than it would for the hop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backends.base import Backend
from server.config import InstanceGroup, InstanceKind, ModelConfig
from server.devices import CPU, Device, gpu_count
from server.errors import BackendError, InvalidInput, ModelDockError, ModelLoadError, Unsupported
from server.protocol.datatypes import wire_datatype
from server.protocol.types import InferRequest, RequestedOutput
from server.scheduling.model_calls import ModelCaller
from server.worker_processes import (
    WorkerChannel,
    WorkerCrashed,
    WorkerTimedOut,
    error_payload,
    exit_description,
    install_channel,
    rebuilt_error,
    receive_from_worker,
    stop_process,
    worker_outputs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstancePlacement:
    name: str
    device: Device


def plan_instances(config: ModelConfig, backend_cls: type[Backend]) -> list[InstancePlacement]:
    """Expand ``instance_group`` into one placement per instance, checking GPUs exist."""
    groups = config.instance_group or [InstanceGroup()]
    visible = gpu_count()
    placements: list[InstancePlacement] = []
    for position, group in enumerate(groups):
        group_name = group.name or f"{config.name}_{position}"
        kind = group.kind
        if kind == InstanceKind.KIND_AUTO:
            kind = InstanceKind.KIND_GPU if backend_cls.supports_gpu and visible else InstanceKind.KIND_CPU
        if kind == InstanceKind.KIND_GPU:
            if not backend_cls.supports_gpu:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].kind': backend "
                    f"'{config.backend}' cannot run KIND_GPU instances"
                )
            if visible == 0:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].kind': KIND_GPU requested but no "
                    "GPU is visible to the server"
                )
            gpus = group.gpus or list(range(visible))
            missing = [g for g in gpus if g >= visible]
            if missing:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].gpus': GPU(s) {missing} do not "
                    f"exist ({visible} visible)"
                )
            for gpu in gpus:
                for i in range(group.count):
                    placements.append(InstancePlacement(f"{group_name}_{i}_gpu{gpu}", Device("gpu", gpu)))
        else:
            for i in range(group.count):
                placements.append(InstancePlacement(f"{group_name}_{i}", CPU))
    return placements


class InstanceThread(Executor):
    """A single daemon worker thread as an ``Executor``.

    A daemon, unlike ``ThreadPoolExecutor``'s threads, which the interpreter joins at exit: a thread abandoned in
    a hung backend call must not keep the server from shutting down.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("cannot run work on an instance thread that was shut down")
        future: Future[Any] = Future()
        self._jobs.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        self._jobs.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


# A batch expected to take longer than this runs on the instance thread, never on the event loop: waking the thread
# and the loop again costs tens of microseconds of CPU, so below this the hop costs more than the loop waits.
INLINE_MAX_S = 100e-6
# An inline batch that took longer than this stops inline runs at once, for a number of batches that doubles each
# time it happens: a model whose batches are sometimes slow then stalls the loop less and less often.
INLINE_STOP_S = 1e-3
_FIRST_HOLD, _LONGEST_HOLD = 16, 16384
# A batch with a deadline closer than this runs on the thread, where a hang can be abandoned when it passes.
_INLINE_MIN_TIMEOUT_S = 0.01
# Batches remembered for the estimate.
_WINDOW = 8


class InlineEstimate:
    """Whether an instance's next batch is cheap enough to run on the event loop, from the batches it ran.

    A batch's cost is predicted from each of the last few batches as its time, scaled up by how many more input
    bytes the new batch holds (never down), and the cheapest of those predictions is taken: time measured on a busy
    machine only ever comes out longer than the model's own (another thread holds the core, ONNX Runtime's threads
    wait for one), so the cheapest recent batch is the model's cost and the rest is noise. Times are the running
    thread's CPU time, which leaves out waiting for the GIL. Nothing is known before the first batch, which runs on
    the thread. A model that turns slow moves to the thread as soon as its cheapest recent batch is over
    ``INLINE_MAX_S``, and at once when one inline batch runs past ``INLINE_STOP_S``.
    """

    __slots__ = ("_recent", "_hold", "_next_hold")

    def __init__(self) -> None:
        self._recent: deque[tuple[float, int]] = deque(maxlen=_WINDOW)
        self._hold = 0
        self._next_hold = _FIRST_HOLD

    def allows(self, nbytes: int) -> bool:
        if self._hold:
            self._hold -= 1
            return False
        if not self._recent:
            return False
        for seconds, measured_bytes in self._recent:
            if seconds * max(nbytes, measured_bytes, 1) < INLINE_MAX_S * max(measured_bytes, 1):
                return True
        return False

    def record(self, seconds: float, nbytes: int, inline: bool) -> None:
        if inline and seconds > INLINE_STOP_S:
            self._recent.clear()
            self._hold = self._next_hold
            self._next_hold = min(2 * self._next_hold, _LONGEST_HOLD)
        self._recent.append((seconds, nbytes))


def _input_bytes(inputs: Mapping[str, np.ndarray]) -> int:
    total = 0
    for array in inputs.values():
        total += array.nbytes
    return total


class ModelInstance:
    """One backend object with its own worker thread.

    A thread cannot be stopped, so a batch that outlives its timeout is abandoned instead: the thread is left to
    finish (or hang) on its own, and the instance carries on with a fresh thread and, when ``rebuild`` is given, a
    fresh backend object, so the requests after it do not queue behind the hung call.
    """

    # How the instance's model calls other served models; set by the model manager once the version is loaded
    # (so warm-up runs without it). Only worker-process instances (the Python backend) use it.
    model_caller: ModelCaller | None = None
    # Calls this instance's model has in flight to its own version (see ``ModelManager.call_model``).
    self_calls: int = 0

    def __init__(
        self,
        placement: InstancePlacement,
        backend: Backend,
        rebuild: Callable[[], Backend] | None = None,
        runs_inline_when_cheap: bool = False,
    ) -> None:
        self.name = placement.name
        self.device = placement.device
        self.backend = backend
        self._rebuild = rebuild
        self._executor = self._new_executor()
        # None: every batch runs on the thread (a GPU instance waits on its device; other backends may block).
        self._inline = InlineEstimate() if runs_inline_when_cheap and not placement.device.is_gpu else None

    def _new_executor(self) -> InstanceThread:
        return InstanceThread(f"instance-{self.name}")

    async def execute(
        self, inputs: Mapping[str, np.ndarray], output_names: list[str], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; past ``timeout_s`` it fails with ``BackendError`` and the instance is replaced.

        A batch ``InlineEstimate`` finds cheap runs here, on the event loop, without a hop to the thread."""
        estimate = self._inline
        if estimate is None:
            running = asyncio.get_running_loop().run_in_executor(
                self._executor, self.backend.execute, inputs, output_names
            )
        else:
            nbytes = _input_bytes(inputs)
            if estimate.allows(nbytes) and (timeout_s is None or timeout_s >= _INLINE_MIN_TIMEOUT_S):
                start = time.thread_time()
                try:
                    return self.backend.execute(inputs, output_names)
                finally:
                    estimate.record(time.thread_time() - start, nbytes, inline=True)
            running = asyncio.get_running_loop().run_in_executor(
                self._executor, self._timed_execute, estimate, inputs, output_names, nbytes
            )
        if timeout_s is None:
            return await running
        done, _ = await asyncio.wait({running}, timeout=max(timeout_s, 0.0))
        if not done:
            self._abandon(running)
            raise BackendError(
                f"instance {self.name} did not finish the batch within {timeout_s:.3g}s; the batch is abandoned "
                "and the instance restarted"
            )
        return running.result()

    def _timed_execute(
        self, estimate: InlineEstimate, inputs: Mapping[str, np.ndarray], output_names: list[str], nbytes: int
    ) -> dict[str, np.ndarray]:
        """``backend.execute`` on the instance thread, timed by the thread's CPU time for ``estimate``."""
        start = time.thread_time()
        try:
            return self.backend.execute(inputs, output_names)
        finally:
            estimate.record(time.thread_time() - start, nbytes, inline=False)

    def _abandon(self, running: asyncio.Future[dict[str, np.ndarray]]) -> None:
        log.error("instance %s did not answer in time; replacing its thread and backend", self.name)
        # Whatever the abandoned call returns or raises later is nobody's answer.
        running.add_done_callback(lambda future: future.cancelled() or future.exception())
        hung = self._executor
        self._executor = self._new_executor()
        hung.shutdown(wait=False)
        if self._rebuild is not None:
            self._executor.submit(self._replace_backend)

    def _replace_backend(self) -> None:
        assert self._rebuild is not None
        try:
            self.backend = self._rebuild()
        except Exception:  # keep serving with the old object rather than with none
            log.exception("instance %s could not rebuild its backend; keeping the old one", self.name)
        else:
            log.info("instance %s restarted", self.name)

    def unload(self) -> None:
        self._executor.shutdown(wait=True)
        try:
            self.backend.unload()
        except Exception:  # a backend failing to clean up must not stop the others from unloading
            log.exception("instance %s failed to unload cleanly", self.name)


# Seconds a worker gets to finish ``unload`` before it is terminated.
_WORKER_STOP_TIMEOUT = 30.0


def _worker_main(
    conn: Connection, backend_path: str, config_json: str, version_dir: str, device_kind: str, device_index: int
) -> None:
    """Body of a worker process: build the backend, then run batches until told to unload or the parent goes."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = WorkerChannel(conn)
    install_channel(channel)
    try:
        module_name, _, attr = backend_path.partition(":")
        backend_cls = getattr(importlib.import_module(module_name), attr)
        config = ModelConfig.model_validate_json(config_json)
        backend = backend_cls(config, Path(version_dir), Device(device_kind, device_index))
    except BaseException as exc:
        channel.send(("error", error_payload(exc)))
        return
    channel.send(("ready", None))
    while True:
        message = channel.receive()
        if message is None:  # the server is gone
            break
        if message[0] == "unload":
            try:
                backend.unload()
            finally:
                channel.send(("ok", None))
            break
        _, inputs, output_names = message
        try:
            outputs = backend.execute(inputs, output_names)
        except Exception as exc:
            channel.send(("error", error_payload(exc)))
        else:
            channel.send(("ok", outputs))


class ProcessModelInstance(ModelInstance):
    """One backend object inside its own worker process, behind ``ModelInstance``'s interface.

    A single thread per instance talks to the worker, so the event loop only awaits, and restarting a crashed
    worker is queued on that thread: the failed batch is answered at once and the next batch waits for the
    fresh worker.
    """

    def __init__(
        self,
        placement: InstancePlacement,
        config: ModelConfig,
        version_dir: Path,
        backend_cls: type[Backend],
        load_timeout_s: float | None = None,
    ) -> None:
        self.name = placement.name
        self.device = placement.device
        self.config = config
        self._model_path = backend_cls.model_path(config, version_dir)
        self._args = (
            f"{backend_cls.__module__}:{backend_cls.__qualname__}",
            config.model_dump_json(),
            str(version_dir),
            placement.device.kind,
            placement.device.index,
        )
        self._process: Any = None
        self._conn: Connection | None = None
        # Answers to the model's calls are sent from other threads than the one sending batches.
        self._send_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"instance-{placement.name}")
        try:
            self._start(config.load_timeout_s if load_timeout_s is None else load_timeout_s)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _start(self, timeout_s: float | None = None) -> None:
        """Spawn a worker and wait until its backend is built; raises ``ModelLoadError`` if it is not.

        The wait is bounded (``parameters.load_timeout_secs`` unless ``timeout_s`` says otherwise) so user code
        stuck in import or ``initialize`` fails the load instead of holding it, and the server's start-up, forever.
        """
        timeout_s = self.config.load_timeout_s if timeout_s is None else timeout_s
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(child_conn, *self._args), name=f"modeldock-{self.name}", daemon=True
        )
        process.start()
        child_conn.close()
        try:
            deadline = time.monotonic() + max(timeout_s, 0.0)
            message = receive_from_worker(parent_conn, process, max(timeout_s, 0.0))
            while message[0] == "call":  # from initialize(): other models are not served to it yet
                self._answer_call(parent_conn, message, None)
                message = receive_from_worker(parent_conn, process, max(deadline - time.monotonic(), 0.0))
            status, payload = message
        except WorkerCrashed as exc:
            parent_conn.close()
            raise ModelLoadError(
                f"{self._model_path}: instance {self.name}: worker process died while loading ({exc}); "
                "does the model code call sys.exit() or os._exit()?"
            ) from None
        except WorkerTimedOut:
            stop_process(process)
            parent_conn.close()
            raise ModelLoadError(
                f"{self._model_path}: instance {self.name}: did not finish loading within the load timeout "
                f"({self.config.load_timeout_s}s); is its import or initialize() stuck? A model that needs longer can "
                "set parameters.load_timeout_secs in config.yaml"
            ) from None
        if status != "ready":
            process.join(_WORKER_STOP_TIMEOUT)
            parent_conn.close()
            known = rebuilt_error(payload, ModelLoadError)
            if known is not None:
                raise known
            type_name, message = payload
            raise ModelLoadError(f"{self._model_path}: instance {self.name}: {type_name}: {message}")
        self._process, self._conn = process, parent_conn

    def _restart(self) -> None:
        try:
            self._start()
        except ModelDockError as exc:
            log.error("instance %s could not be restarted: %s", self.name, exc.message)
        else:
            log.info("instance %s restarted", self.name)

    def _discard_worker(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def _execute_blocking(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: list[str],
        timeout_s: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> dict[str, np.ndarray]:
        if self._process is None:
            # The last restart failed; try again rather than stay broken forever.
            try:
                self._start()
            except ModelDockError as exc:
                raise BackendError(f"instance {self.name} is not running and cannot restart: {exc.message}") from None
        conn = self._conn
        assert conn is not None
        try:
            self._send(conn, ("execute", dict(inputs), output_names))
            while True:
                message = receive_from_worker(conn, self._process, timeout_s)
                if message[0] != "call":
                    break
                self._answer_call(conn, message, loop)
            status, payload = message
        except WorkerTimedOut:
            # Stopped rather than restarted at once: the next batch starts a fresh worker (a failed warm-up, which
            # also gets here, unloads the instance next and needs none).
            log.error("instance %s did not answer within %.3gs; stopping it", self.name, timeout_s)
            stop_process(self._process)
            self._discard_worker()
            raise BackendError(
                f"model '{self.config.name}': instance {self.name} did not answer within {timeout_s:.3g}s; "
                "it is restarted for the next batch"
            ) from None
        except (WorkerCrashed, BrokenPipeError, OSError) as exc:
            self._process.join()
            description = exit_description(self._process.exitcode)
            log.error("instance %s crashed (%s); restarting", self.name, description)
            self._discard_worker()
            self._executor.submit(self._restart)
            raise BackendError(
                f"model '{self.config.name}': instance {self.name} crashed: {description}; restarting"
            ) from exc
        return worker_outputs(status, payload, self.config.name)

    async def execute(
        self, inputs: Mapping[str, np.ndarray], output_names: list[str], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._execute_blocking, inputs, output_names, timeout_s, loop)

    def _send(self, conn: Connection, message: Any) -> None:
        with self._send_lock:
            conn.send(message)

    def _answer_call(self, conn: Connection, message: tuple[Any, ...], loop: asyncio.AbstractEventLoop | None) -> None:
        """Start a call the model made to another served model; its answer goes back to the worker when done.

        The call runs on the event loop like any client request, while this thread goes back to listening to
        the worker, which may make further calls before the first is answered.
        """
        _, call_id, model_name, model_version, inputs, output_names, parameters = message
        if loop is None or self.model_caller is None:
            error = Unsupported(
                f"model '{self.config.name}' cannot call other models while it loads (initialize, warm-up)"
            )
            self._send_quietly(conn, ("call_result", call_id, "error", error_payload(error)))
            return
        request = InferRequest(
            model_name=str(model_name),
            model_version=str(model_version),
            inputs=dict(inputs),
            outputs=[RequestedOutput(str(name)) for name in output_names],
            parameters=dict(parameters),
        )
        asyncio.run_coroutine_threadsafe(self._run_call(conn, call_id, request, self.model_caller), loop)

    async def _run_call(self, conn: Connection, call_id: int, request: InferRequest, caller: ModelCaller) -> None:
        try:
            try:
                request.input_datatypes = {name: wire_datatype(a) for name, a in request.inputs.items()}
            except TypeError as exc:
                raise InvalidInput(f"call to model '{request.model_name}': {exc}") from None
            response = await caller(request)
            result: tuple[Any, ...] = ("call_result", call_id, "ok", dict(response.outputs))
        except Exception as exc:  # the called model's error, whatever it is, belongs to the caller
            result = ("call_result", call_id, "error", error_payload(exc))
        await asyncio.to_thread(self._send_quietly, conn, result)

    def _send_quietly(self, conn: Connection, message: Any) -> None:
        """Send unless the worker is gone (crashed or stopped while the call ran): then nobody waits for it."""
        try:
            self._send(conn, message)
        except (OSError, ValueError):
            pass

    def _stop_worker(self) -> None:
        process, conn = self._process, self._conn
        if process is None or conn is None:
            return
        try:
            self._send(conn, ("unload",))
            if conn.poll(_WORKER_STOP_TIMEOUT):
                conn.recv()
        except (EOFError, OSError):
            pass
        process.join(_WORKER_STOP_TIMEOUT)
        if process.is_alive():
            log.error("instance %s did not stop in %.0fs; terminating it", self.name, _WORKER_STOP_TIMEOUT)
            stop_process(process)
        self._discard_worker()

    def unload(self) -> None:
        self._executor.shutdown(wait=True)
        self._stop_worker()


class RemoteInstances(Protocol):
    """Somewhere outside this process that model instances can run: a Ray cluster (``serve --ray``)."""

    def places(self, config: ModelConfig) -> bool:
        """Whether this model's instances go there (a model may keep its instances local)."""

    def create(
        self, config: ModelConfig, version_dir: Path, backend_cls: type[Backend], deadline: float | None
    ) -> list[ModelInstance]:
        """Start every instance of a version there; on failure release those started and raise ModelLoadError."""


# Set once at start-up by the runtime; None keeps every instance in this process.
_remote_instances: RemoteInstances | None = None


def place_instances_remotely(remote: RemoteInstances | None) -> None:
    """Send the instances of models loaded from now on to ``remote`` (None: back to this process)."""
    global _remote_instances
    _remote_instances = remote


def create_instances(
    config: ModelConfig, version_dir: Path, backend_cls: type[Backend], deadline: float | None = None
) -> list[ModelInstance]:
    """Load every instance of a version; on any failure the ones already loaded are released.

    ``deadline`` (``time.monotonic()``) bounds the whole version's load for worker-process and remote instances.
    """
    if _remote_instances is not None and _remote_instances.places(config):
        return _remote_instances.create(config, version_dir, backend_cls, deadline)
    instances: list[ModelInstance] = []
    try:
        for placement in plan_instances(config, backend_cls):
            if not backend_cls.releases_gil:
                timeout_s = None if deadline is None else deadline - time.monotonic()
                instances.append(ProcessModelInstance(placement, config, version_dir, backend_cls, timeout_s))
                continue
            rebuild = functools.partial(backend_cls, config, version_dir, placement.device)
            instances.append(ModelInstance(placement, rebuild(), rebuild, backend_cls.runs_inline_when_cheap))
    except BaseException:
        for instance in instances:
            instance.unload()
        raise
    return instances


class InstancePool:
    """Hands out idle instances; waiting callers are served in arrival order."""

    def __init__(self, instances: list[ModelInstance]) -> None:
        if not instances:
            raise ValueError("an instance pool needs at least one instance")
        self.instances = instances
        self._idle: asyncio.Queue[ModelInstance] = asyncio.Queue()
        for instance in instances:
            self._idle.put_nowait(instance)

    @property
    def idle_count(self) -> int:
        return self._idle.qsize()

    async def acquire(self) -> ModelInstance:
        return await self._idle.get()

    def try_acquire(self) -> ModelInstance | None:
        """An idle instance at once, or None: the common case needs no future and no task."""
        try:
            return self._idle.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def release(self, instance: ModelInstance) -> None:
        self._idle.put_nowait(instance)

    async def drain(self) -> None:
        """Wait until every instance is idle, i.e. no batch is executing."""
        taken = [await self._idle.get() for _ in self.instances]
        for instance in taken:
            self._idle.put_nowait(instance)

    def unload(self) -> None:
        for instance in self.instances:
            instance.unload()
