"""ModelDock's own CPU kernels (plain C sources beside this module): compiled once per machine, cached, loaded with
``ctypes``, and split between torch's intra-op threads.

Why C and not a PyTorch extension: a source with no PyTorch headers builds in well under a second with the
machine's C compiler, tuned for the CPU it runs on (``-march=native``), and needs no build step at install time.
Each library is cached under ``$MODELDOCK_CACHE_DIR`` (default ``~/.cache/modeldock``), keyed by its source, the
compiler, the flags and the CPU's features, so a shared home directory never hands one CPU another's build. Where
no compiler is at hand, or every build fails, ``build`` returns None and the caller keeps PyTorch's operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

# One build: the compile step's flags, the link step's flags.
Build = tuple[list[str], list[str]]

_COMPILE_TIMEOUT_S = 120

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("MODELDOCK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "modeldock"
    )
    return Path(root) / "kernels"


def _cpu_features() -> str:
    """The CPU's model and feature flags: a library built with -march=native runs only where these match."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("flags", "Features", "model name", "CPU part"))]
    except OSError:
        lines = []
    return "".join(sorted(set(lines))) or platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(compiler: str, source: Path, builds: Sequence[Build], directory: Path) -> Path:
    """The library for this machine, from the cache or compiled now (atomically, so concurrent loads are safe):
    the first of ``builds`` that succeeds."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    machine = [source.read_text(), version, _cpu_features()]
    errors = []
    for compile_flags, link_flags in builds:
        digest = hashlib.sha256("\0".join([*machine, *compile_flags, *link_flags]).encode()).hexdigest()[:20]
        library = directory / f"{source.stem}-{digest}.so"
        if library.exists():
            return library
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as work:
            objects = Path(work) / f"{source.stem}.o"
            built = Path(work) / library.name
            steps = [
                [compiler, *compile_flags, "-fPIC", "-c", str(source), "-o", str(objects)],
                [compiler, "-shared", str(objects), "-o", str(built), *link_flags],
            ]
            try:
                for command in steps:
                    subprocess.run(command, check=True, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{' '.join(compile_flags)}: {getattr(exc, 'stderr', '') or exc}".strip())
                continue
            os.replace(built, library)
            return library
    raise RuntimeError("; ".join(errors))


def build(source: Path, builds: Sequence[Build], purpose: str) -> ctypes.CDLL | None:
    """``source`` compiled for this machine and loaded; None, with the reason logged, where it cannot be.
    ``purpose`` names what falls back to PyTorch in that message."""
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler found: %s runs on PyTorch's kernels (slower on the CPU)", purpose)
        return None
    try:
        return ctypes.CDLL(str(_compile(compiler, source, builds, cache_dir())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("the kernel for %s could not be built (%s); using PyTorch's kernels", purpose, exc)
        return None


def run_shares(call: Callable[[int, int], None], shares: Sequence[tuple[int, int]]) -> None:
    """``call(first, last)`` for each share, the first on this thread and the others on the shared pool at once
    (a ctypes call releases the GIL, so the shares run in parallel)."""
    if len(shares) == 1:
        call(*shares[0])
        return
    pool = _executor(len(shares) - 1)
    futures = [pool.submit(call, first, last) for first, last in shares[1:]]
    call(*shares[0])
    for future in futures:
        future.result()


def even_shares(count: int, parts: int) -> list[tuple[int, int]]:
    """[0, count) in ``parts`` consecutive ranges of nearly equal size (fewer if count is smaller)."""
    parts = max(1, min(parts, count))
    bounds = [count * index // parts for index in range(parts + 1)]
    return [(bounds[index], bounds[index + 1]) for index in range(parts)]


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-kernel")
        return _pool
