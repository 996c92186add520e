"""Every failure on the ``/v1`` routes answered in OpenAI's error shape, so the ``openai`` client raises its own
typed errors (``NotFoundError``, ``BadRequestError``, ``AuthenticationError``) with the server's message.
"""

from __future__ import annotations

import logging

import orjson
from fastapi.responses import Response
from pydantic import ValidationError

from server.errors import InvalidInput, ModelDockError, ModelNotFound, Overloaded, Unauthorized
from server.frontends.openai.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class OpenAIRequestError(InvalidInput):
    """A bad request field, named in the error's ``param`` as OpenAI does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def field_error(exc: ValidationError, rename: dict[str, str] | None = None) -> OpenAIRequestError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.role``)."""
    first = exc.errors()[0]
    # A union field's errors name the member type tried (``prompt.list[str]``); the client's field is what counts.
    parts = [str(part) for part in first["loc"] if not (isinstance(part, str) and _is_type_tag(part))]
    param = ".".join(parts)
    param = (rename or {}).get(param, param)
    return OpenAIRequestError(f"'{param}': {first['msg']}" if param else first["msg"], param or None)


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict")


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_info(exc: ModelDockError) -> ErrorInfo:
    if exc.http_status >= 500:
        log.warning("request failed: %s", exc.message)
    code = None
    if isinstance(exc, ModelNotFound):
        code = "model_not_found"
    elif isinstance(exc, Unauthorized):
        code = "invalid_api_key"
    elif isinstance(exc, Overloaded):
        code = "rate_limit_exceeded"
    return ErrorInfo(
        message=exc.message, type=_error_type(exc.http_status), param=getattr(exc, "param", None), code=code
    )


def error_response(exc: ModelDockError) -> Response:
    body = ErrorResponse(error=error_info(exc)).model_dump()
    headers = {"Retry-After": exc.retry_after} if isinstance(exc, Overloaded) else None
    return Response(orjson.dumps(body), status_code=exc.http_status, media_type="application/json", headers=headers)


def plain_error_response(status: int, message: str) -> Response:
    info = ErrorInfo(message=message, type=_error_type(status))
    return Response(orjson.dumps({"error": info.model_dump()}), status_code=status, media_type="application/json")
