"""Vision chat through ``backend: vllm``: ``image_url`` content parts sent with the openai client to the real server,
which serves a tiny random-weight Idefics3 (SmolVLM's architecture, 32-dimension heads for vLLM's CPU attention)
built at test time with vLLM's CPU build. Each greedy answer is checked against vLLM's own offline ``LLM.chat`` given
the same messages and data URLs, so ModelDock's image decoding, chat rendering and prompt match vLLM's own.

Engine starts are the slow part, so one server holds both models (the vision-language one and a text-only tiny
Llama), and the reference answers come from one offline run, started while the server loads.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from model_repository.llama_models import build_tiny_llama
from model_repository.vision_language_models import build_vision_language_model
from tests.conftest import ServerProcess

pytest.importorskip("vllm", reason="backend: vllm needs the vllm extra (in the test extra on Linux)")

pytestmark = pytest.mark.slow

VLM = "looker_vllm"
TEXT_ONLY = "tiny_vllm_text"
MAX_TOKENS = 12
MAX_MODEL_LEN = 256
MAX_IMAGES = 2
QUESTION = "What is in this picture?"
TEXT_CHAT = {"role": "user", "content": "Hello there"}
LOAD_TIMEOUT_S = 900
# (seed, width, height) of the pictures the answers are checked on; sizes differ so the processor resizes each.
PICTURES = [(0, 64, 48), (1, 30, 40), (2, 50, 50), (3, 40, 56)]
# Both engines unpinned: vLLM's automatic binding would pin each to core 0, where their OpenMP threads starve each other.
ENGINE_PARAMETERS = f"""  max_model_len: {MAX_MODEL_LEN}
  dtype: float32
  enforce_eager: true
  cpu_omp_threads_bind: nobind
  load_timeout_secs: {LOAD_TIMEOUT_S}
"""

# vLLM's own offline engine on the same folder: the greedy answer to each picture, rendered and decoded by vLLM
# itself from the same data URL, with the prompt's token count (image tokens included).
_REFERENCE = textwrap.dedent(
    """
    import json, sys

    def main() -> None:
        from vllm import LLM, SamplingParams

        folder, conversations, max_tokens, max_model_len, out = (
            sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        )
        llm = LLM(folder, max_model_len=max_model_len, dtype="float32", enforce_eager=True)
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        results = llm.chat(conversations, params)
        with open(out, "w") as f:
            json.dump([{"text": r.outputs[0].text, "prompt_tokens": len(r.prompt_token_ids)} for r in results], f)

    if __name__ == "__main__":
        main()
    """
)


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
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm-vision") / "models"
    build_vision_language_model(root / VLM / "1", text_heads=2, text_kv_heads=2)
    (root / VLM / "config.yaml").write_text(
        f"backend: vllm\nparameters:\n{ENGINE_PARAMETERS}  max_images_per_request: {MAX_IMAGES}\n"
    )
    build_tiny_llama(root / TEXT_ONLY / "1")
    (root / TEXT_ONLY / "config.yaml").write_text(f"backend: vllm\nparameters:\n{ENGINE_PARAMETERS}")
    return root


@pytest.fixture(scope="module")
def reference(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], list[dict]]]:
    """vLLM's offline answers for ``PICTURES`` and then ``TEXT_CHAT``, computed in a child process while the server loads (call to wait)."""
    work = tmp_path_factory.mktemp("vision-reference")
    script, out = work / "reference.py", work / "answers.json"
    script.write_text(_REFERENCE)
    conversations = [[user_message(png(*picture))] for picture in PICTURES] + [[TEXT_CHAT]]
    args = [
        sys.executable,
        str(script),
        str(repository / VLM / "1"),
        json.dumps(conversations),
        str(MAX_TOKENS),
        str(MAX_MODEL_LEN),
        str(out),
    ]
    log = open(work / "reference.log", "wb")
    process = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_WORKER_MULTIPROC_METHOD": "fork",
        },
        cwd=work,
        # Its own process group, so an early end of the module takes vLLM's engine processes with it.
        start_new_session=True,
    )

    def answers() -> list[dict]:
        if process.wait(timeout=LOAD_TIMEOUT_S) != 0:
            raise AssertionError(f"vLLM's offline run failed:\n{(work / 'reference.log').read_text()[-5000:]}")
        return json.loads(out.read_text())

    yield answers
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def server(
    start_server: Callable[..., ServerProcess], repository: Path, reference: Callable[[], list[dict]]
) -> ServerProcess:
    """One server in explicit mode, both engines loaded through the repository API."""
    server = start_server(repository, "--model-control-mode", "explicit")
    errors: list[str] = []

    def load(name: str) -> None:
        response = httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=LOAD_TIMEOUT_S)
        if response.status_code != 200:
            errors.append(f"{name}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=load, args=(name,)) for name in (VLM, TEXT_ONLY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{errors}\n{server.log()[-8000:]}"
    return server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, image: bytes, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=VLM, messages=[user_message(image)], temperature=0, max_tokens=MAX_TOKENS, **extra
    )


