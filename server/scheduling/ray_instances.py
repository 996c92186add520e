"""Model instances whose backend object lives in a Ray actor, so one model's instances spread over a Ray cluster.

``modeldock serve --ray [ADDRESS]`` connects the server to a Ray cluster; from then on each instance of a model is
an actor that Ray's scheduler places on a node with the resources its ``instance_group`` asks for (one GPU for a
KIND_GPU instance, ``parameters.ray_num_cpus`` CPUs, default 1, for every instance). The front ends, the batcher
and the repository do not change: to them a ``RayModelInstance`` is a ``ModelInstance`` whose ``execute`` takes a
hop to another process, maybe another machine. ``parameters: {ray: "false"}`` keeps a model's instances in the
server's own process.

An actor loads the model from the same path the server found it at, so every Ray node needs the repository at
that path (one container image, or one shared volume) and ModelDock installed. An actor that dies (its process
killed, its node lost) fails only the batch it was running; the instance then starts a replacement, which Ray
places wherever resources are free, and the next batch waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.exceptions

from backends.base import Backend
from server.config import InstanceGroup, InstanceKind, ModelConfig
from server.devices import CPU, Device
from server.errors import BackendError, ConfigError, ModelDockError, ModelLoadError
from server.scheduling.instances import ModelInstance
from server.worker_processes import error_payload, rebuilt_error, worker_outputs

log = logging.getLogger(__name__)

# ``parameters`` keys a model may set.
RAY_PARAMETER = "ray"
RAY_NUM_CPUS_PARAMETER = "ray_num_cpus"

# Seconds an actor gets to build its backend when no load deadline applies (a replacement after a crash).
_START_TIMEOUT_S = 300.0
# Seconds an actor may take to start before the log says it is waiting for resources.
_PLACEMENT_WARNING_S = 10.0
# Seconds an actor gets to run ``unload`` before it is killed.
_UNLOAD_TIMEOUT_S = 30.0


class InstanceActor:
    """The body of one actor: one backend object in a Ray worker process.

    Errors travel back as ``error_payload`` tuples, as from worker processes, so user exception classes need not
    be importable on the server and a ``ModelDockError`` keeps its type (and HTTP/gRPC status).
    """

    def __init__(self, backend_path: str, config_json: str, version_dir: str, device_kind: str) -> None:
        self.backend: Backend | None = None
        self.error: tuple[str, str] | None = None
        try:
            module_name, _, attr = backend_path.partition(":")
            backend_cls = getattr(importlib.import_module(module_name), attr)
            config = ModelConfig.model_validate_json(config_json)
            # Ray narrows CUDA_VISIBLE_DEVICES to the GPU it gave this actor, which is therefore always index 0.
            self.backend = backend_cls(config, Path(version_dir), Device(device_kind, 0))
        except BaseException as exc:
            self.error = error_payload(exc)

    def started(self) -> tuple[tuple[str, str] | None, str, int]:
        """(the error building the backend, or None; the Ray node id; the process id): where the instance runs."""
        return self.error, ray.get_runtime_context().get_node_id(), os.getpid()

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> tuple[str, Any]:
        assert self.backend is not None
        try:
            return "ok", self.backend.execute(inputs, output_names)
        except Exception as exc:
            return "error", error_payload(exc)

    def unload(self) -> None:
        if self.backend is not None:
            self.backend.unload()


# Made remote once: each ``ray.remote`` call would export the class to the cluster again.
_RemoteInstanceActor = ray.remote(InstanceActor)


@dataclass(frozen=True, slots=True)
class ActorPlacement:
    """One instance as Ray resources: Ray, not the server, picks the node and the GPU."""

    name: str
    device: Device
    num_cpus: float
    num_gpus: float


def plan_actors(config: ModelConfig, backend_cls: type[Backend], cluster_gpus: float) -> list[ActorPlacement]:
    """Expand ``instance_group`` into actors. ``gpus`` lists device ids on one machine; on a cluster only how many
    there are counts (``count`` instances per listed GPU, as locally), and Ray chooses which GPUs they get."""
    num_cpus = _num_cpus(config)
    placements: list[ActorPlacement] = []
    for position, group in enumerate(config.instance_group or [InstanceGroup()]):
        group_name = group.name or f"{config.name}_{position}"
        kind = group.kind
        if kind == InstanceKind.KIND_AUTO:
            kind = InstanceKind.KIND_GPU if backend_cls.supports_gpu and cluster_gpus > 0 else InstanceKind.KIND_CPU
        if kind == InstanceKind.KIND_GPU:
            field = f"field 'instance_group[{position}].kind'"
            if not backend_cls.supports_gpu:
                raise ModelLoadError(
                    f"model '{config.name}': {field}: backend '{config.backend}' cannot run KIND_GPU instances"
                )
            if cluster_gpus <= 0:
                raise ModelLoadError(
                    f"model '{config.name}': {field}: KIND_GPU requested but the Ray cluster has no GPU"
                )
            for i in range(group.count * max(len(group.gpus), 1)):
                placements.append(ActorPlacement(f"{group_name}_{i}_gpu", Device("gpu", 0), num_cpus, 1.0))
        else:
            for i in range(group.count):
                placements.append(ActorPlacement(f"{group_name}_{i}", CPU, num_cpus, 0.0))
    return placements


def _num_cpus(config: ModelConfig) -> float:
    raw = config.parameters.get(RAY_NUM_CPUS_PARAMETER, "1")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(
            f"model '{config.name}': field 'parameters.{RAY_NUM_CPUS_PARAMETER}': expected a number >= 0, got '{raw}'"
        )
    return value


class RayModelInstance(ModelInstance):
    """One backend object in a Ray actor, behind ``ModelInstance``'s interface.

    A thread per instance submits batches and waits for them, so serializing tensors into Ray's object store
    never runs on the event loop, and a replacement for a dead actor is started on that same thread: the failed
    batch is answered at once and the next batch waits for the new actor.
    """

    def __init__(
        self,
        placement: ActorPlacement,
        config: ModelConfig,
        version_dir: Path,
        backend_cls: type[Backend],
        start_timeout_s: float,
    ) -> None:
        self.name = placement.name
        self.device = placement.device
        self.config = config
        self.placement = placement
        self._model_path = backend_cls.model_path(config, version_dir)
        self._args = (
            f"{backend_cls.__module__}:{backend_cls.__qualname__}",
            config.model_dump_json(),
            str(version_dir),
            placement.device.kind,
        )
        self._actor: Any = None
        # Where the current actor runs: (Ray node id, process id).
        self.location: tuple[str, int] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ray-instance-{placement.name}")
        try:
            self._start(start_timeout_s)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _start(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Create the actor and wait until its backend is built; ``ModelLoadError`` if it is not."""
        actor_class = _RemoteInstanceActor.options(
            num_cpus=self.placement.num_cpus,
            num_gpus=self.placement.num_gpus,
            # Replacing a dead actor is this class's job, so a crash is seen (and only its batch fails) here.
            max_restarts=0,
            scheduling_strategy="SPREAD",
        )
        actor = actor_class.remote(*self._args)
        where = f"{self._model_path}: instance {self.name} (Ray actor)"
        started = actor.started.remote()
        deadline = time.monotonic() + max(timeout_s, 0.0)
        try:
            ready, _ = ray.wait([started], timeout=min(_PLACEMENT_WARNING_S, max(timeout_s, 0.0)))
            if not ready and time.monotonic() < deadline:
                # Usually no node has the resources free: say so now rather than only at the load timeout, since
                # an autoscaling cluster may yet add a node and the wait goes on.
                log.warning(
                    "instance %s: waiting for Ray to place an actor needing %g CPU(s) and %g GPU(s); available now: %s",
                    self.name,
                    self.placement.num_cpus,
                    self.placement.num_gpus,
                    {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")},
                )
            error, node_id, pid = ray.get(started, timeout=max(deadline - time.monotonic(), 0.0))
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise ModelLoadError(
                f"{where}: not started within {timeout_s:.0f}s; does the Ray cluster have "
                f"{self.placement.num_cpus:g} CPU(s) and {self.placement.num_gpus:g} GPU(s) free for it?"
            ) from None
        except ray.exceptions.RayError as exc:
            ray.kill(actor)
            raise ModelLoadError(f"{where}: {type(exc).__name__}: {exc}") from None
        if error is not None:
            ray.kill(actor)
            known = rebuilt_error(error, ModelLoadError)
            if known is not None:
                raise known
            raise ModelLoadError(f"{where}: {error[0]}: {error[1]}")
        self._actor, self.location = actor, (node_id, pid)
        log.info("model '%s': instance %s runs on Ray node %s, process %d", self.config.name, self.name, node_id, pid)

    def _replace(self) -> None:
        try:
            self._start()
        except ModelDockError as exc:
            log.error("instance %s: no replacement actor: %s", self.name, exc.message)

    def _execute_blocking(
        self, inputs: Mapping[str, np.ndarray], output_names: list[str], timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        if self._actor is None:
            # The last replacement failed; try again rather than stay broken.
            try:
                self._start()
            except ModelDockError as exc:
                raise BackendError(
                    f"instance {self.name} has no Ray actor and cannot start one: {exc.message}"
                ) from None
        try:
            status, payload = ray.get(self._actor.execute.remote(dict(inputs), output_names), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            log.error("instance %s did not answer within %.1fs; killing its actor", self.name, timeout_s)
            ray.kill(self._actor)
            self._actor = self.location = None
            raise BackendError(
                f"model '{self.config.name}': instance {self.name} did not answer within {timeout_s:.1f}s"
            ) from None
        except ray.exceptions.RayActorError as exc:
            log.error("instance %s: its Ray actor died (%s); starting a replacement", self.name, type(exc).__name__)
            # Killed for good even if only unreachable for a while, so it cannot come back beside its replacement.
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self._actor)
            self._actor = self.location = None
            self._executor.submit(self._replace)
            raise BackendError(
                f"model '{self.config.name}': instance {self.name}: its Ray actor died; starting a replacement"
            ) from None
        except ray.exceptions.RayError as exc:  # the batch could not travel (object store full, object lost)
            raise BackendError(
                f"model '{self.config.name}': instance {self.name}: {type(exc).__name__}: {exc}"
            ) from None
        return worker_outputs(status, payload, self.config.name)

    async def execute(
        self, inputs: Mapping[str, np.ndarray], output_names: list[str], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._execute_blocking, inputs, output_names, timeout_s)

    def unload(self) -> None:
        self._executor.shutdown(wait=True)
        actor, self._actor = self._actor, None
        if actor is None:
            return
        try:
            ray.get(actor.unload.remote(), timeout=_UNLOAD_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            log.error("instance %s did not unload cleanly: %s", self.name, type(exc).__name__)
        ray.kill(actor)


class RayCluster:
    """The Ray cluster model instances run on; ``place_instances_remotely`` hands it to ``create_instances``."""

    def places(self, config: ModelConfig) -> bool:
        return config.bool_parameter(RAY_PARAMETER, True)

    def create(
        self, config: ModelConfig, version_dir: Path, backend_cls: type[Backend], deadline: float | None
    ) -> list[ModelInstance]:
        placements = plan_actors(config, backend_cls, ray.cluster_resources().get("GPU", 0.0))
        instances: list[ModelInstance] = []
        try:
            for placement in placements:
                timeout_s = _START_TIMEOUT_S if deadline is None else deadline - time.monotonic()
                instances.append(RayModelInstance(placement, config, version_dir, backend_cls, timeout_s))
        except BaseException:
            for instance in instances:
                instance.unload()
            raise
        return instances


def connect(address: str | None) -> RayCluster:
    """Join the Ray cluster at ``address`` (None: Ray's own choice: ``RAY_ADDRESS``, the cluster this machine
    already belongs to, or a new local one) and return it as the place for model instances."""
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    resources = ray.cluster_resources()
    log.info(
        "Ray cluster: %d node(s), %g CPU(s), %g GPU(s); model instances run as Ray actors",
        len([n for n in ray.nodes() if n.get("Alive")]),
        resources.get("CPU", 0.0),
        resources.get("GPU", 0.0),
    )
    return RayCluster()


def disconnect() -> None:
    ray.shutdown()
