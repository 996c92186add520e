"""Poll mode: keeps the loaded models in step with the repository folders.

Each model folder is summarised by a fingerprint (relative path, size and modification time of every file in
it). A folder whose fingerprint differs from the one last acted on is (re)loaded, and a folder that is gone is
unloaded, but only once the fingerprint has stayed the same across two consecutive scans: a model that is still
being copied keeps changing size or mtime, so half-written files are never loaded.

Scans happen every ``--repository-poll-secs``, and sooner when watchfiles reports file events: once the
folders have been quiet for a moment a scan runs, and a change it sees is confirmed by the next scan after another
quiet moment. The periodic scan alone is what keeps working where file events never arrive (network and some
container file systems), so a missing or failing watcher costs only latency.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import watchfiles

from server.errors import ModelDockError
from server.repository.discovery import ModelRepository
from server.repository.model_manager import ModelManager

log = logging.getLogger(__name__)

Fingerprint = frozenset[tuple[str, int, int]]

# How long the folders must stay free of file events before an event-triggered scan (capped by the poll interval).
QUIET_S = 1.0


def model_fingerprint(model_dir: Path) -> Fingerprint:
    """Every file under the model folder, symlinked folders followed (a version folder may be a link to where a
    model was built), each real folder once so a link loop cannot make the scan endless."""
    entries: set[tuple[str, int, int]] = set()
    visited: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(model_dir, followlinks=True):
        try:
            real = os.stat(folder)
        except OSError:
            subfolders.clear()
            continue
        if (real.st_dev, real.st_ino) in visited:
            subfolders.clear()
            continue
        visited.add((real.st_dev, real.st_ino))
        for filename in files:
            path = Path(folder) / filename
            try:
                stat = path.stat()
            except OSError:  # removed between listing and stat: the next scan sees the settled state
                continue
            entries.add((str(path.relative_to(model_dir)), stat.st_size, stat.st_mtime_ns))
    return frozenset(entries)


def repository_fingerprints(repository: ModelRepository) -> dict[str, Fingerprint]:
    """Fingerprints of every model in every repository folder; ambiguous names are left to their load error."""
    found, problems = repository.scan()
    return {name: model_fingerprint(location.path) for name, location in found.items() if name not in problems}


class RepositoryWatcher:
    def __init__(self, manager: ModelManager, interval_s: float) -> None:
        self.manager = manager
        self.interval_s = interval_s
        # The fingerprint each model was last loaded from, and what the previous scan saw.
        self._applied: dict[str, Fingerprint] = {}
        self._seen: dict[str, Fingerprint] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._file_event = asyncio.Event()

    async def prime(self) -> None:
        """Record the state the start-up load is about to read; call before ``ModelManager.load_all``.

        Taking it before the load means a change made while models load shows up as a difference later.
        """
        self._applied = await asyncio.to_thread(repository_fingerprints, self.manager.repository)
        self._seen = dict(self._applied)

    async def run(self) -> None:
        stop = asyncio.Event()
        events = asyncio.create_task(self._follow_file_events(stop))
        try:
            while True:
                await self._wait_for_next_scan()
                try:
                    await self.poll_once(wait=False)
                except Exception:  # a scan failure (e.g. a vanished mount) must not stop watching
                    log.exception("model repository scan failed")
        finally:
            stop.set()
            events.cancel()

    async def _follow_file_events(self, stop: asyncio.Event) -> None:
        roots = [str(root) for root in self.manager.repository.roots if root.is_dir()]
        if not roots:
            return
        try:
            async for _ in watchfiles.awatch(*roots, stop_event=stop, debounce=200, ignore_permission_denied=True):
                self._file_event.set()
        except Exception as exc:  # e.g. the inotify watch limit: polling still finds every change
            log.warning("file events for the model repository are unavailable (%s); polling only", exc)

    def _settling(self) -> bool:
        """Whether the last scan saw a change that a later scan has yet to confirm."""
        return any(self._applied.get(name) != fingerprint for name, fingerprint in self._seen.items()) or any(
            name not in self._seen for name in self._applied
        )

    async def _wait_for_next_scan(self) -> None:
        """Until the poll interval is up, or until the folders have been quiet for ``QUIET_S`` after a file event
        (or after a scan that saw a change settling)."""
        loop = asyncio.get_running_loop()
        quiet_s = min(QUIET_S, self.interval_s)
        latest = loop.time() + self.interval_s
        due = min(latest, loop.time() + quiet_s) if self._settling() else latest
        self._file_event.clear()
        while (remaining := due - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._file_event.wait(), remaining)
            except TimeoutError:
                return
            self._file_event.clear()
            due = min(latest, loop.time() + quiet_s)

    async def poll_once(self, wait: bool = True) -> None:
        """Scan once and start the loads and unloads that are due; ``wait`` for them to finish.

        The watcher itself does not wait, so one big model loading for minutes does not hold up the others;
        the model manager's per-model lock keeps two changes to one model in order.
        """
        current = await asyncio.to_thread(repository_fingerprints, self.manager.repository)
        previous, self._seen = self._seen, current
        changed = [
            name
            for name, fingerprint in current.items()
            if fingerprint != self._applied.get(name) and previous.get(name) == fingerprint
        ]
        removed = [name for name in self._applied if name not in current and name not in previous]
        for name in changed:
            self._applied[name] = current[name]
        for name in removed:
            del self._applied[name]
        tasks = [asyncio.create_task(self._load(name)) for name in changed]
        tasks += [asyncio.create_task(self._unload(name)) for name in removed]
        self._loads.update(tasks)
        for task in tasks:
            task.add_done_callback(self._loads.discard)
        if wait:
            await asyncio.gather(*tasks)

    async def _load(self, name: str) -> None:
        log.info("model '%s' changed on disk; loading", name)
        try:
            await self.manager.load(name)
        except ModelDockError as exc:  # recorded in the index; what was serving keeps serving
            log.error("poll: %s", exc.message)

    async def _unload(self, name: str) -> None:
        log.info("model '%s' removed from the repository; unloading", name)
        try:
            await self.manager.unload(name)
        except ModelDockError as exc:
            log.error("poll: %s", exc.message)
