"""``modeldock validate``: checks model repositories the way a load would, without starting a server.

Every check a load makes before creating instances runs here (config schema, backend, version folders, version
policy, model files, auto-complete, warm-up samples), and each backend checks its model files against the config
(``Backend.check_model``: the runtime opens the file on the CPU; Python code is imported in a throw-away process
but its model is not created), and an ensemble's graph is checked against its step models' completed configs,
so a repository can be checked in CI or before a copy into a watched folder. Checks keep going after a problem where they can, to report several problems in one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backends.base import Backend, backend_class
from server.config import CONFIG_FILENAME, ModelConfig, load_model_config
from server.errors import ModelDockError
from server.extensions.classification import load_labels
from server.repository.discovery import (
    MODEL_FILE_BACKENDS,
    ModelRepository,
    guess_backend,
    no_versions_reason,
    version_dirs,
)
from server.repository.model_manager import prepare_model
from server.repository.warmup import warmup_request
from server.scheduling.ensemble_scheduler import check_ensemble
from server.scheduling.sequence_batcher import initial_states


@dataclass(frozen=True, slots=True)
class Problem:
    model: str
    file: str
    reason: str


def _problem(model: str, path: Path, message: str) -> Problem:
    """A problem whose reason does not repeat the file name already shown in its own column."""
    for prefix in (f"{path}: ", f"{path.parent}: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    return Problem(model, str(path), message)


def model_files(config: ModelConfig, backend_cls: type[Backend], version_dir: Path) -> list[Path]:
    """The files a version folder may hold for its backend; any one of them is enough."""
    candidates = [backend_cls.model_path(config, version_dir)]
    if not config.default_model_filename:
        candidates += [version_dir / name for name, backend in MODEL_FILE_BACKENDS if backend == config.backend]
        candidates += [version_dir / name for name in backend_cls.alternative_model_filenames]
    return candidates


def validate_model(model_dir: Path) -> list[Problem]:
    try:
        return _validate_model(model_dir)
    except Exception as exc:  # a check's own bug: one model's problem, and the other models still get checked
        return [Problem(model_dir.name, str(model_dir), f"cannot be checked: {type(exc).__name__}: {exc}")]


def _validate_model(model_dir: Path) -> list[Problem]:
    name = model_dir.name
    config_path = model_dir / CONFIG_FILENAME
    try:
        config = load_model_config(model_dir)
    except ModelDockError as exc:
        return [_problem(name, config_path, exc.message)]

    try:
        available = version_dirs(model_dir)
    except ModelDockError as exc:
        return [_problem(name, model_dir, exc.message)]
    if not available:
        return [_problem(name, model_dir, no_versions_reason(model_dir))]
    selected = config.version_policy.select(list(available))
    if not selected:
        return [
            _problem(name, config_path, f"field 'version_policy': selects none of the versions {sorted(available)}")
        ]
    newest = available[max(selected)]
    if config.is_ensemble:  # no model files; its graph is checked against its step models separately
        return []

    if not config.backend:
        config.backend = guess_backend(newest)
        if not config.backend:
            return [_problem(name, config_path, f"field 'backend': not set and no known model file in {newest}")]
    try:
        backend_cls = backend_class(config.backend)
    except ModelDockError as exc:
        return [_problem(name, config_path, exc.message)]

    problems: list[Problem] = []
    for version in sorted(selected):
        candidates = model_files(config, backend_cls, available[version])
        if not any(path.is_file() for path in candidates):
            names = " or ".join(sorted({path.name for path in candidates}))
            problems.append(_problem(name, available[version], f"model file {names} not found"))
    if problems:
        return problems

    try:
        config = backend_cls.auto_complete_config(config, newest)
    except ModelDockError as exc:
        return [_problem(name, newest, exc.message)]
    except Exception as exc:  # the backend cannot read the model file: exactly what a load would hit
        return [_problem(name, newest, f"{type(exc).__name__}: {exc}")]
    if not config.input or not config.output:
        return [_problem(name, config_path, "field 'input'/'output': not given and the backend cannot infer them")]
    for version in sorted(selected):
        try:
            backend_cls.check_model(config, available[version])
        except ModelDockError as exc:
            blamed = config_path if exc.message.startswith(f"{config_path}: ") else available[version]
            problems.append(_problem(name, blamed, exc.message))
        except Exception as exc:  # the runtime cannot read the model file: exactly what a load would hit
            problems.append(_problem(name, available[version], f"{type(exc).__name__}: {exc}"))

    try:
        load_labels(config, model_dir)
    except ModelDockError as exc:
        problems.append(_problem(name, config_path, exc.message))
    if config.sequence_batching is not None:
        try:
            initial_states(config, model_dir)
        except ModelDockError as exc:
            problems.append(_problem(name, config_path, exc.message))
    for position, sample in enumerate(config.model_warmup):
        try:
            warmup_request(config, sample, model_dir)
        except ModelDockError as exc:
            problems.append(
                _problem(name, config_path, f"field 'model_warmup[{position}]' ('{sample.name}'): {exc.message}")
            )
    return problems


def validate_repositories(roots: list[Path]) -> tuple[list[str], list[Problem]]:
    """The models checked and every problem found, across all repository folders."""
    repository = ModelRepository(roots)
    found, scan_problems = repository.scan()
    # Scan problems are keyed by model name, or by the repository path when the folder itself is the problem.
    problems = [
        Problem("", name, reason) if "/" in name else Problem(name, "", reason)
        for name, reason in scan_problems.items()
    ]
    if not found and not scan_problems:
        problems.append(Problem("", ", ".join(str(r) for r in repository.roots), "no models found"))
    for _, location in sorted(found.items()):
        problems += validate_model(location.path)
    checked = {p.model for p in problems}
    for name, location in sorted(found.items()):
        if name not in checked:
            problems += _validate_ensemble(location.path, {n: loc.path for n, loc in found.items()})
    return sorted(found), problems


def _validate_ensemble(model_dir: Path, models: dict[str, Path]) -> list[Problem]:
    """An ensemble's graph, checked as a load checks it: against its step models' completed configs."""
    config_path = model_dir / CONFIG_FILENAME
    config = load_model_config(model_dir)
    if config.ensemble_scheduling is None:
        return []
    step_configs: dict[int, ModelConfig] = {}
    for position, step in enumerate(config.ensemble_scheduling.step):
        where = f"field 'ensemble_scheduling.step[{position}]': step {position} (model '{step.model_name}')"
        step_dir = models.get(step.model_name)
        if step_dir is None:
            return [Problem(model_dir.name, str(config_path), f"{where}: no such model in the model repository")]
        try:
            step_config, _, selected = prepare_model(step_dir)
        except ModelDockError as exc:
            return [Problem(model_dir.name, str(config_path), f"{where}: the model cannot load: {exc.message}")]
        if step.model_version != -1 and step.model_version not in selected:
            message = f"{where}: version {step.model_version} is not among the versions served {sorted(selected)}"
            return [Problem(model_dir.name, str(config_path), message)]
        step_configs[position] = step_config
    try:
        check_ensemble(config, step_configs, str(config_path))
    except ModelDockError as exc:
        return [_problem(model_dir.name, config_path, exc.message)]
    return []
