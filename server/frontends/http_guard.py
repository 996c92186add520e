"""What the HTTP front end checks before routing a request: restricted API groups and size limits.

It runs in front of both the infer fast path and FastAPI, so every route is covered the same way. One pass over
the request's headers finds the header size, the declared body size and a restricted group's header; with no
restrictions configured the route is not even classified.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Message, Receive, Scope

from server.errors import HeadersTooLarge, PayloadTooLarge
from server.frontends.restrictions import Restrictions, http_group, http_refusal
from server.protocol.limits import LIMITS, RequestLimits


class HttpGuard:
    def __init__(self, restrictions: Restrictions | None = None, limits: RequestLimits = LIMITS) -> None:
        self.restrictions = restrictions or Restrictions()
        self.limits = limits

    def admit(self, scope: Scope, receive: Receive) -> Receive:
        """The ``receive`` to read ``scope``'s body with, or the ``ModelDockError`` that refuses the request.

        A body sent without Content-Length (chunked) is counted against the limit as it arrives; one with it is
        refused at once, and the server's HTTP parser holds the body to its declared length.
        """
        header_bytes = 0
        content_length: bytes | None = None
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value)
            if name == b"content-length":
                content_length = value
        self.check_head(scope["path"], header_bytes, content_length, _header_lookup(scope))
        if content_length is not None:
            return receive
        limit = self.limits.http_max_body_bytes
        received = 0

        async def receive_bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(received, limit)
            return message

        return receive_bounded

    def check_head(
        self,
        path: str,
        header_bytes: int,
        content_length: str | bytes | None,
        header: Callable[[str], str | bytes | None],
    ) -> None:
        """Refuses (raises) a request whose head breaks a limit or lacks a restricted group's header.

        Each front end reads its own wire: ``header`` looks a lower-case header name up in the request.
        """
        if header_bytes > self.limits.max_header_bytes:
            raise HeadersTooLarge(
                f"request headers hold {header_bytes} bytes; at most {self.limits.max_header_bytes} are accepted "
                "(--max-header-bytes)"
            )
        if self.restrictions:
            missing = self.restrictions.missing_header(http_group(path), header)
            if missing is not None:
                raise http_refusal(missing)
        limit = self.limits.http_max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise _too_large(int(content_length), limit, declared=True)


def _too_large(size: int, limit: int, declared: bool = False) -> PayloadTooLarge:
    size_text = f"{size} bytes" if declared else f"more than {limit} bytes"
    return PayloadTooLarge(f"request body is {size_text}; at most {limit} are accepted (--http-max-body-bytes)")


def _header_lookup(scope: Scope) -> Callable[[str], bytes | None]:
    def lookup(name: str) -> bytes | None:
        wanted = name.encode("latin-1", "replace")
        return next((value for key, value in scope["headers"] if key == wanted), None)

    return lookup
