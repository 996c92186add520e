"""``backend: diffusers`` end to end: a tiny random-weight Stable Diffusion pipeline folder built at test time, the
real server, and ``tritonclient`` over HTTP and gRPC. Every image is checked pixel for pixel against what the
diffusers pipeline itself makes on the CPU with the same prompt, settings and seed.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from model_repository.diffusion_models import IMAGE_SIZE, build_text_to_image_pipeline
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "painter"
ONE_AT_A_TIME = "painter_one_at_a_time"
STEPS = 3


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_to_image_pipeline(tmp_path_factory.mktemp("diffusion") / "pipeline")


@pytest.fixture(scope="module")
def diffusion_server(start_server: Callable[..., ServerProcess], pipeline_dir: Path, tmp_path_factory) -> ServerProcess:
    repository = tmp_path_factory.mktemp("diffusion-repo")
    (repository / MODEL / "1").mkdir(parents=True)
    (repository / MODEL / "config.yaml").write_text(
        f"backend: diffusers\nparameters:\n  model_path: {pipeline_dir}\n  num_inference_steps: {STEPS}\n"
    )
    # One image at a time and one waiting: a third request finds the queue full.
    (repository / ONE_AT_A_TIME / "1").mkdir(parents=True)
    (repository / ONE_AT_A_TIME / "config.yaml").write_text(
        "backend: diffusers\nmax_batch_size: 1\ndynamic_batching:\n  default_queue_policy:\n    max_queue_size: 1\n"
        f"parameters:\n  model_path: {pipeline_dir}\n"
    )
    # Loading torch, the pipeline and the models takes a while on a busy machine.
    server = start_server(repository, wait=False)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in (MODEL, ONE_AT_A_TIME)):
            return server
        if "UNAVAILABLE" in states.values():
            break
        time.sleep(0.2)
    raise RuntimeError(f"diffusion models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def pipeline(pipeline_dir: Path) -> Any:
    from diffusers import AutoPipelineForText2Image

    loaded = AutoPipelineForText2Image.from_pretrained(pipeline_dir, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def reference(pipeline: Any, prompts: list[str], seeds: list[int], **settings: Any) -> np.ndarray:
    """The pipeline's own images (its PIL output, as arrays) for one prompt and seed per image."""
    import torch

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images = pipeline(prompts, generator=generators, num_inference_steps=settings.pop("steps", STEPS), **settings)
    return np.stack([np.asarray(image) for image in images.images])


def inputs(module: Any, prompts: list[str], **columns: tuple[list[Any], str]) -> list[Any]:
    tensors = []
    values: dict[str, tuple[list[Any], str]] = {"prompt": ([p.encode() for p in prompts], "BYTES"), **columns}
    numpy_types = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}
    for name, (column, datatype) in values.items():
        array = np.array([[value] for value in column], dtype=numpy_types[datatype])
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def test_metadata_describes_the_image_inputs_and_outputs(diffusion_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    metadata = client.get_model_metadata(MODEL)
    assert metadata["platform"] == "diffusers"
    assert {t["name"]: t["datatype"] for t in metadata["inputs"]} == {
        "prompt": "BYTES",
        "negative_prompt": "BYTES",
        "seed": "INT64",
        "num_inference_steps": "INT32",
        "guidance_scale": "FP32",
        "width": "INT32",
        "height": "INT32",
    }
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
    assert outputs == {"image": ("UINT8", [-1, IMAGE_SIZE, IMAGE_SIZE, 3]), "png": ("BYTES", [-1, 1])}


def test_http_images_equal_the_pipelines_pixel_for_pixel(diffusion_server: ServerProcess, pipeline: Any) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    prompts, seeds = ["a red fox in the snow", "a lighthouse at dusk"], [7, 1234]
    result = client.infer(MODEL, inputs(httpclient, prompts, seed=(seeds, "INT64")))
    images = result.as_numpy("image")
    expected = reference(pipeline, prompts, seeds)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)
    # The PNG output holds the same pixels.
    for png, image in zip(result.as_numpy("png").reshape(-1), images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), image)
    # A different seed makes a different image.
    other = client.infer(MODEL, inputs(httpclient, prompts[:1], seed=([8], "INT64"))).as_numpy("image")
    assert not np.array_equal(other[0], images[0])


