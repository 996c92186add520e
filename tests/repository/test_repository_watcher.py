"""Poll mode acts only on settled folders; ``none`` mode never changes what is loaded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from server.repository.discovery import ModelRepository
from server.repository.model_manager import ModelManager, ModelState
from server.repository.watcher import RepositoryWatcher, model_fingerprint
from tests.lifecycle_models import (
    BUNDLED_REPOSITORY,
    add_simple,
    check_simple_output,
    infer_simple,
    model_ready,
    wait_for,
)


async def test_half_copied_model_is_not_loaded_until_it_settles(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    manager = ModelManager(ModelRepository([repository]))
    watcher = RepositoryWatcher(manager, interval_s=0.3)
    await watcher.prime()
    await manager.load_all()
    try:
        model_file = (BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx").read_bytes()
        target = repository / "simple" / "1"
        target.mkdir(parents=True)
        shutil.copy(BUNDLED_REPOSITORY / "simple" / "config.yaml", repository / "simple" / "config.yaml")
        (target / "model.onnx").write_bytes(model_file[: len(model_file) // 2])
        await watcher.poll_once()
        assert "simple" not in manager.records, "loaded on first sight, before the copy could settle"

        (target / "model.onnx").write_bytes(model_file)
        await watcher.poll_once()
        assert "simple" not in manager.records, "loaded while the folder was still changing"

        await watcher.poll_once()
        record = manager.records["simple"]
        assert record.state == ModelState.READY and record.reason == ""
        assert sorted(record.versions) == [1]

        await watcher.poll_once()  # nothing changed: nothing reloaded
        assert manager.records["simple"] is record and record.versions[1].served is not None

        shutil.rmtree(repository / "simple")
        await watcher.poll_once()
        assert manager.is_ready("simple"), "unloaded before the removal settled"
        await watcher.poll_once()
        assert not manager.is_ready("simple") and record.reason == "unloaded"
    finally:
        await manager.close()


def test_none_mode_loads_once_and_refuses_control(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    add_simple(repository)
    server = start_server(repository, "--model-control-mode", "none", "--repository-poll-secs", "0.1")
    add_simple(repository, "late")
    time.sleep(1.0)
    assert not model_ready(server.url, "late")
    response = httpx.post(f"{server.url}/v2/repository/models/late/load", timeout=10)
    assert response.status_code == 400 and "'none'" in response.json()["error"]
    check_simple_output(infer_simple(None, server.url))


def test_poll_mode_watches_every_repository(start_server, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    add_simple(first, "one")
    second.mkdir()
    server = start_server([first, second], "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    add_simple(tmp_path / "staging", "two")
    shutil.copytree(tmp_path / "staging" / "two", second / "two")
    wait_for(lambda: model_ready(server.url, "two"), what="the model copied into the second repository")
    check_simple_output(infer_simple(None, server.url, "two"))
    check_simple_output(infer_simple(None, server.url, "one"))


def test_file_events_trigger_scans_long_before_the_poll_interval(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    server = start_server(repository, "--model-control-mode", "poll", "--repository-poll-secs", "60")
    time.sleep(0.5)  # let the watcher start following the folder
    add_simple(tmp_path / "staging", "dropped")
    started = time.monotonic()
    shutil.copytree(tmp_path / "staging" / "dropped", repository / "dropped")
    # A scan after a quiet moment sees it, another after the next quiet moment confirms it: about a second in all.
    wait_for(lambda: model_ready(server.url, "dropped"), timeout=20, what="the copied model to load on file events")
    assert time.monotonic() - started < 20
    check_simple_output(infer_simple(None, server.url, "dropped"))

    shutil.rmtree(repository / "dropped")
    wait_for(lambda: not model_ready(server.url, "dropped"), timeout=20, what="the removed model to unload")


def test_fingerprint_follows_a_symlinked_version_folder_and_survives_a_loop(tmp_path: Path) -> None:
    model_dir = add_simple(tmp_path / "repo", "linked", versions=())
    built = tmp_path / "build" / "1"
    built.mkdir(parents=True)
    shutil.copy(BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx", built / "model.onnx")
    (model_dir / "1").symlink_to(built, target_is_directory=True)
    (built / "again").symlink_to(built.parent, target_is_directory=True)  # a loop back up the tree

    before = model_fingerprint(model_dir)
    assert "1/model.onnx" in {path for path, _, _ in before}
    (built / "model.onnx").write_bytes((built / "model.onnx").read_bytes() + b"\0")
    assert model_fingerprint(model_dir) != before  # a change behind the link is seen
