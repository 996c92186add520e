"""``server.protocol.chat_images``: the one decoder of chat ``image_url`` parts, and the operator's limits it applies
for every engine (checked end to end per engine in tests/frontends/test_vision_chat.py and
tests/backends/test_vllm_vision.py)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from server.errors import ConfigError, InvalidInput
from server.protocol.chat_images import ImageLimits, decode_message_images


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    pixels = (np.random.default_rng(seed).random((6, 9, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_images_are_decoded_in_order_and_replace_their_parts() -> None:
    first, second = picture(0), picture(1, "L")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image_part(data_url(first)), {"type": "text", "text": "and"}]},
        {"role": "user", "content": [image_part(data_url(second, "JPEG"))]},
    ]
    decoded, images = decode_message_images(messages, ImageLimits(), "m")
    assert [image.mode for image in images] == ["RGB", "RGB"]
    assert np.array_equal(np.asarray(images[0]), np.asarray(first))
    assert images[1].size == second.size
    assert decoded[0] == messages[0]
    assert decoded[1]["content"] == [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"}]
    assert decoded[2]["content"] == [{"type": "image", "image": images[1]}]


@pytest.mark.parametrize(
    ("limits", "url", "message"),
    [
        (ImageLimits(), "https://example.com/cat.png", "messages[0].content[0].image_url: remote image URLs are not"),
        (ImageLimits(max_image_bytes=10), data_url(picture(0)), "the image is over 10 bytes"),
        (ImageLimits(), "data:image/png;base64,@@", "not valid base64"),
        (ImageLimits(), "data:image/png," + "x", "must be base64"),
        (ImageLimits(), "file:///etc/passwd", "expected a data: or http(s): URL"),
        (ImageLimits(), "data:image/png;base64," + base64.b64encode(b"plain text").decode(), "not an image"),
    ],
)
def test_bad_images_are_refused_naming_the_part(limits: ImageLimits, url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_message_images([{"role": "user", "content": [image_part(url)]}], limits, "m")


def test_more_images_than_the_operator_allows_are_refused_before_any_is_decoded() -> None:
    # The third part is not even an image: the count is checked first.
    content = [image_part(data_url(picture(0))), image_part(data_url(picture(1))), image_part("data:,x")]
    with pytest.raises(InvalidInput, match=re.escape("3 images, over the 2 model 'm' takes in one request")):
        decode_message_images([{"role": "user", "content": content}], ImageLimits(max_images_per_request=2), "m")


def test_limits_come_from_config_parameters_and_bad_values_name_the_field() -> None:
    limits = ImageLimits.from_parameters(
        {"max_images_per_request": "3", "allow_remote_images": "true", "dtype": "float32"}, "m"
    )
    assert (limits.max_images_per_request, limits.allow_remote_images) == (3, True)
    assert limits.max_image_bytes == ImageLimits().max_image_bytes
    with pytest.raises(ConfigError, match=re.escape("model 'm': field 'parameters.max_images_per_request'")):
        ImageLimits.from_parameters({"max_images_per_request": "0"}, "m")
