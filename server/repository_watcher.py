"""Poll mode: keeps the loaded models in step with the repository folders.

Each model folder is summarised by a fingerprint (relative path, size and modification time of every file in
it). A folder whose fingerprint differs from the one last acted on is (re)loaded, and a folder that is gone is
unloaded, but only once the fingerprint has stayed the same across two consecutive scans: a model that is still
being copied keeps changing size or mtime, so half-written files are never loaded.

A plain periodic scan rather than OS file notifications: it behaves the same on bind mounts, network and
container file systems where inotify events are missing, and the settle check needs a rescan anyway.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from server.errors import ModelDockError
from server.model_manager import ModelManager
from server.repository import ModelRepository

log = logging.getLogger(__name__)

Fingerprint = frozenset[tuple[str, int, int]]


def model_fingerprint(model_dir: Path) -> Fingerprint:
    entries: set[tuple[str, int, int]] = set()
    for folder, _, files in os.walk(model_dir):
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

    async def prime(self) -> None:
        """Record the state the start-up load is about to read; call before ``ModelManager.load_all``.

        Taking it before the load means a change made while models load shows up as a difference later.
        """
        self._applied = await asyncio.to_thread(repository_fingerprints, self.manager.repository)
        self._seen = dict(self._applied)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once(wait=False)
            except Exception:  # a scan failure (e.g. a vanished mount) must not stop watching
                log.exception("model repository scan failed")

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
