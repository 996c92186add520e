"""Fixtures that start the real server as a separate process on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_REPOSITORY = ROOT / "model_repository"
# Bundled models whose engine takes a minute or more to start on a small CPU machine. They have end-to-end tests
# of their own (and tests/test_bundled_repository.py serves the whole folder), so the shared ``server`` fixture's
# copy leaves them out instead of making every read-only test wait for them.
SLOW_TO_LOAD = ("tiny_vllm",)
# What the copies of the bundled repository leave out: the scripts that build it.
BUILD_FILES = ("build.py", "*_models.py", "__pycache__")
BIND_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``modeldock serve`` in a child process; ``url`` is its HTTP base address, ``grpc_url`` its gRPC one."""

    def __init__(
        self, repository: Path | list[Path], extra_args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        repositories = repository if isinstance(repository, list) else [repository]
        args = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--http-port", str(self.http_port)]
        args += ["--metrics-port", str(self.metrics_port)]
        for repo in repositories:
            args += ["--model-repository", str(repo)]
        args += ["--grpc-port", str(self.grpc_port)]
        args += extra_args
        self._log = open(log_path, "wb")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        #: A server started for one module is stopped at its end (see ``_stop_module_servers``); the shared one
        #: (``server`` fixture) lives for the whole session.
        self.shared = False
        # Its own process group, so ``stop`` also takes the engine processes it started (vLLM's, Ray's) with it.
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=environment, start_new_session=True
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever the server left behind in its group (an engine process it could not stop in time) goes too, so
        # its memory is free for the tests that follow.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``start_server(repo, *extra_args, env={...})`` starts a server and waits until it is ready."""
    started: list[ServerProcess] = []

    def start(
        repository: Path | list[Path], *extra_args: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> ServerProcess:
        # A free port can be taken by another process between being picked and being bound; a server that lost
        # that race is started again on new ports rather than failing the test.
        for attempt in range(BIND_ATTEMPTS):
            log_path = tmp_path_factory.mktemp("server-log") / "server.log"
            server = ServerProcess(repository, list(extra_args), log_path, env)
            started.append(server)
            if not wait:
                return server
            try:
                server.wait_ready()
                return server
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == BIND_ATTEMPTS - 1:
                    raise
                server.stop()
        raise AssertionError("unreachable")

    start.started = started  # type: ignore[attr-defined]  # read by _stop_module_servers
    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def _stop_module_servers(start_server: Callable[..., ServerProcess]) -> Iterator[None]:
    """Stop the servers a test module started when the module ends, not at the end of the session: a server holds
    its models' memory (an engine's KV cache is a GiB or more), and dozens of idle ones left the last modules
    without memory to load their own."""
    started: list[ServerProcess] = start_server.started  # type: ignore[attr-defined]
    before = len(started)
    yield
    for server in started[before:]:
        if not server.shared:
            server.stop()


@pytest.fixture(scope="session")
def bundled_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the bundled repository, so no test can alter the committed one (less ``SLOW_TO_LOAD``)."""
    target = tmp_path_factory.mktemp("bundled") / "model_repository"
    shutil.copytree(BUNDLED_REPOSITORY, target, ignore=shutil.ignore_patterns(*BUILD_FILES, *SLOW_TO_LOAD))
    return target


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerProcess], bundled_repository: Path) -> ServerProcess:
    """One server on the bundled models, shared by the read-only end-to-end tests."""
    server = start_server(bundled_repository)
    server.shared = True
    return server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without a visible NVIDIA GPU."""
    from server.devices import gpu_count

    if gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _language_models():  # the builders live beside the bundled examples, which are generated by them too
    import importlib.util

    spec = importlib.util.spec_from_file_location("language_models", BUNDLED_REPOSITORY / "language_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 folder (random weights, trained tokenizer, chat template) as ``save_pretrained`` writes it."""
    return _language_models().build_causal_lm(tmp_path_factory.mktemp("causal-lm") / "model")


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder folder for embeddings."""
    return _language_models().build_encoder(tmp_path_factory.mktemp("encoder") / "model")
