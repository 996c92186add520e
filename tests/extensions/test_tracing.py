"""Tracing end to end: the real server exports OpenTelemetry spans over OTLP/HTTP to a collector started here on
127.0.0.1, answers Triton's trace setting endpoints (HTTP and gRPC, through ``tritonclient``), and writes JSON log
lines carrying the request id. The settings logic and ``--trace-config`` parsing are checked directly too."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.utils import InferenceServerException

from server.errors import InvalidInput
from server.extensions.tracing import DEFAULT_SETTINGS, RequestTracing, TraceConfig
from server.protocol.types import InferRequest
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess


class Collector:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        spans = self.spans

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the handler's required name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.spans):
                return self.spans
            time.sleep(0.05)
        raise AssertionError(f"spans never arrived: {[s.name for s in self.spans]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory, collector: Collector
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("traced")
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    (repository / "failing" / "1").mkdir(parents=True)
    config = {
        "backend": "tests.slow_backend:SleepBackend",
        "max_batch_size": 0,
        "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    (repository / "failing" / "config.yaml").write_text(yaml.safe_dump(config))
    return start_server(
        repository,
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
        f"--trace-config=opentelemetry,url={collector.url}",
        "--log-format=json",
        env={"OTEL_BSP_SCHEDULE_DELAY": "50"},
    )


def _simple_inputs(module: Any) -> list[Any]:
    inputs = [module.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    return inputs


def _attribute(span: Any, key: str) -> Any:
    for item in span.attributes:
        if item.key == key:
            value = item.value
            return value.string_value or value.int_value
    return None


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc-stream"])
def test_each_request_exports_its_spans(traced: ServerProcess, collector: Collector, protocol: str) -> None:
    request_id = f"traced-{protocol}"
    if protocol == "http":
        client: Any = triton_http.InferenceServerClient(f"127.0.0.1:{traced.http_port}")
        client.infer("simple", _simple_inputs(triton_http), request_id=request_id)
    elif protocol == "grpc":
        client = triton_grpc.InferenceServerClient(traced.grpc_url)
        client.infer("simple", _simple_inputs(triton_grpc), request_id=request_id)
    else:
        client = triton_grpc.InferenceServerClient(traced.grpc_url)
        answers: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("simple", _simple_inputs(triton_grpc), request_id=request_id)
        result, error = answers.get(timeout=30)
        client.stop_stream()
        assert error is None and result.as_numpy("OUTPUT0").tolist() == [[2.0] * 16]

    def has_request(spans: list[Any]) -> bool:
        roots = [s for s in spans if _attribute(s, "modeldock.request.id") == request_id]
        return bool(roots) and sum(s.parent_span_id == roots[0].span_id for s in spans) == 3

    spans = collector.wait_for(has_request)
    (root,) = [s for s in spans if _attribute(s, "modeldock.request.id") == request_id]
    assert root.name == "modeldock.infer"
    assert _attribute(root, "modeldock.model.name") == "simple"
    children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert set(children) == {"queue", "batch", "compute"}
    for child in children.values():
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    assert children["queue"].end_time_unix_nano <= children["compute"].start_time_unix_nano
    assert _attribute(children["compute"], "modeldock.batch.size") == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_callers_trace_context_is_continued(traced: ServerProcess, collector: Collector, protocol: str) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    request_id = f"continued-{protocol}"
    if protocol == "http":
        client: Any = triton_http.InferenceServerClient(f"127.0.0.1:{traced.http_port}")
        client.infer("simple", _simple_inputs(triton_http), request_id=request_id, headers=headers)
    else:
        client = triton_grpc.InferenceServerClient(traced.grpc_url)
        client.infer("simple", _simple_inputs(triton_grpc), request_id=request_id, headers=headers)
    spans = collector.wait_for(lambda spans: any(_attribute(s, "modeldock.request.id") == request_id for s in spans))
    (root,) = [s for s in spans if _attribute(s, "modeldock.request.id") == request_id]
    assert root.trace_id.hex() == trace_id and root.parent_span_id.hex() == parent_id


def test_trace_settings_over_http(traced: ServerProcess) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{traced.http_port}")
    settings = client.get_trace_settings()
    assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == "1"
    updated = client.update_trace_settings(model_name="simple", settings={"trace_rate": "5"})
    assert updated["trace_rate"] == "5" and updated["trace_level"] == ["TIMESTAMPS"]
    assert client.get_trace_settings()["trace_rate"] == "1"  # the global setting is untouched
    assert client.get_trace_settings(model_name="simple")["trace_rate"] == "5"
    cleared = client.update_trace_settings(model_name="simple", settings={"trace_rate": None})
    assert cleared["trace_rate"] == "1"
    with pytest.raises(InferenceServerException, match="trace_rate"):
        client.update_trace_settings(settings={"trace_rate": "often"})
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_trace_settings(model_name="nope")


def test_trace_settings_over_grpc(traced: ServerProcess) -> None:
    client = triton_grpc.InferenceServerClient(traced.grpc_url)
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"] == {"value": ["TIMESTAMPS"]}
    updated = client.update_trace_settings(model_name="simple", settings={"trace_count": "3"}, as_json=True)
    assert updated["settings"]["trace_count"] == {"value": ["3"]}
    cleared = client.update_trace_settings(model_name="simple", settings={"trace_count": None}, as_json=True)
    assert cleared["settings"]["trace_count"] == {"value": ["-1"]}
    with pytest.raises(InferenceServerException) as refused:
        client.update_trace_settings(settings={"trace_level": ["LOUD"]})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_json_logs_carry_the_request_id(traced: ServerProcess) -> None:
    body = {"id": "the-failing-one", "inputs": [{"name": "INPUT", "shape": [4], "datatype": "FP32", "data": [-1] * 4}]}
    response = httpx.post(f"{traced.url}/v2/models/failing/infer", json=body, timeout=30)
    assert response.status_code == 500
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in traced.log().splitlines() if line.startswith("{")]
        failed = [r for r in records if r.get("request_id") == "the-failing-one"]
        if failed:
            break
        time.sleep(0.1)
    assert failed and failed[0]["level"] == "WARNING" and "negative input" in failed[0]["message"]
    assert {"time", "level", "logger", "message"} <= set(records[0])


def test_trace_config_follows_tritons_syntax() -> None:
    config = TraceConfig.parse(
        ["level=TIMESTAMPS", "rate=10", "count=5", "mode=opentelemetry", "opentelemetry,url=http://c:4318/v1/traces"],
        environment={},
    )
    assert config.settings["trace_level"] == ["TIMESTAMPS"]
    assert (config.settings["trace_rate"], config.settings["trace_count"]) == ("10", "5")
    assert config.url == "http://c:4318/v1/traces"
    assert TraceConfig.parse(["opentelemetry,resource=service.name=ranker"], {}).resource == {"service.name": "ranker"}
    with pytest.raises(ValueError, match="only mode=opentelemetry"):
        TraceConfig.parse(["mode=triton"], {})
    with pytest.raises(ValueError, match="unknown setting"):
        TraceConfig.parse(["colour=blue"], {})
    with pytest.raises(InvalidInput, match="trace_rate"):
        TraceConfig.parse(["rate=0"], {})


def test_otel_variables_switch_tracing_on() -> None:
    assert TraceConfig.parse([], {}).settings["trace_level"] == ["OFF"]
    on = TraceConfig.parse([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert on.settings["trace_level"] == ["TIMESTAMPS"] and on.settings["trace_rate"] == "1"
    # The command line wins over the environment.
    off = TraceConfig.parse(["level=OFF"], {"OTEL_TRACES_EXPORTER": "otlp"})
    assert off.settings["trace_level"] == ["OFF"]


def test_rate_and_count_pick_the_traced_requests() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = RequestTracing(exporter=exporter)
    assert not tracing.active and tracing.settings() == DEFAULT_SETTINGS
    tracing.update({"trace_level": ["TIMESTAMPS"], "trace_rate": "3", "trace_count": "2"})
    picked = []
    for position in range(12):
        request = InferRequest(model_name="m", id=str(position))
        span = tracing.start(request)
        if span is not None:
            tracing.finish(request, span)
            picked.append(position)
    assert picked == [0, 3]  # every third request, two in all
    tracing.shutdown()
    assert [s.attributes["modeldock.request.id"] for s in exporter.get_finished_spans()] == ["0", "3"]
