"""deploy/grafana/modeldock.json queries only metrics that a running server exposes, and charts every inference
and batching metric it has: a renamed or removed metric fails here instead of leaving an empty panel."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import BUNDLED_REPOSITORY, ROOT, ServerProcess

DASHBOARD = ROOT / "deploy" / "grafana" / "modeldock.json"
METRIC_NAME = re.compile(r"\b((?:nv|modeldock)_[a-zA-Z0-9_]+)\b")
# Families every panel row must cover; language-model metrics may grow faster than the dashboard.
MUST_CHART = ("nv_", "modeldock_inference_")


@pytest.fixture(scope="module")
def metrics_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tensor model, a batched one and a language model: every family of metrics the server has, at once."""
    repository = tmp_path_factory.mktemp("grafana") / "models"
    for name in ("simple", "mlp_classifier", "tiny_gpt"):
        shutil.copytree(BUNDLED_REPOSITORY / name, repository / name)
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=300)
    return server


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queried_metrics() -> set[str]:
    names: set[str] = set()
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            names.update(METRIC_NAME.findall(target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            names.update(METRIC_NAME.findall(variable["definition"]))
    return names


def exposed_samples(server: ServerProcess) -> set[str]:
    """Sample names in the server's exposition (``_bucket``, ``_sum``, ``_count`` and ``_total`` included)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the language models' metrics appear once they have loaded
        text = httpx.get(f"{server.url}/metrics").text
        if "modeldock_llm_" in text:
            break
        time.sleep(0.5)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] == "ModelDock"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            # Every series is filtered by the dashboard's model and version variables.
            for selector in re.findall(r"(?:nv|modeldock)_\w+\{([^}]*)\}", target["expr"]):
                assert 'model=~"$model"' in selector and 'version=~"$version"' in selector, target["expr"]


@pytest.mark.slow
def test_dashboard_metrics_are_exposed_by_a_running_server(metrics_server: ServerProcess) -> None:
    exposed = exposed_samples(metrics_server)
    missing = sorted(queried_metrics() - exposed)
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exposed if name.startswith(MUST_CHART)}
    queried_families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried_metrics()}
    unchartered = sorted(families - queried_families)
    assert not unchartered, f"metrics the server exposes that no panel charts: {unchartered}"
