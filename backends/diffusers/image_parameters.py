"""The image settings a request may send as parameters instead of tensors, turned into the model's input tensors.

A KServe v2 request (HTTP ``parameters``, gRPC ``InferParameter``) may carry ``seed``, ``num_inference_steps``,
``guidance_scale``, ``negative_prompt``, ``size`` (``"WxH"``), ``width``, ``height`` and ``n``; so does the OpenAI
images route, which sends its request's fields this way. This is the one place they are read: each becomes the
input tensor of the same name (one value per row), so what reaches the pipeline is the same whichever way a
setting came, and the batcher merges such requests as it merges any others.

``n`` makes ``n`` images of each prompt: every input row is repeated ``n`` times. Seeds then differ per image, so
the images differ yet each can be made again alone: with a ``seed`` parameter, image ``k`` of the request (prompt
by prompt) gets ``seed + k``; with a ``seed`` input, copy ``i`` of a row gets that row's seed ``+ i``. A model
makes one size of image (see ``backend.py``), so ``size``, ``width`` and ``height`` are checked against it and
need no tensor. A bad value, or a setting sent both as an input and as a parameter, is an ``InvalidInput`` naming
the parameter; other parameters (``priority``, ``timeout``, ...) are left to the server.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.config import ModelConfig
from server.errors import InvalidInput
from server.protocol.types import InferRequest

SIZE = re.compile(r"^(\d+)x(\d+)$")
# Each setting's input tensor datatype (KServe name) and numpy type.
_TENSORS: dict[str, tuple[str, Any]] = {
    "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "negative_prompt": ("BYTES", np.object_),
}


class ImageParameters(BaseModel):
    """The request parameters an image model acts on. Strict: ``"5"`` is not a step count and ``true`` not a seed;
    a number given as an integer is taken as a guidance scale."""

    model_config = ConfigDict(extra="ignore", strict=True)

    seed: int | None = Field(default=None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(default=None, ge=1, lt=2**31)
    guidance_scale: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    negative_prompt: str | None = None
    size: str | None = Field(default=None, pattern=SIZE.pattern)
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)


NAMES = frozenset(ImageParameters.model_fields)


def _parse(parameters: dict[str, Any]) -> ImageParameters:
    try:
        return ImageParameters.model_validate({k: v for k, v in parameters.items() if k in NAMES})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        raise InvalidInput(
            f"request parameter '{name}': {first['msg']}, got {parameters.get(name)!r}"
            + (" (write it as WIDTHxHEIGHT, e.g. 512x512)" if name == "size" else "")
        ) from None


def _check_size(config: ModelConfig, settings: ImageParameters) -> None:
    width, height = int(config.parameters["width"]), int(config.parameters["height"])
    asked: list[tuple[str, object, object]] = [("width", settings.width, width), ("height", settings.height, height)]
    if settings.size is not None:
        asked.append(("size", settings.size, f"{width}x{height}"))
    for name, value, made in asked:
        if value is not None and value != made:
            raise InvalidInput(
                f"request parameter '{name}': model '{config.name}' makes {width}x{height} images (width x height), "
                f"got {value}"
            )


def apply_image_parameters(config: ModelConfig, request: InferRequest) -> None:
    """Move the image settings among ``request.parameters`` into its inputs (see the module's docstring)."""
    parameters = request.parameters
    if not NAMES.intersection(parameters):
        return
    settings = _parse(parameters)
    _check_size(config, settings)
    prompt = request.inputs.get("prompt")
    if prompt is None or prompt.ndim < 1:
        return  # validation names the missing or misshapen prompt
    rows = int(prompt.shape[0])
    n = settings.n
    limit = config.max_batch_size or 1
    if rows * n > limit:
        raise InvalidInput(
            f"request parameter 'n': {n} images of {rows} prompt(s) is over model '{config.name}''s limit of "
            f"{limit} images per request (max_batch_size)"
        )
    values = settings.model_dump(include=set(_TENSORS), exclude_none=True)
    for name in values:
        if name in request.inputs:
            raise InvalidInput(f"request parameter '{name}': also given as input '{name}'; send one of them")
    if n > 1:
        for name, array in list(request.inputs.items()):
            request.inputs[name] = np.repeat(array, n, axis=0)
        seeds = request.inputs.get("seed")
        if seeds is not None:
            offsets = np.tile(np.arange(n, dtype=np.int64), rows).reshape((rows * n,) + (1,) * (seeds.ndim - 1))
            # Wrapping at 2**64 as int64 does is what the backend's ``seed % 2**64`` sees anyway.
            request.inputs["seed"] = seeds.astype(np.int64) + offsets
    count = rows * n
    for name, value in values.items():
        datatype, numpy_type = _TENSORS[name]
        if name == "seed":
            column: list[Any] = [(value + k) % 2**63 for k in range(count)]
        else:
            column = [value.encode() if isinstance(value, str) else value] * count
        request.inputs[name] = np.array(column, dtype=numpy_type).reshape(count, 1)
        request.input_datatypes[name] = datatype
