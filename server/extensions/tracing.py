"""Triton's trace extension with OpenTelemetry: a span per traced request, exported over OTLP.

Each traced inference request becomes a root span (``modeldock.infer``: from the core receiving the decoded request
to its response) with child spans for the time it waited in the queue, the batch it was merged into and the
backend's compute, taken from the scheduler's own timestamps. Spans go to an OTLP/HTTP collector through
OpenTelemetry's SDK (the optional ``modeldock[tracing]`` extra); the collector's address comes from
``--trace-config opentelemetry,url=...`` or OpenTelemetry's own ``OTEL_EXPORTER_OTLP_*`` variables.

What is traced follows Triton's trace settings, read and changed at ``/v2/trace/setting`` (per model at
``/v2/models/<m>/trace/setting``) and over gRPC ``TraceSetting``: ``trace_level`` (``OFF`` or ``TIMESTAMPS``),
``trace_rate`` (every Nth request), ``trace_count`` (how many more to trace, -1 without end). With tracing off,
which is the default, a request pays one attribute check.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server import __version__
from server.errors import InvalidInput, Unsupported
from server.protocol.types import InferRequest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS")
# Triton's settings, with the values a fresh server reports (all strings, trace_level a list of them).
DEFAULT_SETTINGS: dict[str, Any] = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "opentelemetry",
}
_INTEGER_SETTINGS = ("trace_rate", "trace_count", "log_frequency")
_OTEL_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# monotonic_ns() + this = nanoseconds since the epoch, which spans are stamped with.
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


@dataclass
class TraceConfig:
    """What ``--trace-config`` said, in Triton's syntax: ``level=TIMESTAMPS``, ``rate=1``, ``count=-1``,
    ``mode=opentelemetry``, ``opentelemetry,url=http://collector:4318/v1/traces``,
    ``opentelemetry,resource=service.name=ranker``."""

    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    url: str | None = None
    resource: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: Iterable[str], environment: Mapping[str, str] | None = None) -> TraceConfig:
        config = cls()
        environment = os.environ if environment is None else environment
        level_given = False
        for value in values:
            section, _, rest = value.partition(",") if "=" not in value.partition(",")[0] else ("", "", value)
            key, equals, setting = rest.partition("=")
            if not equals:
                raise ValueError(f"--trace-config {value!r}: expected [opentelemetry,]<setting>=<value>")
            key = key.strip()
            if section == "opentelemetry" and key == "url":
                config.url = setting
            elif section == "opentelemetry" and key == "resource":
                name, _, resource_value = setting.partition("=")
                config.resource[name] = resource_value
            elif section in ("", "triton") and key in ("level", "rate", "count", "log-frequency", "mode", "file"):
                if key == "mode" and setting != "opentelemetry":
                    raise ValueError(f"--trace-config {value!r}: only mode=opentelemetry is supported")
                name = {"level": "trace_level", "log-frequency": "log_frequency"}.get(key, f"trace_{key}")
                config.settings.update(checked_settings({name: [setting] if name == "trace_level" else setting}))
                level_given = level_given or name == "trace_level"
            else:
                raise ValueError(f"--trace-config {value!r}: unknown setting")
        # OpenTelemetry's own variables switch tracing on where no level was chosen on the command line.
        exporter_named = environment.get("OTEL_TRACES_EXPORTER", "").lower() == "otlp"
        if not level_given and (exporter_named or any(environment.get(v) for v in _OTEL_ENDPOINT_VARIABLES)):
            config.settings["trace_level"] = ["TIMESTAMPS"]
            config.settings["trace_rate"] = "1"
        return config


def checked_settings(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Triton's trace settings as a client sends them, checked; ``None`` values (clear) pass through."""
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in DEFAULT_SETTINGS:
            raise InvalidInput(f"trace setting '{name}' is unknown; known: {', '.join(DEFAULT_SETTINGS)}")
        if value is None:
            checked[name] = None
            continue
        if name == "trace_level":
            levels = [value] if isinstance(value, str) else value
            if not isinstance(levels, list) or not levels or not all(isinstance(v, str) for v in levels):
                raise InvalidInput("trace setting 'trace_level' must be a list of levels")
            unknown = [v for v in levels if v.upper() not in LEVELS]
            if unknown:
                raise InvalidInput(f"trace setting 'trace_level': {unknown} not supported; use OFF or TIMESTAMPS")
            upper = sorted({v.upper() for v in levels})
            checked[name] = ["TIMESTAMPS"] if "TIMESTAMPS" in upper else ["OFF"]
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InvalidInput(f"trace setting '{name}' must be a string, got {value!r}")
        if name in _INTEGER_SETTINGS:
            try:
                number = int(value)
            except ValueError:
                raise InvalidInput(f"trace setting '{name}' must be an integer, got {value!r}") from None
            if number < (-1 if name == "trace_count" else 0) or (name == "trace_rate" and number == 0):
                raise InvalidInput(f"trace setting '{name}': {number} is out of range")
            value = str(number)
        elif name == "trace_file" and value:
            raise InvalidInput("trace setting 'trace_file': traces are exported over OTLP, not written to files")
        elif name == "trace_mode" and value != "opentelemetry":
            raise InvalidInput("trace setting 'trace_mode': only 'opentelemetry' is supported")
        checked[name] = str(value)
    return checked