def test_grpc_settings_reach_the_pipeline(diffusion_server: ServerProcess, pipeline: Any) -> None:
    client = grpcclient.InferenceServerClient(diffusion_server.grpc_url)
    settings = {
        "seed": ([42], "INT64"),
        "negative_prompt": ([b"blurry"], "BYTES"),
        "num_inference_steps": ([2], "INT32"),
        "guidance_scale": ([2.5], "FP32"),
        "width": ([IMAGE_SIZE], "INT32"),
        "height": ([IMAGE_SIZE], "INT32"),
    }
    result = client.infer(MODEL, inputs(grpcclient, ["a bowl of fruit"], **settings))
    expected = reference(pipeline, ["a bowl of fruit"], [42], steps=2, negative_prompt=["blurry"], guidance_scale=2.5)
    np.testing.assert_array_equal(result.as_numpy("image"), expected)


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        ({"width": ([32], "INT32")}, "width"),
        ({"height": ([128], "INT32")}, "height"),
        ({"num_inference_steps": ([0], "INT32")}, "num_inference_steps"),
        ({"guidance_scale": ([-1.0], "FP32")}, "guidance_scale"),
    ],
)
def test_bad_settings_are_refused_by_name(diffusion_server: ServerProcess, columns: dict, named: str) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match=f"input '{named}'") as caught:
        client.infer(MODEL, inputs(httpclient, ["a cat"], **columns))
    assert caught.value.status() == "400"
    grpc = grpcclient.InferenceServerClient(diffusion_server.grpc_url)
    with pytest.raises(InferenceServerException, match=f"input '{named}'") as refused:
        grpc.infer(MODEL, inputs(grpcclient, ["a cat"], **columns))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_request_parameters_reach_the_pipeline(diffusion_server: ServerProcess, pipeline: Any, module: Any) -> None:
    """The settings as KServe request parameters (what the OpenAI images route sends too), ``n`` included."""
    url = diffusion_server.grpc_url if module is grpcclient else diffusion_server.url.removeprefix("http://")
    client = module.InferenceServerClient(url)
    parameters = {
        "seed": 42,
        "num_inference_steps": 2,
        "guidance_scale": 2.5,
        "negative_prompt": "blurry",
        "size": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "n": 2,
    }
    result = client.infer(MODEL, inputs(module, ["a bowl of fruit"]), parameters=parameters)
    # Image k of the request is made with seed + k.
    expected = reference(
        pipeline, ["a bowl of fruit"] * 2, [42, 43], steps=2, negative_prompt=["blurry"] * 2, guidance_scale=2.5
    )
    np.testing.assert_array_equal(result.as_numpy("image"), expected)
    # n copies of each row of a seed input: copy i gets that row's seed + i.
    seeded = client.infer(MODEL, inputs(module, ["a cat", "a dog"], seed=([7, 100], "INT64")), parameters={"n": 2})
    np.testing.assert_array_equal(
        seeded.as_numpy("image"), reference(pipeline, ["a cat", "a cat", "a dog", "a dog"], [7, 8, 100, 101])
    )


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": "3"}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"seed": "seven"}, "seed"),
        ({"size": "32x32"}, "size"),
        ({"size": "big"}, "size"),
        ({"width": 32}, "width"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
    ],
)
def test_bad_request_parameters_are_refused_by_name(
    diffusion_server: ServerProcess, parameters: dict, named: str
) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match=f"request parameter '{named}'") as caught:
        client.infer(MODEL, inputs(httpclient, ["a cat"]), parameters=parameters)
    assert caught.value.status() == "400"
    grpc = grpcclient.InferenceServerClient(diffusion_server.grpc_url)
    with pytest.raises(InferenceServerException, match=f"request parameter '{named}'") as refused:
        grpc.infer(MODEL, inputs(grpcclient, ["a cat"]), parameters=parameters)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_setting_sent_as_input_and_parameter_is_refused(diffusion_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="request parameter 'seed': also given as input") as caught:
        client.infer(MODEL, inputs(httpclient, ["a cat"], seed=([1], "INT64")), parameters={"seed": 2})
    assert caught.value.status() == "400"


