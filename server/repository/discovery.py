"""Finds models on disk: ``<repository>/<model>/config.yaml`` and numbered version folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.config import CONFIG_FILENAME
from server.errors import ModelLoadError

# Files that mark a version folder's model when the config names no backend, in order of preference.
MODEL_FILE_BACKENDS: tuple[tuple[str, str], ...] = (
    ("model.onnx", "onnxruntime"),
    ("model.plan", "tensorrt"),
    ("model.pt2", "pytorch"),
    ("model.pt", "pytorch"),
    ("model.py", "python"),
)


@dataclass(frozen=True, slots=True)
class ModelLocation:
    name: str
    path: Path


class ModelRepository:
    """One or more repository folders; a model name must be unique across them."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def scan(self) -> tuple[dict[str, ModelLocation], dict[str, str]]:
        """Models found, and problems (model name -> reason) such as a name present in two repositories."""
        found: dict[str, ModelLocation] = {}
        problems: dict[str, str] = {}
        for root in self.roots:
            try:
                entries = sorted(root.iterdir()) if root.is_dir() else None
            except OSError as exc:
                problems[str(root)] = f"model repository {root} cannot be read: {exc.strerror or exc}"
                continue
            if entries is None:
                problems[str(root)] = f"model repository {root} is not a directory"
                continue
            for entry in entries:
                try:
                    if not entry.is_dir() or entry.name.startswith((".", "_")):
                        continue
                    if not (entry / CONFIG_FILENAME).exists() and not _has_numbered_folder(entry):
                        continue
                except OSError as exc:  # an unreadable folder is that model's problem, not the whole scan's
                    problems[entry.name] = f"{entry}: cannot be read: {exc.strerror or exc}"
                    continue
                if entry.name in found:
                    problems[entry.name] = f"model '{entry.name}' is in both {found[entry.name].path} and {entry}"
                    continue
                found[entry.name] = ModelLocation(entry.name, entry)
        return found, problems

    def locate(self, name: str) -> ModelLocation | None:
        found, _ = self.scan()
        return found.get(name)


def _has_numbered_folder(model_dir: Path) -> bool:
    return any(entry.name.isascii() and entry.name.isdigit() and entry.is_dir() for entry in model_dir.iterdir())


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Numbered sub-folders (``1/``, ``2/`` ...) of a model folder.

    Raises ``ModelLoadError`` when two folders name the same version (``1/`` and ``01/``): which one would be
    served would depend on the order the file system lists them in.
    """
    out: dict[int, Path] = {}
    if not model_dir.is_dir():
        return out
    for entry in sorted(model_dir.iterdir()):
        if entry.is_dir() and entry.name.isascii() and entry.name.isdigit():
            version = int(entry.name)
            if version in out:
                raise ModelLoadError(
                    f"{model_dir}: version folders '{out[version].name}' and '{entry.name}' are both version "
                    f"{version}; keep one"
                )
            out[version] = entry
    return out


def no_versions_reason(model_dir: Path) -> str:
    """Why a model folder has no version to load, naming the folders that were not taken for versions."""
    reason = f"no numbered version folders (e.g. {model_dir}/1/)"
    try:
        ignored = sorted(e.name for e in model_dir.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return reason
    if ignored:
        reason += f"; ignored folders {ignored}: a version folder's name is a non-negative integer"
    return reason


def guess_backend(version_dir: Path) -> str:
    for filename, backend in MODEL_FILE_BACKENDS:
        if (version_dir / filename).exists():
            return backend
    return ""
