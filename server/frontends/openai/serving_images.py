"""``POST /v1/images/generations``: OpenAI's image request turned into one KServe request to a text-to-image model.

The ``n`` images of a request are the rows of one batch (``prompt`` repeated, ``seed``, ``seed + 1``, ...), so they
go through the model's dynamic batcher and bounded queue like any client's; a full queue answers 503 at once.
Images come back as PNG, base64 in ``b64_json``. ``response_format: url`` is refused with a 400: the server keeps
no files to point a URL at. ``size`` must be the model's own (``parameters.width`` x ``height``), and ``n`` at most
the model's ``max_batch_size``.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import numpy as np
from fastapi.responses import Response

from server.core import InferenceServer
from server.errors import InvalidInput, ModelNotFound
from server.frontends.openai.errors import OpenAIRequestError
from server.frontends.openai.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from server.frontends.openai.serving_engine import ModelNotFoundError, request_id
from server.protocol.types import InferRequest, RequestedOutput

__all__ = ["ImageGenerationRequest", "OpenAIServingImages"]

TASK = "text-to-image"
PNG_OUTPUT = "png"
# Which request field a backend's complaint about one of its inputs is about.
_INPUT_FIELDS = {"width": "size", "height": "size"}
_INPUT_NAME = re.compile(r"input '(\w+)'")


class OpenAIServingImages:
    def __init__(self, core: InferenceServer) -> None:
        self.core = core

    def _model_config(self, model: str) -> dict[str, Any]:
        try:
            task = self.core.model_task(model)
        except ModelNotFound:
            raise ModelNotFoundError(model) from None
        if task != TASK:
            raise OpenAIRequestError(f"model '{model}' does not generate images (task '{task or 'none'}')", "model")
        return self.core.model_config(model)

    async def create(self, request: ImageGenerationRequest) -> Response:
        config = self._model_config(request.model)
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        size = f"{parameters['width']}x{parameters['height']}"
        if not request.prompt.strip():
            raise OpenAIRequestError("'prompt' must not be empty", "prompt")
        if request.response_format == "url":
            raise OpenAIRequestError(
                "'response_format' url is not offered: this server keeps no image files; use b64_json",
                "response_format",
            )
        if request.size is not None and request.size != size:
            raise OpenAIRequestError(
                f"'size' {request.size!r} cannot be made by model '{request.model}', which makes {size} images",
                "size",
            )
        limit = int(config.get("max_batch_size", 0)) or 1
        if request.n > limit:
            raise OpenAIRequestError(
                f"'n' {request.n} is over model '{request.model}''s limit of {limit} images per request", "n"
            )
        try:
            response = await self.core.infer(self._infer_request(request))
        except InvalidInput as exc:
            named = _INPUT_NAME.search(exc.message)
            param = _INPUT_FIELDS.get(named.group(1), named.group(1)) if named else None
            raise OpenAIRequestError(exc.message, param) from None
        images = response.outputs[PNG_OUTPUT].reshape(-1)
        body = ImagesResponse(
            data=[ImageData(b64_json=base64.b64encode(bytes(png)).decode("ascii")) for png in images], size=size
        )
        return Response(body.model_dump_json(exclude_none=True), media_type="application/json")

    @staticmethod
    def _infer_request(request: ImageGenerationRequest) -> InferRequest:
        n = request.n
        inputs: dict[str, np.ndarray] = {"prompt": np.array([[request.prompt.encode()]] * n, dtype=np.object_)}
        datatypes = {"prompt": "BYTES"}
        if request.negative_prompt is not None:
            inputs["negative_prompt"] = np.array([[request.negative_prompt.encode()]] * n, dtype=np.object_)
            datatypes["negative_prompt"] = "BYTES"
        if request.seed is not None:
            # Each image its own seed, so n seeded images differ yet each can be made again alone.
            inputs["seed"] = np.array([[(request.seed + i) % 2**63] for i in range(n)], dtype=np.int64)
            datatypes["seed"] = "INT64"
        if request.num_inference_steps is not None:
            inputs["num_inference_steps"] = np.full((n, 1), request.num_inference_steps, dtype=np.int32)
            datatypes["num_inference_steps"] = "INT32"
        if request.guidance_scale is not None:
            inputs["guidance_scale"] = np.full((n, 1), request.guidance_scale, dtype=np.float32)
            datatypes["guidance_scale"] = "FP32"
        return InferRequest(
            model_name=request.model,
            id=request_id("img"),
            inputs=inputs,
            input_datatypes=datatypes,
            outputs=[RequestedOutput(PNG_OUTPUT)],
        )
