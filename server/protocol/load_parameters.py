"""What a load request may carry besides the model name: a config override, and model files keyed by path.

Both front ends decode their wire format with these, so HTTP and gRPC accept and refuse exactly the same things.
Writing the files to disk is the repository's business (``server.repository.uploads``); here they are only parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.errors import InvalidInput

FILE_PREFIX = "file:"


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