@dataclass
class _Sampling:
    settings: dict[str, Any]
    seen: itertools.count[int] = field(default_factory=itertools.count)
    remaining: int = -1

    def reset(self) -> None:
        self.seen = itertools.count()
        self.remaining = int(self.settings["trace_count"])

    def pick(self) -> bool:
        if self.settings["trace_level"] == ["OFF"] or self.remaining == 0:
            return False
        if next(self.seen) % int(self.settings["trace_rate"]):
            return False
        if self.remaining > 0:
            self.remaining -= 1
        return True


class RequestTracing:
    """The server's trace settings, and the tracer that turns sampled requests into spans."""

    def __init__(self, config: TraceConfig | None = None, exporter: SpanExporter | None = None) -> None:
        self.config = config or TraceConfig()
        self._exporter = exporter
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._global = _Sampling(dict(self.config.settings))
        self._global.reset()
        # Per model: only the settings a client set for it; the rest follow the global ones.
        self._overrides: dict[str, dict[str, Any]] = {}
        self._models: dict[str, _Sampling] = {}
        self.active = False
        self._refresh()

    # -- settings -------------------------------------------------------------------------------------------
    def settings(self, model: str = "") -> dict[str, Any]:
        if not model:
            return dict(self._global.settings)
        return {**self._global.settings, **self._overrides.get(model, {})}

    def update(self, changes: Mapping[str, Any], model: str = "") -> dict[str, Any]:
        """Apply a client's changes; a ``None`` value clears a model's own setting (or resets a global one)."""
        checked = checked_settings(changes)
        if model:
            own = self._overrides.setdefault(model, {})
            for name, value in checked.items():
                if value is None:
                    own.pop(name, None)
                else:
                    own[name] = value
        else:
            for name, value in checked.items():
                self._global.settings[name] = DEFAULT_SETTINGS[name] if value is None else value
            self._global.reset()
        self._models.clear()
        self._refresh()
        return self.settings(model)

    def _refresh(self) -> None:
        levels = [self._global.settings["trace_level"], *(o.get("trace_level") for o in self._overrides.values())]
        self.active = any(level == ["TIMESTAMPS"] for level in levels)
        if self.active:
            self._ensure_tracer()

    def _sampling(self, model: str) -> _Sampling:
        if model not in self._overrides:
            return self._global
        sampling = self._models.get(model)
        if sampling is None:
            sampling = self._models[model] = _Sampling(self.settings(model))
            sampling.reset()
        return sampling

    # -- spans ----------------------------------------------------------------------------------------------
    def _ensure_tracer(self) -> None:
        if self._tracer is not None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise Unsupported(
                'tracing needs OpenTelemetry\'s SDK and OTLP exporter: pip install "modeldock[tracing]"'
            ) from None
        exporter = self._exporter
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=self.config.url) if self.config.url else OTLPSpanExporter()
        resource = Resource.create(
            {"service.name": "modeldock", "service.version": __version__, **self.config.resource}
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("modeldock", __version__)

    def start(self, request: InferRequest) -> Span | None:
        """The root span of ``request`` when it is sampled, else None."""
        if not self.active or self._tracer is None or not self._sampling(request.model_name).pick():
            return None
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = None
        if request.trace_parent:
            parent = TraceContextTextMapPropagator().extract({"traceparent": request.trace_parent})
        span = self._tracer.start_span(
            "modeldock.infer",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "modeldock.model.name": request.model_name,
                "modeldock.model.version": request.model_version or "",
                "modeldock.request.id": request.id,
            },
        )
        request.trace = span
        return span

    def finish(self, request: InferRequest, span: Span, error: BaseException | None = None) -> None:
        """Add the queue, batch and compute spans from the scheduler's marks, then end the request's span."""
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        assert self._tracer is not None
        context = trace.set_span_in_context(span)
        marks = request.marks_ns
        if marks is not None:
            arrival, start, merged, executed, split, batch_size = marks
            for name, begin, end in (
                ("queue", arrival, start),
                ("batch", start, merged),
                ("compute", merged, executed),
            ):
                child = self._tracer.start_span(name, context=context, start_time=begin + _EPOCH_OFFSET_NS)
                if name != "queue":
                    child.set_attribute("modeldock.batch.size", batch_size)
                child.end(end_time=end + _EPOCH_OFFSET_NS)
            span.set_attribute("modeldock.batch.size", batch_size)
            span.set_attribute("modeldock.output.split_ns", split - executed)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.record_exception(error)
        span.end()

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Flush the spans still buffered, for at most ``timeout_s``: an unreachable collector (the exporter retries
        for a while) must not hold up the server's exit."""
        if self._provider is None:
            return
        flushing = threading.Thread(target=self._provider.shutdown, name="trace-shutdown", daemon=True)
        flushing.start()
        flushing.join(timeout_s)
