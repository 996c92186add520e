"""What a load request may carry besides the model name: a config override, and model files to load from.

Both front ends decode their wire format with these, so HTTP and gRPC accept and refuse exactly the same things.

A client can load a model that is not in any repository folder by sending its files, keyed by their path inside
the model folder (``file:1/model.onnx``), together with the config. The files are written to a private temporary
folder shaped like a repository entry, so the load itself is the same as for a model on disk; the folder lives as
long as the model loaded from it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from server.errors import InvalidInput

FILE_PREFIX = "file:"
_STAGING_PREFIX = "modeldock-upload-"


def parse_config_override(value: Any) -> dict[str, Any]:
    """The ``config`` load parameter: a model config as JSON text (Triton's form) or an already-decoded object."""
    if isinstance(value, (str, bytes)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"load parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("load parameter 'config' must be a JSON object")
    return value


def check_file_key(key: str) -> str:
    """The path inside the model folder that a ``file:`` key names; it may not climb out of that folder."""
    relative = key.removeprefix(FILE_PREFIX)
    # An empty part also catches a leading "/" (an absolute path) and "a//b".
    if "\\" in relative or "\0" in relative or any(part in ("", ".", "..") for part in relative.split("/")):
        raise InvalidInput(
            f"load parameter '{key}': a file key is a path inside the model folder, such as 'file:1/model.onnx'"
        )
    return relative


def stage_model_files(name: str, files: Mapping[str, bytes]) -> Path:
    """Write the files into a new temporary ``<tmp>/<name>/`` folder and return that model folder."""
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise InvalidInput(f"model name '{name}' cannot name a model folder")
    relative_paths = {check_file_key(key): content for key, content in files.items()}
    root = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
    model_dir = root / name
    try:
        for relative, content in relative_paths.items():
            target = model_dir.joinpath(*relative.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def discard_staged(model_dir: Path) -> None:
    """Remove a folder made by ``stage_model_files`` (its temporary parent included), and nothing else."""
    if not model_dir.parent.name.startswith(_STAGING_PREFIX):
        raise ValueError(f"{model_dir} was not staged from uploaded files")
    shutil.rmtree(model_dir.parent, ignore_errors=True)
