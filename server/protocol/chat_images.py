"""The images of a chat request: OpenAI ``image_url`` content parts decoded to RGB images under the operator's
limits, the same way for every engine that serves vision-language models (``backend: transformers``' own engine and
``backend: vllm``).

Data URLs (``data:image/png;base64,...``) are decoded here. Remote URLs are refused unless the model's
``parameters.allow_remote_images`` is true, since fetching them lets any client make the server open connections.
An image larger than ``parameters.max_image_bytes`` (20 MB by default) and a request with more images than
``parameters.max_images_per_request`` (8 by default) are refused too. Each refusal is ``InvalidInput`` naming the
content part (``messages[i].content[j].image_url``), so the client gets a 400 and the engine never sees the image.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import ConfigError, InvalidInput

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGES_PER_REQUEST = 8
REMOTE_FETCH_TIMEOUT_S = 10.0


class ImageLimits(BaseModel):
    """What a model's operator allows in one request's images (``parameters`` of the model's config)."""

    model_config = ConfigDict(extra="forbid")

    #: Bytes of one encoded image, before decoding.
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1)
    #: Images in one request, over all its messages.
    max_images_per_request: int = Field(default=DEFAULT_MAX_IMAGES_PER_REQUEST, ge=1)
    #: Whether ``http(s)://`` image URLs are fetched; off, only data URLs are taken.
    allow_remote_images: bool = False

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], model: str) -> ImageLimits:
        """The limits among a model's config ``parameters`` (text values); other keys are left to the backend."""
        values = {key: value for key, value in parameters.items() if key in cls.model_fields}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise ConfigError(f"model '{model}': field 'parameters.{where}': {error['msg']}") from None


#: The config parameters ``ImageLimits`` reads, so a backend that refuses unknown parameters can let them through.
IMAGE_LIMIT_PARAMETERS = frozenset(ImageLimits.model_fields)


def decode_message_images(
    messages: list[dict[str, Any]], limits: ImageLimits, model: str
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages with each ``image_url`` part replaced by ``{"type": "image", "image": <PIL image>}`` (the
    content shape Hugging Face chat templates and processors take), and the images in the order they appear.

    Blocking (decoding, and fetching where allowed): call it off the event loop.
    """
    count = sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    )
    if count > limits.max_images_per_request:
        raise InvalidInput(
            f"messages: {count} images, over the {limits.max_images_per_request} model '{model}' takes in one "
            "request (parameters.max_images_per_request)"
        )
    images: list[Any] = []
    decoded: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    image = decode_image_url(
                        part.get("image_url"), f"messages[{i}].content[{j}].image_url", limits, model
                    )
                    images.append(image)
                    parts.append({"type": "image", "image": image})
                else:
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
            content = parts
        decoded.append({**message, "content": content})
    return decoded, images


def decode_image_url(image_url: Any, where: str, limits: ImageLimits, model: str) -> Any:
    """A data URL (or, where allowed, a remote URL) decoded to an RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{where}: expected an object with a 'url'")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise InvalidInput(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise InvalidInput(f"{where}: the image is over {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: the data URL is not valid base64") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise InvalidInput(
                f"{where}: remote image URLs are not allowed on model '{model}'; send the image as a data URL (the "
                "operator may allow remote URLs with parameters.allow_remote_images)"
            )
        data = _fetch(url, where, limits)
    else:
        raise InvalidInput(f"{where}: expected a data: or http(s): URL")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{where}: not an image that can be decoded: {exc}") from None


def _fetch(url: str, where: str, limits: ImageLimits) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=REMOTE_FETCH_TIMEOUT_S, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise InvalidInput(f"{where}: the image is over {limits.max_image_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"{where}: the image could not be fetched: {exc}") from None
