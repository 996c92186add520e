"""Vision chat end to end: ``image_url`` content parts through ``/v1/chat/completions`` to a tiny random-weight
Idefics3 (SmolVLM's architecture) built at test time with its processor, served by ``backend: transformers``. Each
greedy answer is checked against transformers' own ``generate`` on the same image and messages.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from model_repository.language_models import build_causal_lm
from model_repository.vision_language_models import build_vision_language_model
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

VLM = "looker"
TEXT_ONLY = "tiny_gpt"
MAX_TOKENS = 12
QUESTION = "What is in this picture?"


def png(seed: int, width: int, height: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def user_message(image: bytes, question: str = QUESTION) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}],
    }


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_language_model(tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture(scope="module")
def vision_server(
    start_server: Callable[..., ServerProcess], vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("vision-repo")
    (repository / VLM / "1").mkdir(parents=True)
    (repository / VLM / "config.yaml").write_text(f"backend: transformers\nparameters:\n  model_path: {vlm_dir}\n")
    build_causal_lm(repository / TEXT_ONLY / "1")
    (repository / TEXT_ONLY / "config.yaml").write_text("backend: transformers\n")
    # Loading torch, the pipeline and the models takes a while on a busy machine.
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in (VLM, TEXT_ONLY)):
            return server
        if "UNAVAILABLE" in states.values():
            break
        time.sleep(0.2)
    raise RuntimeError(f"models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def client(vision_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference_model(vlm_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    return processor, model


def reference_answer(reference_model: tuple[Any, Any], image: bytes, question: str = QUESTION) -> str:
    """transformers' own greedy answer for one image and question, as the processor's chat template renders them."""
    import torch

    processor, model = reference_model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    inputs = processor(text=[prompt], images=[[picture]], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_answer_equals_transformers_generate(client: openai.OpenAI, reference_model: tuple[Any, Any]) -> None:
    image = png(0, 64, 48)
    response = client.chat.completions.create(
        model=VLM, messages=[user_message(image)], temperature=0, max_tokens=MAX_TOKENS
    )
    answer = response.choices[0].message.content
    assert answer == reference_answer(reference_model, image)
    assert response.usage.completion_tokens <= MAX_TOKENS
    # A different picture changes the answer: the image reaches the model.
    other = client.chat.completions.create(
        model=VLM, messages=[user_message(png(1, 30, 40))], temperature=0, max_tokens=MAX_TOKENS
    )
    assert other.choices[0].message.content == reference_answer(reference_model, png(1, 30, 40))
    assert other.choices[0].message.content != answer


def test_streamed_deltas_join_to_the_answer(client: openai.OpenAI, reference_model: tuple[Any, Any]) -> None:
    image = png(2, 50, 50)
    stream = client.chat.completions.create(
        model=VLM, messages=[user_message(image)], temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference_answer(reference_model, image)


async def test_concurrent_requests_each_get_their_own_answer(
    vision_server: ServerProcess, reference_model: tuple[Any, Any]
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{vision_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    images = [png(10 + i, 32 + 8 * i, 40) for i in range(3)]
    responses = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=VLM, messages=[user_message(image)], temperature=0, max_tokens=MAX_TOKENS
            )
            for image in images
        )
    )
    for image, response in zip(images, responses, strict=True):
        assert response.choices[0].message.content == reference_answer(reference_model, image)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "remote image URLs are not allowed"),
        ("data:image/png;base64,@@@not-base64", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not an image"),
        ("data:image/png,rawbytes", "must be base64"),
        ("file:///etc/passwd", "expected a data: or http(s): URL"),
    ],
)
def test_bad_images_are_refused(client: openai.OpenAI, url: str, message: str) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model=VLM, messages=messages, max_tokens=4)


def test_an_image_part_without_a_url_is_refused_by_field(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=VLM, messages=messages, max_tokens=4)
    assert caught.value.body["param"] == "messages.0.content.0"


def test_a_text_only_model_given_an_image_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=f"model '{TEXT_ONLY}' reads text only"):
        client.chat.completions.create(model=TEXT_ONLY, messages=[user_message(png(0, 8, 8))], max_tokens=4)
    # Both models keep serving.
    assert client.chat.completions.create(
        model=TEXT_ONLY, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    ).choices
    answer = client.chat.completions.create(
        model=VLM, messages=[user_message(png(3, 20, 20))], temperature=0, max_tokens=3
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_unoffered_sampling_fields_are_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not offer 'logprobs'"):
        client.chat.completions.create(model=VLM, messages=[user_message(png(0, 8, 8))], max_tokens=2, logprobs=True)
