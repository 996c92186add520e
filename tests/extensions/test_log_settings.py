"""Triton's logging extension: settings read and changed over HTTP and gRPC govern what the server writes."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from server.errors import InvalidInput, NotAllowed
from server.extensions.log_settings import LogSettings, ServerLogging
from tests.lifecycle_models import add_simple, wait_for

DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "default",
}


@pytest.fixture
def captured() -> Iterator[tuple[ServerLogging, logging.Logger, io.StringIO]]:
    """A ``ServerLogging`` writing to a buffer, fed by a logger of its own so the test leaves the root alone."""
    stream = io.StringIO()
    server_logging = ServerLogging(stream=stream)
    logger = logging.getLogger("tests.log_settings")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(server_logging.handler)
    yield server_logging, logger, stream
    logger.removeHandler(server_logging.handler)


def test_settings_decide_which_records_are_written(captured: tuple[ServerLogging, logging.Logger, io.StringIO]) -> None:
    server_logging, logger, stream = captured
    assert server_logging.current() == DEFAULTS

    logger.debug("debug one")
    logger.info("info one")
    server_logging.update({"log_info": False, "log_verbose_level": 1})
    logger.debug("debug two")
    logger.info("info two")
    logger.warning("warning two")
    server_logging.update({"log_warning": False, "log_error": False})
    logger.error("error three")
    written = stream.getvalue()
    assert "info one" in written and "debug one" not in written
    assert "debug two" in written and "info two" not in written and "warning two" in written
    assert "error three" not in written

    server_logging.update({"log_error": True, "log_format": "ISO8601"})
    logger.error("error four")
    last = stream.getvalue().splitlines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ERROR tests.log_settings: error four$", last), last


@pytest.mark.parametrize(
    ("changes", "error", "fragment"),
    [
        ({"log_info": "false"}, InvalidInput, "'log_info'"),
        ({"log_verbose_level": -1}, InvalidInput, "'log_verbose_level'"),
        ({"log_format": "xml"}, InvalidInput, "'log_format'"),
        ({"log_colour": True}, InvalidInput, "'log_colour'"),
        ({"log_file": "/tmp/server.log"}, NotAllowed, "'log_file'"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(
    captured: tuple[ServerLogging, logging.Logger, io.StringIO],
    changes: dict[str, object],
    error: type[Exception],
    fragment: str,
) -> None:
    server_logging = captured[0]
    with pytest.raises(error, match=fragment):
        server_logging.update({"log_info": False, **changes})
    assert server_logging.current() == DEFAULTS


def test_log_level_sets_the_starting_settings() -> None:
    assert LogSettings.for_level("DEBUG").log_verbose_level == 1
    warning = LogSettings.for_level("warning")
    assert (warning.log_info, warning.log_warning, warning.log_error) == (False, True, True)
    with pytest.raises(ValueError, match="verbose"):
        LogSettings.for_level("verbose")


def test_log_settings_over_http_and_grpc_govern_the_server_log(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository, "simple")
    add_simple(repository, "other")
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "simple")
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    assert "logging" in http.get_server_metadata()["extensions"]
    assert http.get_log_settings() == DEFAULTS

    assert http.update_log_settings({"log_info": False})["log_info"] is False
    http.load_model("other")
    http.unload_model("other")
    assert "model 'other'" not in server.log()  # load and unload are logged at INFO, now off

    rpc = triton_grpc.InferenceServerClient(server.grpc_url)
    changed = rpc.update_log_settings({"log_info": True, "log_verbose_level": 2}, as_json=True)["settings"]
    assert changed["log_info"] == {"bool_param": True} and changed["log_verbose_level"] == {"uint32_param": 2}
    assert rpc.get_log_settings(as_json=True)["settings"]["log_format"] == {"string_param": "default"}
    http.load_model("other")
    wait_for(lambda: "model 'other' ready" in server.log(), what="the INFO line of the load")

    with pytest.raises(InferenceServerException) as refused:
        rpc.update_log_settings({"log_format": "xml"})
    assert refused.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "log_format" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        rpc.update_log_settings({"log_file": "/tmp/elsewhere.log"})
    assert refused.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
    bad = httpx.post(f"{server.url}/v2/logging", json={"log_warning": "no"}, timeout=10)
    assert bad.status_code == 400 and "log_warning" in bad.json()["error"]
    assert httpx.get(f"{server.url}/v2/logging", timeout=10).json() == {
        **DEFAULTS,
        "log_verbose_level": 2,
    }
    http.close()
    rpc.close()
