"""Triton's restricted APIs: ``--http-restricted-api`` and ``--grpc-restricted-protocol``.

An API group (health, inference, model-repository, ...) can require a header with a secret value. A request to a
restricted group without that header, or with another value, is refused before it reaches the core: HTTP 403, and
gRPC UNAVAILABLE as Triton answers, both with Triton's message naming the header. Groups not named stay open.

The value is compared with ``hmac.compare_digest``, so the time a refusal takes does not tell how much of a guess
was right. With nothing restricted (the default) the front ends skip the check entirely.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from server.errors import ApiRestricted


class ApiGroup(str, Enum):
    """Triton's names for the groups of endpoints a restriction applies to."""

    HEALTH = "health"
    METADATA = "metadata"
    INFERENCE = "inference"
    SHARED_MEMORY = "shared-memory"
    MODEL_CONFIG = "model-config"
    MODEL_REPOSITORY = "model-repository"
    STATISTICS = "statistics"
    TRACE = "trace"
    LOGGING = "logging"


@dataclass(frozen=True, slots=True)
class RequiredHeader:
    # Lower case: HTTP header names are case-insensitive and gRPC metadata keys are lower case.
    name: str
    value: bytes

    def admits(self, value: str | bytes | None) -> bool:
        if value is None:
            return False
        given = value.encode() if isinstance(value, str) else value
        return hmac.compare_digest(given, self.value)


class RestrictionSpecError(ValueError):
    """A ``--http-restricted-api`` / ``--grpc-restricted-protocol`` value that cannot be parsed."""


class Restrictions:
    """Which API groups need which header, for one front end."""

    def __init__(self, required: dict[ApiGroup, RequiredHeader] | None = None) -> None:
        self.required = dict(required or {})

    @classmethod
    def parse(cls, specs: Iterable[str], flag: str = "--http-restricted-api") -> Restrictions:
        """Triton's syntax, one spec per flag: ``<group>[,<group>...]:<header>=<value>``; a group may appear once."""
        required: dict[ApiGroup, RequiredHeader] = {}
        known = ", ".join(g.value for g in ApiGroup)
        for spec in specs:
            groups_part, colon, header_part = spec.partition(":")
            name, equals, value = header_part.partition("=")
            if not colon or not equals or not groups_part.strip() or not name.strip():
                raise RestrictionSpecError(f"{flag} {spec!r}: expected <group>[,<group>...]:<header>=<value>")
            header = RequiredHeader(name.strip().lower(), value.encode())
            for item in groups_part.split(","):
                try:
                    group = ApiGroup(item.strip().lower())
                except ValueError:
                    raise RestrictionSpecError(f"{flag} {spec!r}: unknown API group {item!r}; known: {known}") from None
                if group in required:
                    raise RestrictionSpecError(f"{flag}: API group '{group.value}' is restricted more than once")
                required[group] = header
        return cls(required)

    def __bool__(self) -> bool:
        return bool(self.required)

    def missing_header(self, group: ApiGroup | None, header: Callable[[str], str | bytes | None]) -> str | None:
        """The header ``group`` needs and the request lacks (or holds with another value), else None.

        ``header`` looks a (lower-case) header name up in the request, so each front end reads its own wire.
        """
        if group is None:
            return None
        needed = self.required.get(group)
        if needed is None or needed.admits(header(needed.name)):
            return None
        return needed.name


def http_refusal(header: str) -> ApiRestricted:
    """Triton's words for a refused HTTP request (403)."""
    return ApiRestricted(f"This API is restricted, expecting header '{header}'")


def grpc_refusal(header: str) -> ApiRestricted:
    """Triton's words for a refused gRPC call (UNAVAILABLE)."""
    return ApiRestricted(f"This protocol is restricted, expecting header '{header}'")


def http_group(path: str) -> ApiGroup | None:
    """The API group of an HTTP route (None for routes outside every group, e.g. the OpenAPI page)."""
    if not path.startswith("/v2"):
        if path.startswith("/v1/"):  # OpenAI-compatible routes are inference too
            return ApiGroup.INFERENCE
        return ApiGroup.STATISTICS if path == "/metrics" else None
    rest = path[3:]
    if rest in ("", "/"):
        return ApiGroup.METADATA
    if rest.startswith("/health/"):
        return ApiGroup.HEALTH
    if rest.startswith("/repository/"):
        return ApiGroup.MODEL_REPOSITORY
    if rest.startswith(("/systemsharedmemory", "/cudasharedmemory")):
        return ApiGroup.SHARED_MEMORY
    if rest.startswith("/logging"):
        return ApiGroup.LOGGING
    if rest.startswith("/trace"):
        return ApiGroup.TRACE
    if rest.startswith("/models/"):
        if rest == "/models/stats" or rest.endswith("/stats"):
            return ApiGroup.STATISTICS
        if rest.endswith("/infer") or rest.endswith("/generate") or rest.endswith("/generate_stream"):
            return ApiGroup.INFERENCE
        if rest.endswith("/ready"):
            return ApiGroup.HEALTH
        if rest.endswith("/config"):
            return ApiGroup.MODEL_CONFIG
        if rest.endswith("/trace/setting"):
            return ApiGroup.TRACE
        return ApiGroup.METADATA
    return None


_GRPC_GROUPS: dict[str, ApiGroup] = {
    "ServerLive": ApiGroup.HEALTH,
    "ServerReady": ApiGroup.HEALTH,
    "ModelReady": ApiGroup.HEALTH,
    "ServerMetadata": ApiGroup.METADATA,
    "ModelMetadata": ApiGroup.METADATA,
    "ModelInfer": ApiGroup.INFERENCE,
    "ModelStreamInfer": ApiGroup.INFERENCE,
    "ModelConfig": ApiGroup.MODEL_CONFIG,
    "ModelStatistics": ApiGroup.STATISTICS,
    "RepositoryIndex": ApiGroup.MODEL_REPOSITORY,
    "RepositoryModelLoad": ApiGroup.MODEL_REPOSITORY,
    "RepositoryModelUnload": ApiGroup.MODEL_REPOSITORY,
    "SystemSharedMemoryStatus": ApiGroup.SHARED_MEMORY,
    "SystemSharedMemoryRegister": ApiGroup.SHARED_MEMORY,
    "SystemSharedMemoryUnregister": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryStatus": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryRegister": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryUnregister": ApiGroup.SHARED_MEMORY,
    "TraceSetting": ApiGroup.TRACE,
    "LogSettings": ApiGroup.LOGGING,
}


def grpc_group(method: str) -> ApiGroup | None:
    """The API group of a gRPC method, given as ``/inference.GRPCInferenceService/<Name>``."""
    return _GRPC_GROUPS.get(method.rpartition("/")[2])
