"""``POST /v1/images/generations``: OpenAI's image request turned into one KServe request to a text-to-image model.

The ``n`` images of a request are the rows of one batch (``prompt`` repeated, ``seed``, ``seed + 1``, ...), so they
go through the model's dynamic batcher and bounded queue like any client's; a full queue answers 503 at once.
Images come back as PNG, base64 in ``b64_json``. ``response_format: url`` is refused with a 400: the server keeps
no files to point a URL at. ``size`` must be the model's own (``parameters.width`` x ``height``), and ``n`` at most
the model's ``max_batch_size``: the model itself checks both, with the other settings, as it checks a KServe
client's request parameters.
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
# The request field a model's complaint is about: its parameters and inputs carry the fields' own names.
_SETTING_NAME = re.compile(r"(?:request parameter|input) '(\w+)'")
# The request's fields the model reads as request parameters, by the names it reads them under.
_SETTINGS = ("n", "size", "seed", "num_inference_steps", "guidance_scale", "negative_prompt")


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
        try:
            response = await self.core.infer(self._infer_request(request))
        except InvalidInput as exc:
            named = _SETTING_NAME.search(exc.message)
            raise OpenAIRequestError(exc.message, named.group(1) if named else None) from None
        images = response.outputs[PNG_OUTPUT].reshape(-1)
        body = ImagesResponse(
            data=[ImageData(b64_json=base64.b64encode(bytes(png)).decode("ascii")) for png in images], size=size
        )
        return Response(body.model_dump_json(exclude_none=True), media_type="application/json")

    @staticmethod
    def _infer_request(request: ImageGenerationRequest) -> InferRequest:
        """The prompt as the one input row; ``n``, ``size`` and the diffusion settings as request parameters, which
        the model reads exactly as it reads a KServe client's (``backends/diffusers/image_parameters.py``), so the
        two ways in cannot drift apart."""
        settings = {name: getattr(request, name) for name in _SETTINGS if getattr(request, name) is not None}
        return InferRequest(
            model_name=request.model,
            id=request_id("img"),
            inputs={"prompt": np.array([[request.prompt.encode()]], dtype=np.object_)},
            input_datatypes={"prompt": "BYTES"},
            outputs=[RequestedOutput(PNG_OUTPUT)],
            parameters=settings,
        )
