"""Triton's logging extension: what the server logs, read and changed while it runs.

``GET/POST /v2/logging`` and gRPC ``LogSettings`` both land here, so the two front ends accept the same settings
with the same checks. Log output is process-wide, so one ``ServerLogging`` owns the handler the server writes to;
changing a setting swaps that handler's filter and format, never the loggers the code logs through.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidInput, NotAllowed

LOG_LEVELS = ("debug", "info", "warning", "error")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogSettings(BaseModel):
    """Triton's setting names and meanings; strict, so ``"false"`` is refused rather than read as true."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Empty: the console (standard error). The server never opens a file a client names.
    log_file: str = ""
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    # Above 0, debug records are written too.
    log_verbose_level: int = Field(default=0, ge=0, le=2**32 - 1)
    # "json": one JSON object per line, with the id of the inference request being served where there is one.
    log_format: Literal["default", "ISO8601", "json"] = "default"

    @classmethod
    def for_level(cls, level: str) -> LogSettings:
        """The settings ``--log-level`` starts with: each level also writes the more severe ones."""
        level = level.lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log level '{level}' is not one of {', '.join(LOG_LEVELS)}")
        return cls(
            log_verbose_level=1 if level == "debug" else 0,
            log_info=level in ("debug", "info"),
            log_warning=level in ("debug", "info", "warning"),
        )


# The id of the inference request the current task serves (its "id", else one made up), for JSON log lines.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log collectors that parse fields rather than lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "ISO8601":
        formatter = logging.Formatter(_FORMAT, datefmt="%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        return formatter
    return logging.Formatter(_FORMAT)


class ServerLogging:
    """The handler the server logs to, and the settings that decide what passes through it."""

    def __init__(self, settings: LogSettings | None = None, stream: TextIO | None = None) -> None:
        self.settings = settings or LogSettings()
        self.handler = logging.StreamHandler(stream or sys.stderr)
        self.handler.addFilter(self._passes)
        self._apply()

    def install(self) -> None:
        """Make this the root logger's only handler, so every library's records go through the settings."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self.handler)
        self._apply()

    @property
    def json(self) -> bool:
        return self.settings.log_format == "json"

    def current(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the settings a client sent (any subset) and return all of them; nothing changes on an error."""
        try:
            updated = LogSettings.model_validate({**self.settings.model_dump(), **changes})
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            raise InvalidInput(f"log setting '{field}': {error['msg']}") from None
        if updated.log_file != self.settings.log_file:
            raise NotAllowed(
                "log setting 'log_file': the server writes its log to the console only; redirect its output to "
                "keep a file"
            )
        self.settings = updated
        self._apply()
        return self.current()

    def _apply(self) -> None:
        self.handler.setFormatter(_formatter(self.settings.log_format))
        if self.handler in logging.getLogger().handlers:
            # Debug records cost a little to build, so they are only made while verbose logging is on.
            logging.getLogger().setLevel(logging.DEBUG if self.settings.log_verbose_level else logging.INFO)

    def _passes(self, record: logging.LogRecord) -> bool:
        settings = self.settings
        if record.levelno >= logging.ERROR:
            return settings.log_error
        if record.levelno >= logging.WARNING:
            return settings.log_warning
        if record.levelno >= logging.INFO:
            return settings.log_info
        return settings.log_verbose_level > 0