def test_empty_prompt_is_refused_and_the_server_keeps_serving(diffusion_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="input 'prompt' is empty"):
        client.infer(MODEL, inputs(httpclient, ["  "]))
    with pytest.raises(InferenceServerException, match="not valid UTF-8"):
        client.infer(MODEL, [_bytes_input(b"\xff\xfe")])
    assert client.infer(MODEL, inputs(httpclient, ["a cat"])).as_numpy("image").shape == (1, 64, 64, 3)


def _bytes_input(raw: bytes) -> Any:
    tensor = httpclient.InferInput("prompt", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
    return tensor


def test_denoising_steps_and_images_are_in_the_metrics(diffusion_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(diffusion_server.url.removeprefix("http://"))

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{diffusion_server.url}/metrics", timeout=10).text
        pattern = rf'^(modeldock_diffusion_\w+)\{{model="{MODEL}",version="1"\}} (\S+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}

    before = scrape()
    client.infer(MODEL, inputs(httpclient, ["a cat", "a dog"], num_inference_steps=([4, 4], "INT32")))
    after = scrape()
    # One batch of two images, four steps for the pair.
    assert after["modeldock_diffusion_steps_total"] - before.get("modeldock_diffusion_steps_total", 0) == 4
    assert after["modeldock_diffusion_images_total"] - before.get("modeldock_diffusion_images_total", 0) == 2
    assert after["modeldock_diffusion_step_seconds_count"] == after["modeldock_diffusion_steps_total"]
    assert after["modeldock_diffusion_step_seconds_sum"] > 0
    assert after["modeldock_diffusion_running_images"] == 0
    assert after["modeldock_diffusion_progress_ratio"] == 0


def test_a_full_queue_answers_503_at_once(diffusion_server: ServerProcess) -> None:
    url = diffusion_server.url.removeprefix("http://")
    # A long image takes the one seat, a second waits in the one queue place; a third is turned away.
    long_request = inputs(httpclient, ["a long painting"], num_inference_steps=([150], "INT32"))
    outcomes: list[Any] = []

    def send() -> None:
        try:
            outcomes.append(
                httpclient.InferenceServerClient(url, network_timeout=600).infer(ONE_AT_A_TIME, long_request)
            )
        except InferenceServerException as exc:
            outcomes.append(exc)

    running = threading.Thread(target=send, daemon=True)
    running.start()
    _wait_for(lambda: _running_images(diffusion_server, ONE_AT_A_TIME) == 1)
    waiting = threading.Thread(target=send, daemon=True)
    waiting.start()
    _wait_for(lambda: _pending(diffusion_server, ONE_AT_A_TIME) >= 1)
    client = httpclient.InferenceServerClient(url)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="queue is full") as caught:
        client.infer(ONE_AT_A_TIME, inputs(httpclient, ["one too many"], num_inference_steps=([1], "INT32")))
    assert caught.value.status() == "503"
    assert time.monotonic() - started < 2.0
    # The other model is not held up by this one's queue.
    assert client.infer(MODEL, inputs(httpclient, ["a cat"])).as_numpy("image").shape == (1, 64, 64, 3)


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def _metric(server: ServerProcess, name: str, model: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _running_images(server: ServerProcess, model: str) -> float:
    return _metric(server, "modeldock_diffusion_running_images", model)


def _pending(server: ServerProcess, model: str) -> float:
    return _metric(server, "nv_inference_pending_request_count", model)
