"""A generating model in a process of its own: its Python does not compete with the server's for one GIL, and a crash
or a CUDA error in it ends the worker, not the server.

The engine thread and the server's event loop share a GIL. A model whose steps are mostly Python (kernel launches
on a GPU, a small model on the CPU) holds it for most of every step, and the event loop that streams the tokens
falls behind the model. With the model in a worker process, the engine thread only sends each step's batch down a
pipe and waits for the tokens with the GIL released; the worker runs the forward pass, the CUDA graphs and the
argmax under a GIL of its own. ``parameters.model_process``: ``auto`` (the default: a worker on a GPU, in-process
on the CPU), ``true`` or ``false``.

If the worker dies, the step in progress fails (its sequences end with the error, as for any failed step) and the
next step starts a fresh worker with a new, empty KV cache.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from backends.base import StepBatch, StepResult
from server.config import ModelConfig
from server.devices import Device
from server.errors import BackendError, ModelDockError, ModelLoadError
from server.worker_processes import (
    WorkerCrashed,
    WorkerTimedOut,
    error_payload,
    rebuilt_error,
    receive_from_worker,
    stop_process,
    worker_outputs,
)

_STOP_TIMEOUT_S = 30.0


def _worker_main(conn: Connection, config_json: str, version_dir: str, device_kind: str, device_index: int) -> None:
    """Body of the worker: load the model, report what the engine needs to know of it, then run steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the server decides
    from backends.transformers.backend import TransformersBackend

    try:
        config = ModelConfig.model_validate_json(config_json)
        config.parameters["model_process"] = "false"
        backend = TransformersBackend(config, Path(version_dir), Device(device_kind, device_index))
        info = {
            "max_model_len": backend.max_model_len,
            "eos_token_ids": backend.eos_token_ids,
            "kv_bytes_per_token": backend.kv_bytes_per_token(),
            "vocab_size": backend.vocab_size,
        }
    except BaseException as exc:
        conn.send(("error", error_payload(exc)))
        return
    conn.send(("ready", info))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        try:
            if message[0] == "forward":
                result = backend.forward(message[1])
                logits = None if result.logits is None else result.logits.numpy()
                prompt = [t.numpy() for t in result.prompt_logits]
                conn.send(("ok", (result.argmax, logits, prompt, result.verify_argmax)))
            elif message[0] == "allocate":
                backend.allocate_kv_cache(*message[1:])
                conn.send(("ok", None))
            elif message[0] == "unload":
                backend.unload()
                conn.send(("ok", None))
                break
        except Exception as exc:
            conn.send(("error", error_payload(exc)))


class ModelWorker:
    """The server's end: starts the worker, passes steps to it, and starts a new one if it died."""

    def __init__(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self._name = config.name
        self._args = (config.model_dump_json(), str(version_dir), device.kind, device.index)
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Connection | None = None
        self._allocation: tuple[int, int, int] | None = None
        self.info: dict[str, Any] = self._start(config.load_timeout_s)

    def _start(self, timeout_s: float | None) -> dict[str, Any]:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(child, *self._args), name=f"model-{self._name}", daemon=True
        )
        process.start()
        child.close()
        try:
            kind, payload = self._receive(parent, process, timeout_s)
        except BaseException:
            stop_process(process)
            parent.close()
            raise
        if kind == "error":
            stop_process(process)
            parent.close()
            raise rebuilt_error(payload, ModelDockError) or ModelLoadError(
                f"model '{self._name}': the model process failed to load it: {payload[0]}: {payload[1]}"
            )
        self._process, self._conn = process, parent
        return payload  # type: ignore[no-any-return]

    def _receive(self, conn: Connection, process: Any, timeout_s: float | None = None) -> tuple[str, Any]:
        try:
            return receive_from_worker(conn, process, timeout_s)  # type: ignore[return-value]
        except WorkerCrashed as exc:
            raise BackendError(
                f"model '{self._name}': the model process ended ({exc}); the next request starts a new one"
            ) from None
        except WorkerTimedOut:
            raise ModelLoadError(f"model '{self._name}': the model process did not load within {timeout_s}s") from None

    def call(self, *message: Any) -> Any:
        with self._lock:  # one step at a time: each message is answered before the next is sent
            if self._process is None:  # discarded when a step failed, which ended that step's sequences
                self._restart()
            elif not self._process.is_alive():  # died between steps, unnoticed
                self._restart()
                if message[0] == "forward":
                    # The running sequences' keys and values died with the old worker: fail them, as a failed
                    # step does; the sequences of the next step start from their prompts in the new cache.
                    raise BackendError(f"model '{self._name}': the model process had ended; a new one was started")
            assert self._conn is not None
            try:
                self._conn.send(message)
                kind, payload = self._receive(self._conn, self._process)
            except (BackendError, OSError) as exc:
                self._discard()
                raise exc if isinstance(exc, BackendError) else BackendError(str(exc)) from None
        return worker_outputs(kind, payload, self._name)

    def _restart(self) -> None:
        self._discard()
        self.info = self._start(None)
        if self._allocation is not None:
            assert self._conn is not None
            self._conn.send(("allocate", *self._allocation))
            worker_outputs(*self._receive(self._conn, self._process), self._name)

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None and self._process.is_alive():
            stop_process(self._process)
        self._process = self._conn = None

    def allocate_kv_cache(self, num_slots: int, max_num_seqs: int, max_model_len: int) -> None:
        self._allocation = (num_slots, max_num_seqs, max_model_len)
        self.call("allocate", *self._allocation)

    def forward(self, batch: StepBatch) -> StepResult:
        import torch

        argmax, logits, prompt_logits, verify_argmax = self.call("forward", batch)
        return StepResult(
            argmax,
            None if logits is None else torch.from_numpy(logits),
            [torch.from_numpy(a) for a in prompt_logits],
            verify_argmax,
        )

    def stop(self) -> None:
        with self._lock:
            if self._process is None:
                return
            try:
                if self._process.is_alive() and self._conn is not None:
                    self._conn.send(("unload",))
                    self._conn.poll(_STOP_TIMEOUT_S)
            except OSError:
                pass
            self._process.join(5)
            self._discard()
