"""Triton's ``triton_python_backend_utils`` (``pb_utils``) for ModelDock's Python backend.

A ``model.py`` written for Triton keeps its ``import triton_python_backend_utils as pb_utils``: the backend makes
that name refer to this module before it imports the model. It offers what Triton models use most:
``Tensor``, ``InferenceResponse``, ``get_input_tensor_by_name`` / ``get_output_tensor_by_name``, and model calls
(Triton's BLS) with ``InferenceRequest(...).exec()`` and ``async_exec()``.

A call runs on the server exactly as a client's request to the called model does (its own scheduler, batcher and
instances). It travels over the pipe between this worker process and the server, so it needs no network port.
One difference from Triton: a failed call raises ``TritonModelException`` carrying the called model's message,
instead of returning a response whose ``has_error()`` is true, so an error can never be silently ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from server.worker_processes import current_channel


class TritonError(Exception):
    """An error with Triton's ``message()`` accessor (Triton's status ``code`` is accepted and kept)."""

    def __init__(self, msg: str, code: int = 0) -> None:
        super().__init__(msg)
        self._message = msg
        self.code = code

    def message(self) -> str:
        return self._message


class TritonModelException(TritonError):
    """Raised by a model call that failed; ``message()`` is the called model's error message."""


class Tensor:
    """A named numpy array, as Triton's ``pb_utils.Tensor``."""

    __slots__ = ("_name", "_array")

    def __init__(self, name: str, data: np.ndarray) -> None:
        self._name = name
        self._array = np.asarray(data)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True


class InferenceResponse:
    """What ``execute`` may return for a request (instead of a dict of arrays), and what a model call returns."""

    def __init__(self, output_tensors: Sequence[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._outputs)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    """A request from this model to another served model (Triton's BLS).

    ``model_version`` -1 means the newest ready version. ``timeout`` (microseconds) is the request's queue
    timeout, honoured as for a client request when the called model allows overriding it. Triton's
    ``request_id``, ``flags``, ``preferred_memory``, ``trace`` and ``parameters`` are accepted so Triton code runs
    as is; they do not change how the call runs. Calls that are part of a sequence (``correlation_id``) are not
    supported.
    """

    def __init__(
        self,
        model_name: str,
        inputs: Sequence[Tensor] = (),
        requested_output_names: Sequence[str] = (),
        model_version: int = -1,
        timeout: int = 0,
        priority: int = 0,
        correlation_id: int | str = 0,
        request_id: str = "",
        flags: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
        parameters: Any = None,
    ) -> None:
        if correlation_id:
            raise TritonError("InferenceRequest: calls within a sequence (correlation_id) are not supported")
        self.model_name = model_name
        self.request_id = request_id
        self._inputs = list(inputs)
        self._requested_output_names = list(requested_output_names)
        self.model_version = model_version
        self.timeout = timeout
        self.priority = priority

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested_output_names)

    def exec(self) -> InferenceResponse:
        """Run the request and wait for its response; raises ``TritonModelException`` if it fails."""
        return _response(self._send().result())

    def async_exec(self) -> Awaitable[InferenceResponse]:
        """Send the request now and return an awaitable of its response, for ``async def execute``: several calls
        awaited together (``asyncio.gather``) run concurrently."""
        import asyncio

        future = asyncio.wrap_future(self._send())

        async def response() -> InferenceResponse:
            return _response(await future)

        return response()

    def _send(self) -> Future[tuple[str, Any]]:
        channel = current_channel()
        if channel is None:
            raise TritonError("a model can call other models only from execute() while the server runs it")
        parameters: dict[str, Any] = {}
        if self.timeout:
            parameters["timeout"] = int(self.timeout)
        if self.priority:
            parameters["priority"] = int(self.priority)
        version = "" if self.model_version in (-1, None) else str(self.model_version)
        inputs = {tensor.name(): tensor.as_numpy() for tensor in self._inputs}
        return channel.call(self.model_name, version, inputs, self._requested_output_names, parameters)


def _response(result: tuple[str, Any]) -> InferenceResponse:
    status, payload = result
    if status != "ok":
        _, message = payload
        raise TritonModelException(message)
    return InferenceResponse([Tensor(name, array) for name, array in payload.items()])


def get_input_tensor_by_name(request: Any, name: str) -> Tensor | None:
    """The named input of the request ``execute`` received (or of a model call's request); None if absent."""
    if isinstance(request, InferenceRequest):
        return next((t for t in request.inputs() if t.name() == name), None)
    array = request.get_input(name)
    return None if array is None else Tensor(name, array)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)
