"""Error types raised along the request path.

Every failure a client can cause or observe is one of these types, so the front ends map them to HTTP status
codes and gRPC status codes in exactly one place (``http_status`` / ``grpc_code`` below) and a client mistake
never surfaces as a 500 or UNKNOWN.
"""

from __future__ import annotations

import grpc


class ModelDockError(Exception):
    """Base of all errors the server reports to clients."""

    http_status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ModelDockError):
    """The request is malformed: bad tensor name, shape, datatype or body."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthorized(ModelDockError):
    """The request lacks the credentials a route requires (the OpenAI routes' API key)."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class ModelNotFound(ModelDockError):
    """No model (or no such version of it) is known to the repository."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class RegionNotFound(ModelDockError):
    """A status request names a shared memory region that is not registered."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class RegionExists(ModelDockError):
    """A shared memory region is registered under a name already in use; the old one must be unregistered first."""

    http_status = 409
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class ModelNotReady(ModelDockError):
    """The model exists but cannot serve right now (loading, failed, unloading)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class QueueFull(ModelDockError):
    """The model's queue is at its configured limit; the client should back off."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Overloaded(QueueFull):
    """A generation engine cannot take the request in time: its waiting queue is full (its KV cache or running batch
    being full too), or the request would wait longer than the model's ``max_queue_delay_ms``. Answered at once
    with 429 and ``Retry-After`` (OpenAI's answer to a client over its rate), UNAVAILABLE on gRPC, instead of
    queueing work the server cannot start in time."""

    http_status = 429
    grpc_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> str:
        """The ``Retry-After`` header's value: whole seconds, at least one."""
        return str(max(1, int(-(-self.retry_after_s // 1))))


class RequestTimeout(ModelDockError):
    """The request waited in the queue longer than its timeout allows."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class ServerShuttingDown(ModelDockError):
    """The server is draining before it exits: requests already accepted finish, new ones go to another replica."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(ModelDockError):
    """A model could not be loaded: broken config, missing or broken model file, unavailable device."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ConfigError(ModelLoadError):
    """A config file is invalid; the message names the file and the field."""


class BackendError(ModelDockError):
    """The backend failed while executing a request that passed validation."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


class Unsupported(ModelDockError):
    """The request asks for a feature this server does not offer."""

    http_status = 400
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class NotAllowed(ModelDockError):
    """The request is valid but the server's configuration forbids it (load/unload outside explicit mode)."""

    http_status = 400
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class VersionRetired(ModelNotReady):
    """A reload replaced the version a request was about to use; the request was not accepted and may be retried."""


class PayloadTooLarge(ModelDockError):
    """The request body or message is larger than the server accepts (``--http-max-body-bytes``)."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class HeadersTooLarge(ModelDockError):
    """The request's headers (gRPC: metadata) are larger than the server accepts (``--max-header-bytes``)."""

    http_status = 431
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ApiRestricted(ModelDockError):
    """The API group is restricted (``--http-restricted-api`` / ``--grpc-restricted-protocol``) and the request
    lacks the header it needs; Triton answers 403 over HTTP and UNAVAILABLE over gRPC."""

    http_status = 403
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ModelDockError):
    """The request did not finish within its timeout (the ``timeout`` parameter or ``--request-timeout-secs``)."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
