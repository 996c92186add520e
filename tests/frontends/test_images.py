"""``POST /v1/images/generations`` end to end: the real server on a tiny random-weight Stable Diffusion pipeline
built at test time, and the official ``openai`` client. The PNGs it returns hold, pixel for pixel, what the diffusers
pipeline makes on the CPU for the same prompt, settings and seeds.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from model_repository.diffusion_models import IMAGE_SIZE, build_text_to_image_pipeline
from model_repository.language_models import build_encoder
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "painter"
EMBEDDER = "embedder"
STEPS = 3
MAX_BATCH = 3


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_to_image_pipeline(tmp_path_factory.mktemp("diffusion") / "pipeline")


@pytest.fixture(scope="module")
def images_server(
    start_server: Callable[..., ServerProcess], pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    repository = tmp_path_factory.mktemp("images-repo")
    (repository / MODEL / "1").mkdir(parents=True)
    (repository / MODEL / "config.yaml").write_text(
        f"backend: diffusers\nmax_batch_size: {MAX_BATCH}\n"
        f"parameters:\n  model_path: {pipeline_dir}\n  num_inference_steps: {STEPS}\n"
    )
    build_encoder(repository / EMBEDDER / "1")
    (repository / EMBEDDER / "config.yaml").write_text("backend: transformers\nparameters:\n  task: embed\n")
    # Loading torch, the pipeline and the models takes a while on a busy machine.
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in (MODEL, EMBEDDER)):
            return server
        if "UNAVAILABLE" in states.values():
            break
        time.sleep(0.2)
    raise RuntimeError(f"models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def client(images_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{images_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipeline(pipeline_dir: Path) -> Any:
    from diffusers import AutoPipelineForText2Image

    loaded = AutoPipelineForText2Image.from_pretrained(pipeline_dir, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def reference(pipeline: Any, prompt: str, seeds: list[int], steps: int = STEPS, **settings: Any) -> np.ndarray:
    import torch

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    made = pipeline([prompt] * len(seeds), generator=generators, num_inference_steps=steps, **settings)
    return np.stack([np.asarray(image) for image in made.images])


def decoded(response: Any) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")) for item in response.data]
    )


def test_images_equal_the_pipelines_for_the_same_seeds(client: openai.OpenAI, pipeline: Any) -> None:
    response = client.images.generate(
        model=MODEL, prompt="a lighthouse at dusk", n=2, size=f"{IMAGE_SIZE}x{IMAGE_SIZE}", extra_body={"seed": 11}
    )
    images = decoded(response)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    # Image i is made with seed + i.
    np.testing.assert_array_equal(images, reference(pipeline, "a lighthouse at dusk", [11, 12]))
    assert not np.array_equal(images[0], images[1])


def test_extensions_reach_the_pipeline(client: openai.OpenAI, pipeline: Any) -> None:
    response = client.images.generate(
        model=MODEL,
        prompt="a bowl of fruit",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2, "guidance_scale": 3.0, "negative_prompt": "blurry"},
    )
    expected = reference(pipeline, "a bowl of fruit", [5], steps=2, guidance_scale=3.0, negative_prompt=["blurry"])
    np.testing.assert_array_equal(decoded(response), expected)


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a cat", "size": "1024x1024"}, "size"),
        ({"prompt": "a cat", "size": "big"}, "size"),
        ({"prompt": "a cat", "n": MAX_BATCH + 1}, "n"),
        ({"prompt": "a cat", "n": 0}, "n"),
        ({"prompt": "a cat", "response_format": "url"}, "response_format"),
        ({"prompt": "a cat", "extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"prompt": "a cat", "extra_body": {"num_inference_steps": 10**6}}, "num_inference_steps"),
        ({"prompt": "a cat", "extra_body": {"guidance_scale": -2}}, "guidance_scale"),
        ({"prompt": "a cat", "extra_body": {"seed": -1}}, "seed"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(client: openai.OpenAI, arguments: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, **arguments)
    assert caught.value.body["param"] == param, caught.value.body


def test_a_model_that_does_not_draw_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=f"model '{EMBEDDER}' does not generate images") as caught:
        client.images.generate(model=EMBEDDER, prompt="a cat")
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no_such_model", prompt="a cat")


def test_the_image_model_is_listed(client: openai.OpenAI) -> None:
    assert MODEL in {model.id for model in client.models.list().data}
    assert client.models.retrieve(MODEL).id == MODEL


def test_the_server_keeps_serving_after_bad_requests(client: openai.OpenAI) -> None:
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.images.generate(model=MODEL, prompt="   ")
    response = client.images.generate(model=MODEL, prompt="a cat")
    assert decoded(response).shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