def test_greedy_answers_equal_vllms_offline_chat(client: openai.OpenAI, reference: Callable[[], list[dict]]) -> None:
    expected = reference()
    answers = []
    for picture, answer in zip(PICTURES, expected[: len(PICTURES)], strict=True):
        response = ask(client, png(*picture))
        assert response.choices[0].message.content == answer["text"]
        # The image's tokens count in the prompt, as vLLM counts them.
        assert response.usage.prompt_tokens == answer["prompt_tokens"]
        answers.append(answer["text"])
    # The picture reaches the model: different pictures, different answers.
    assert len(set(answers)) > 1


def test_streamed_deltas_join_to_the_answer(client: openai.OpenAI, reference: Callable[[], list[dict]]) -> None:
    stream = ask(client, png(*PICTURES[2]), stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reference()[2]["text"]


async def test_concurrent_requests_with_different_images_are_not_mixed_up(
    server: ServerProcess, reference: Callable[[], list[dict]]
) -> None:
    expected = reference()
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    # Each picture twice, interleaved, so vLLM batches different images together.
    order = [0, 1, 2, 3, 1, 0, 3, 2]
    responses = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=VLM, messages=[user_message(png(*PICTURES[i]))], temperature=0, max_tokens=MAX_TOKENS
            )
            for i in order
        )
    )
    for i, response in zip(order, responses, strict=True):
        assert response.choices[0].message.content == expected[i]["text"]


def test_a_text_only_vllm_model_given_an_image_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=f"model '{TEXT_ONLY}' reads text only"):
        client.chat.completions.create(model=TEXT_ONLY, messages=[user_message(png(0, 8, 8))], max_tokens=4)
    # It keeps serving text.
    assert client.chat.completions.create(
        model=TEXT_ONLY, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    ).choices


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
            "remote image URLs are not allowed",
        ),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
        (
            [{"type": "image_url", "image_url": {"url": data_url(b"not an image")}}],
            "messages[0].content[0].image_url: not an image",
        ),
        (
            [{"type": "image_url", "image_url": {"url": data_url(png(i, 16, 16))}} for i in range(MAX_IMAGES + 1)],
            f"over the {MAX_IMAGES} model '{VLM}' takes in one request",
        ),
    ],
)
def test_the_operators_image_limits_apply_and_the_engine_keeps_serving(
    client: openai.OpenAI, reference: Callable[[], list[dict]], content: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model=VLM, messages=[{"role": "user", "content": content}], max_tokens=4)
    assert ask(client, png(*PICTURES[0])).choices[0].message.content == reference()[0]["text"]


def test_a_chat_without_images_on_the_vision_model_equals_vllms_offline_chat(
    client: openai.OpenAI, reference: Callable[[], list[dict]]
) -> None:
    response = client.chat.completions.create(model=VLM, messages=[TEXT_CHAT], temperature=0, max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == reference()[-1]["text"]


def test_logprobs_and_structured_outputs_apply_to_image_requests(client: openai.OpenAI) -> None:
    response = ask(client, png(*PICTURES[1]), logprobs=True, top_logprobs=2)
    tokens = response.choices[0].logprobs.content
    assert tokens and all(t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 2 for t in tokens)
    choices = ["cat", "dog", "neither"]
    constrained = ask(client, png(*PICTURES[1]), extra_body={"structured_outputs": {"choice": choices}})
    assert constrained.choices[0].message.content in choices
