"""What loading and serving an ensemble needs from the repository: its step models.

Loading an ensemble loads the step models it names that are not loaded yet (as Triton does in explicit mode),
then checks its graph against their completed configs. While it serves, it is ready only as long as every step
model is, so a client sees at once that a pipeline cannot run rather than a failure half-way through it.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import CONFIG_FILENAME, ModelConfig, load_model_config
from server.errors import ConfigError, ModelDockError, ModelNotReady
from server.scheduling.ensemble_scheduler import check_ensemble

if TYPE_CHECKING:
    from server.repository.model_manager import ModelManager

# The ensembles whose load is waiting, in this task, on the load of a step model: a step model already in it
# would wait for itself.
_loading: ContextVar[tuple[str, ...]] = ContextVar("ensembles_loading", default=())


def declares_ensemble(model_dir: Path) -> bool:
    """Whether a model folder's config says ``platform: ensemble`` (a broken config is reported by its own load)."""
    try:
        return load_model_config(model_dir).is_ensemble
    except ModelDockError:
        return False


async def prepare_ensemble(manager: ModelManager, config: ModelConfig, model_dir: Path) -> None:
    """Load the step models that are not loaded, then check the ensemble's graph against their configs."""
    assert config.ensemble_scheduling is not None
    source = str(model_dir / CONFIG_FILENAME)
    chain = (*_loading.get(), config.name)
    steps = config.ensemble_scheduling.step
    step_configs: dict[int, ModelConfig] = {}
    for position, step in enumerate(steps):
        where = f"{source}: field 'ensemble_scheduling.step[{position}]': step {position} (model '{step.model_name}')"
        if step.model_name in chain:
            raise ConfigError(f"{where}: the ensembles {list(chain)} include each other")
        if not manager.is_ready(step.model_name):
            if manager.repository.locate(step.model_name) is None and step.model_name not in manager.records:
                raise ConfigError(f"{where}: no such model in the model repository")
            token = _loading.set(chain)
            try:
                await _load_unless_loading(manager, step.model_name)
            except ModelDockError as exc:
                raise ConfigError(f"{where}: the model failed to load: {exc.message}") from None
            finally:
                _loading.reset(token)
        version = "" if step.model_version == -1 else str(step.model_version)
        try:
            served = manager.get(step.model_name, version)
        except ModelDockError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        if _reaches(manager, served.config, config.name, set()):
            raise ConfigError(f"{where}: that ensemble runs '{config.name}' itself, so the two include each other")
        step_configs[position] = served.config
    check_ensemble(config, step_configs, source)


async def _load_unless_loading(manager: ModelManager, name: str) -> None:
    """Load ``name`` unless a load of it is under way, in which case wait for that one."""
    lock = manager.model_lock(name)
    if lock.locked():
        async with lock:
            pass
        if manager.is_ready(name):
            return
    await manager.load(name)


def _reaches(manager: ModelManager, config: ModelConfig, target: str, seen: set[str]) -> bool:
    """Whether an ensemble step (through nested loaded ensembles) runs the model named ``target``."""
    if config.ensemble_scheduling is None or config.name in seen:
        return False
    seen.add(config.name)
    for step in config.ensemble_scheduling.step:
        if step.model_name == target:
            return True
        record = manager.records.get(step.model_name)
        if record is not None and record.config is not None and _reaches(manager, record.config, target, seen):
            return True
    return False


def check_steps_ready(manager: ModelManager, config: ModelConfig) -> None:
    """Raise ``ModelNotReady`` naming the first step model that cannot serve now."""
    assert config.ensemble_scheduling is not None
    for step in config.ensemble_scheduling.step:
        version = "" if step.model_version == -1 else str(step.model_version)
        try:
            manager.get(step.model_name, version)
        except ModelDockError as exc:
            raise ModelNotReady(
                f"ensemble '{config.name}': step model '{step.model_name}' is not ready: {exc.message}"
            ) from None


async def gather_ensembles_last(manager: ModelManager, names: list[str], paths: dict[str, Path]) -> None:
    """Load ``names`` concurrently, ensembles after the models they may run, so none loads a step model twice."""
    ensembles = await asyncio.to_thread(lambda: {n for n in names if declares_ensemble(paths[n])})
    await asyncio.gather(*(manager.load(n) for n in names if n not in ensembles), return_exceptions=True)
    await asyncio.gather(*(manager.load(n) for n in names if n in ensembles), return_exceptions=True)
