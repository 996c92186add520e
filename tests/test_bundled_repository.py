"""README's promise: on a machine set up with the project's install command, ``modeldock serve`` on the bundled
``model_repository/`` brings every bundled model to READY, the slow-starting engines (vLLM) included."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import BUILD_FILES, BUNDLED_REPOSITORY, ServerProcess

# A vLLM engine start alone took up to two minutes on a loaded 2-core machine; every model loads at once.
READY_WITHIN_S = 600.0


@pytest.mark.slow
def test_every_bundled_model_is_ready(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("whole-bundle") / "model_repository"
    shutil.copytree(BUNDLED_REPOSITORY, repository, ignore=shutil.ignore_patterns(*BUILD_FILES))
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=READY_WITHIN_S)
    index = httpx.post(f"{server.url}/v2/repository/index", json={}, timeout=30).json()
    bundled = {path.parent.name for path in BUNDLED_REPOSITORY.glob("*/config.yaml")}
    states = {entry["name"]: (entry.get("state"), entry.get("reason", "")) for entry in index}
    assert set(states) == bundled
    not_ready = {name: state for name, state in states.items() if state[0] != "READY"}
    assert not not_ready, f"bundled models not READY: {not_ready}\n{server.log()[-4000:]}"
    server.stop()
