"""Model files sent with a load request (Triton's ``file:`` parameters), written where a load can find them.

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

from server.errors import InvalidInput
from server.protocol.load_parameters import check_file_key

_STAGING_PREFIX = "modeldock-upload-"


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
