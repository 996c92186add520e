"""Model instances and the pool that hands batches to whichever instance is idle.

Each instance owns one backend object and one worker thread, so instances run truly concurrently for backends
that release the GIL (ONNX Runtime, PyTorch) and the event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.base import Backend
from server.config import InstanceGroup, InstanceKind, ModelConfig
from server.devices import CPU, Device, gpu_count
from server.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstancePlacement:
    name: str
    device: Device


def plan_instances(config: ModelConfig, backend_cls: type[Backend]) -> list[InstancePlacement]:
    """Expand ``instance_group`` into one placement per instance, checking GPUs exist."""
    groups = config.instance_group or [InstanceGroup()]
    visible = gpu_count()
    placements: list[InstancePlacement] = []
    for position, group in enumerate(groups):
        group_name = group.name or f"{config.name}_{position}"
        kind = group.kind
        if kind == InstanceKind.KIND_AUTO:
            kind = InstanceKind.KIND_GPU if backend_cls.supports_gpu and visible else InstanceKind.KIND_CPU
        if kind == InstanceKind.KIND_GPU:
            if not backend_cls.supports_gpu:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].kind': backend "
                    f"'{config.backend}' cannot run KIND_GPU instances"
                )
            if visible == 0:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].kind': KIND_GPU requested but no "
                    "GPU is visible to the server"
                )
            gpus = group.gpus or list(range(visible))
            missing = [g for g in gpus if g >= visible]
            if missing:
                raise ModelLoadError(
                    f"model '{config.name}': field 'instance_group[{position}].gpus': GPU(s) {missing} do not "
                    f"exist ({visible} visible)"
                )
            for gpu in gpus:
                for i in range(group.count):
                    placements.append(InstancePlacement(f"{group_name}_{i}_gpu{gpu}", Device("gpu", gpu)))
        else:
            for i in range(group.count):
                placements.append(InstancePlacement(f"{group_name}_{i}", CPU))
    return placements


class ModelInstance:
    """One backend object with its own worker thread."""

    def __init__(self, placement: InstancePlacement, backend: Backend) -> None:
        self.name = placement.name
        self.device = placement.device
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"instance-{placement.name}")

    async def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.backend.execute, inputs, output_names)

    def unload(self) -> None:
        self._executor.shutdown(wait=True)
        try:
            self.backend.unload()
        except Exception:  # a backend failing to clean up must not stop the others from unloading
            log.exception("instance %s failed to unload cleanly", self.name)


def create_instances(
    config: ModelConfig, version_dir: Path, backend_cls: type[Backend]
) -> list[ModelInstance]:
    """Load every instance of a version; on any failure the ones already loaded are released."""
    instances: list[ModelInstance] = []
    try:
        for placement in plan_instances(config, backend_cls):
            instances.append(ModelInstance(placement, backend_cls(config, version_dir, placement.device)))
    except BaseException:
        for instance in instances:
            instance.unload()
        raise
    return instances


class InstancePool:
    """Hands out idle instances; waiting callers are served in arrival order."""

    def __init__(self, instances: list[ModelInstance]) -> None:
        if not instances:
            raise ValueError("an instance pool needs at least one instance")
        self.instances = instances
        self._idle: asyncio.Queue[ModelInstance] = asyncio.Queue()
        for instance in instances:
            self._idle.put_nowait(instance)

    @property
    def idle_count(self) -> int:
        return self._idle.qsize()

    async def acquire(self) -> ModelInstance:
        return await self._idle.get()

    def release(self, instance: ModelInstance) -> None:
        self._idle.put_nowait(instance)

    async def drain(self) -> None:
        """Wait until every instance is idle, i.e. no batch is executing."""
        taken = [await self._idle.get() for _ in self.instances]
        for instance in taken:
            self._idle.put_nowait(instance)

    def unload(self) -> None:
        for instance in self.instances:
            instance.unload()
