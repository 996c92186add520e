"""Finds models on disk: ``<repository>/<model>/config.yaml`` and numbered version folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.config import CONFIG_FILENAME

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
            if not root.is_dir():
                problems[str(root)] = f"model repository {root} is not a directory"
                continue
            for entry in sorted(root.iterdir()):
                if not entry.is_dir() or entry.name.startswith((".", "_")):
                    continue
                if not (entry / CONFIG_FILENAME).exists() and not version_dirs(entry):
                    continue
                if entry.name in found:
                    problems[entry.name] = f"model '{entry.name}' is in both {found[entry.name].path} and {entry}"
                    continue
                found[entry.name] = ModelLocation(entry.name, entry)
        return found, problems

    def locate(self, name: str) -> ModelLocation | None:
        found, _ = self.scan()
        return found.get(name)


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Numbered sub-folders (``1/``, ``2/`` ...) of a model folder."""
    out: dict[int, Path] = {}
    if not model_dir.is_dir():
        return out
    for entry in model_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            out[int(entry.name)] = entry
    return out


def guess_backend(version_dir: Path) -> str:
    for filename, backend in MODEL_FILE_BACKENDS:
        if (version_dir / filename).exists():
            return backend
    return ""
