"""The web console in a real browser: Debian's Chromium driven by Playwright against the real server.

The server runs the bundled repository in explicit mode, so the console can unload and load; what the page shows
is checked against the server's own APIs, the streamed chat against transformers' greedy ``generate`` and the tensor
form's answer against ONNX Runtime on the model file. The screenshots the documentation shows (docs/images/) are
taken here, so they always show the console as it is: ``MODELDOCK_SCREENSHOTS=docs/images pytest
tests/frontends/test_console.py`` refreshes them; a plain run writes them to a temporary folder and leaves the
checkout as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import BUNDLED_REPOSITORY, ROOT, ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / os.environ.get("MODELDOCK_SCREENSHOTS", Path(tempfile.gettempdir()) / "modeldock-console")
TIMEOUT_MS = 60_000
ADMIN_HEADER = "admin-key"
ADMIN_KEY = "s3cret"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    ),
]


def wait_loaded(server: ServerProcess, headers: dict[str, str] | None = None, timeout: float = 300) -> list[dict]:
    """The repository index once no model is still loading (a model whose extra is missing stays UNAVAILABLE)."""
    server.wait_ready(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = httpx.post(f"{server.url}/v2/repository/index", json={}, headers=headers).json()
        if rows and not any(row["state"] == "LOADING" for row in rows):
            return rows
        time.sleep(0.2)
    raise TimeoutError(f"models still loading: {rows}\n{server.log()}")


# Bundled models of each kind the console treats differently: tensor models, an ensemble of Python and ONNX steps,
# a stateful model, a language model and an embedding model.
CONSOLE_MODELS = (
    "simple",
    "mlp_classifier",
    "classify_image",
    "preprocess_pixels",
    "pick_top_class",
    "accumulator",
    "tiny_gpt",
    "tiny_embedder",
)


@pytest.fixture(scope="module")
def console_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("console") / "models"
    for name in CONSOLE_MODELS:
        shutil.copytree(BUNDLED_REPOSITORY / name, repository / name)
    # A model whose config is wrong, so the list shows a reason.
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "broken")
    config = repository / "broken" / "config.yaml"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_sise"))
    server = start_server(repository, "--model-control-mode", "explicit", "--load-model", "*", wait=False)
    wait_loaded(server)
    return server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def open_console(page: Any, server: ServerProcess) -> None:
    page.goto(f"{server.url}/console")
    page.wait_for_selector("body[data-ready=true]")


def state_badge(page: Any, model: str) -> Any:
    return page.locator(f'tr[data-model="{model}"] [data-state]')


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))


def test_console_lists_every_model_with_its_state(page: Any, console_server: ServerProcess) -> None:
    open_console(page, console_server)
    index = httpx.post(f"{console_server.url}/v2/repository/index", json={}).json()
    assert {row["name"] for row in index} == {*CONSOLE_MODELS, "broken"}
    for row in index:
        assert state_badge(page, row["name"]).get_attribute("data-state") == row["state"]
        cells = page.locator(f'tr[data-model="{row["name"]}"] td')
        assert cells.nth(1).inner_text() == (row["version"] or "–")
    broken = next(row for row in index if row["name"] == "broken")
    assert broken["state"] == "UNAVAILABLE" and "max_batch_sise" in broken["reason"]
    assert page.locator('tr[data-model="broken"] .reason').inner_text() == broken["reason"]
    # Not loaded, so it offers Load only.
    assert page.locator('tr[data-model="broken"] button').all_inner_texts() == ["Load"]
    # Backend and instances come from each model's config.
    simple = httpx.get(f"{console_server.url}/v2/models/simple/config").json()
    cells = page.locator('tr[data-model="simple"] td')
    assert cells.nth(2).inner_text() == simple["backend"] == "onnxruntime"
    assert cells.nth(4).inner_text() == "1 × CPU"
    assert page.locator('tr[data-model="tiny_gpt"] td').nth(4).inner_text() == "1 engine"
    assert cells.nth(5).inner_text() == "0"
    assert page.locator("#access").inner_text() == "explicit mode: can load and unload"
    screenshot(page, "console-models.png")


def test_unload_and_load_from_the_console(page: Any, console_server: ServerProcess) -> None:
    open_console(page, console_server)
    ready_url = f"{console_server.url}/v2/models/mlp_classifier/ready"
    assert httpx.get(ready_url).status_code == 200
    page.locator('tr[data-model="mlp_classifier"] button', has_text="Unload").click()
    page.wait_for_selector('tr[data-model="mlp_classifier"] [data-state="UNAVAILABLE"]')
    assert httpx.get(ready_url).status_code == 400
    page.locator('tr[data-model="mlp_classifier"] button', has_text="Load").click()
    page.wait_for_selector('tr[data-model="mlp_classifier"] [data-state="READY"]')
    assert httpx.get(ready_url).status_code == 200


def test_tensor_form_built_from_metadata_infers(page: Any, console_server: ServerProcess) -> None:
    import onnxruntime

    open_console(page, console_server)
    page.locator('tr[data-model="simple"]').click()
    page.locator('.tabs button[data-tab="playground"]').click()
    first = np.linspace(-1, 1, 16, dtype=np.float32)
    second = np.arange(16, dtype=np.float32)
    # The form has a shape and a data box per input of the metadata, with the batch dimension set to 1.
    assert page.locator('[data-input="INPUT0"][data-role="shape"]').input_value() == "1,16"
    page.locator('[data-input="INPUT0"][data-role="data"]').fill(json.dumps(first.tolist()))
    page.locator('[data-input="INPUT1"][data-role="data"]').fill(json.dumps(second.tolist()))
    page.locator("#infer-run").click()
    page.wait_for_selector("#infer-outputs")
    session = onnxruntime.InferenceSession(str(BUNDLED_REPOSITORY / "simple" / "1" / "model.onnx"))
    expected = session.run(None, {"INPUT0": first[None], "INPUT1": second[None]})
    for name, want in zip(("OUTPUT0", "OUTPUT1"), expected, strict=True):
        shown = json.loads(page.locator(f'tr[data-output="{name}"] td.values').inner_text())
        np.testing.assert_allclose(shown, want.ravel(), rtol=1e-5, atol=1e-5)
    screenshot(page, "console-tensor-playground.png")


def test_streamed_chat_matches_transformers(page: Any, console_server: ServerProcess) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    open_console(page, console_server)
    page.locator('tr[data-model="tiny_gpt"]').click()
    page.locator('.tabs button[data-tab="playground"]').click()
    prompt = "Tell me about the sea."
    page.locator("#chat-max-tokens").fill("12")
    page.locator("#chat-temperature").fill("0")
    page.locator("#chat-input").fill(prompt)
    page.locator("#chat-send").click()
    page.wait_for_selector(".message.assistant[data-done=true]")
    shown = page.locator(".message.assistant .text").inner_text()
    status = page.locator("#chat-status").inner_text()
    assert "chunks" in status, shown
    assert int(status.split(" chunks")[0].rsplit(" ", 1)[1]) > 1, status  # it streamed

    folder = BUNDLED_REPOSITORY / "tiny_gpt" / "1"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert shown == expected

    # The overview's charts are fed from /metrics: the chat's tokens show up as tokens per second.
    page.locator('.tabs button[data-tab="overview"]').click()
    page.wait_for_selector('[data-chart="tokens"]')
    page.wait_for_timeout(4500)  # two scrapes after the chat
    metrics = httpx.get(f"{console_server.url}/metrics").text
    assert 'modeldock_llm_generation_tokens_total{model="tiny_gpt"' in metrics
    screenshot(page, "console-overview.png")
    page.locator('.tabs button[data-tab="playground"]').click()
    screenshot(page, "console-chat.png")


@pytest.fixture(scope="module")
def restricted_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("console-restricted") / "models"
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    server = start_server(
        repository,
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        "--http-restricted-api",
        f"model-repository:{ADMIN_HEADER}={ADMIN_KEY}",
        wait=False,
    )
    wait_loaded(server, headers={ADMIN_HEADER: ADMIN_KEY})
    return server


def test_without_the_key_the_console_sees_but_cannot_change(page: Any, restricted_server: ServerProcess) -> None:
    open_console(page, restricted_server)
    settings = httpx.get(f"{restricted_server.url}/console/settings.json").json()
    assert settings["restricted"] == {"model-repository": ADMIN_HEADER}
    assert ADMIN_KEY not in json.dumps(settings)
    # The index is restricted with the repository API: the loaded models are listed from the metrics.
    assert "needs the model-repository key" in page.locator("#models-note").inner_text()
    unload = page.locator('tr[data-model="simple"] button', has_text="Unload")
    assert state_badge(page, "simple").get_attribute("data-state") == "READY"
    assert unload.is_disabled()
    assert "read only" in page.locator("#access").inner_text()
    # With the key typed in, the same button works.
    page.locator("#credentials-button").click()
    page.locator(f"#credential-{ADMIN_HEADER}").fill(ADMIN_KEY)
    page.locator("#credentials-save").click()
    page.wait_for_function("!document.querySelector('tr[data-model=\"simple\"] button[data-action=unload]').disabled")
    page.locator('tr[data-model="simple"] button', has_text="Unload").click()
    page.wait_for_selector('tr[data-model="simple"] [data-state="UNAVAILABLE"]')
    assert httpx.get(f"{restricted_server.url}/v2/models/simple/ready").status_code == 400


def test_no_console_flag(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> None:
    repository = tmp_path_factory.mktemp("no-console") / "models"
    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    server = start_server(repository, "--no-console")
    assert httpx.get(f"{server.url}/console/").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/simple/ready").status_code == 200


# -- audio and image playgrounds ------------------------------------------------------------------------------------
MEDIA_MODELS = ("tiny_whisper", "tiny_tts", "tiny_diffusion")


@pytest.fixture(scope="module")
def media_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("console-media") / "models"
    for name in MEDIA_MODELS:
        shutil.copytree(BUNDLED_REPOSITORY / name, repository / name)
    server = start_server(repository, wait=False)
    rows = wait_loaded(server)
    missing = [row for row in rows if row["state"] != "READY"]
    if missing and all("pip install" in row["reason"] for row in missing):
        pytest.skip(f"an extra these models need is not installed: {missing}")
    assert not missing, missing
    return server


def open_playground(page: Any, server: ServerProcess, model: str) -> None:
    open_console(page, server)
    page.locator(f'tr[data-model="{model}"]').click()
    page.locator('.tabs button[data-tab="playground"]').click()


def test_audio_upload_transcribes_as_the_api_does(page: Any, media_server: ServerProcess, tmp_path: Path) -> None:
    import wave

    import openai

    rate = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate) * 32767).astype("<i2")
    clip = tmp_path / "tone.wav"
    with wave.open(str(clip), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(tone.tobytes())
    open_playground(page, media_server, "tiny_whisper")
    page.locator("#audio-file").set_input_files(str(clip))
    page.locator("#audio-run").click()
    page.wait_for_function("document.querySelector('#audio-output').textContent.includes('text')")
    shown = json.loads(page.locator("#audio-output").inner_text())
    client = openai.OpenAI(base_url=f"{media_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    with clip.open("rb") as audio:
        expected = client.audio.transcriptions.create(model="tiny_whisper", file=audio)
    assert shown["text"] == expected.text
    screenshot(page, "console-audio-playground.png")


def test_text_to_speech_plays_what_the_api_returns(page: Any, media_server: ServerProcess) -> None:
    import openai

    open_playground(page, media_server, "tiny_tts")
    page.locator("#speech-input").fill("Hello there.")
    page.locator("#speech-run").click()
    page.wait_for_selector("#speech-output audio")
    played = page.evaluate(
        "async () => Array.from(new Uint8Array(await (await fetch("
        "document.querySelector('#speech-output audio').src)).arrayBuffer()))"
    )
    client = openai.OpenAI(base_url=f"{media_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    expected = client.audio.speech.create(
        model="tiny_tts", input="Hello there.", voice="default", response_format="wav"
    )
    assert bytes(played) == expected.content
    assert bytes(played[:4]) == b"RIFF"


def test_image_prompt_shows_a_generated_image(page: Any, media_server: ServerProcess) -> None:
    import base64
    import io

    from PIL import Image

    config = httpx.get(f"{media_server.url}/v2/models/tiny_diffusion/config").json()
    size = (int(config["parameters"]["width"]["string_value"]), int(config["parameters"]["height"]["string_value"]))
    open_playground(page, media_server, "tiny_diffusion")
    page.locator("#image-prompt").fill("a red square")
    page.locator("#image-run").click()
    page.wait_for_selector("#image-output img")
    source = page.locator("#image-output img").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert image.size == size
    # The browser decoded it too.
    assert page.evaluate("document.querySelector('#image-output img').naturalWidth") == size[0]
    screenshot(page, "console-image-playground.png")


# -- vision chat ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Any:
    from model_repository.vision_language_models import build_vision_language_model

    folder = build_vision_language_model(tmp_path_factory.mktemp("console-vlm") / "model")
    repository = tmp_path_factory.mktemp("console-vision") / "models"
    (repository / "looker" / "1").mkdir(parents=True)
    (repository / "looker" / "config.yaml").write_text(f"backend: transformers\nparameters:\n  model_path: {folder}\n")
    server = start_server(repository, wait=False)
    rows = wait_loaded(server)
    assert all(row["state"] == "READY" for row in rows), rows
    return server


def test_chat_with_an_attached_image(page: Any, vision_server: ServerProcess, tmp_path: Path) -> None:
    import base64

    import openai
    from PIL import Image

    picture = tmp_path / "picture.png"
    pixels = (np.random.default_rng(3).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(picture)
    open_playground(page, vision_server, "looker")
    # The probe found that this model takes images, so the chat offers an attachment (and no tools toggle).
    page.wait_for_selector("#chat-image")
    assert page.locator("#chat-tools-on").count() == 0
    page.locator("#chat-max-tokens").fill("8")
    page.locator("#chat-temperature").fill("0")
    page.locator("#chat-image").set_input_files(str(picture))
    page.locator("#chat-input").fill("What is in this picture?")
    page.locator("#chat-send").click()
    page.wait_for_selector(".message.assistant[data-done=true]")
    shown = page.locator(".message.assistant .text").inner_text()
    assert page.locator(".message.user img.attached").count() == 1

    client = openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode("ascii")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]
    expected = client.chat.completions.create(
        model="looker", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
    )
    assert shown == expected.choices[0].message.content
    screenshot(page, "console-vision-chat.png")
