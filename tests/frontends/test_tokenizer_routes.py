"""vLLM's tokenizer routes at the root (``/tokenize``, ``/detokenize``), where vLLM serves them beside ``/v1``.

They answer as ``/v1/tokenize`` and ``/v1/detokenize`` do, behind the same API key and with the same OpenAI-shaped
errors; token ids are checked against the model's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_repository.language_models import build_causal_lm
from tests.conftest import ServerProcess

GPT = "tiny_gpt"
API_KEY = "tokenizer-routes-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "Hello world, how are you?"


@pytest.fixture(scope="module")
def gpt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("tokenizer-routes") / "models"
    build_causal_lm(repository / GPT / "1")
    (repository / GPT / "config.yaml").write_text("backend: transformers\n")
    return repository


@pytest.fixture(scope="module")
def url(start_server: Callable[..., ServerProcess], gpt_folder: Path) -> str:
    server = start_server(gpt_folder, "--openai-api-key", API_KEY, wait=False)
    server.wait_ready(timeout=300)
    return server.url


@pytest.fixture(scope="module")
def tokenizer(gpt_folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt_folder / GPT / "1")


def test_root_tokenize_and_detokenize_answer_as_v1(url: str, tokenizer: Any) -> None:
    body = {"model": GPT, "prompt": PROMPT, "return_token_strs": True}
    root = httpx.post(f"{url}/tokenize", json=body, headers=AUTH, timeout=60)
    assert root.status_code == 200, root.text
    assert root.json() == httpx.post(f"{url}/v1/tokenize", json=body, headers=AUTH, timeout=60).json()
    ids = tokenizer.encode(PROMPT)
    assert root.json()["tokens"] == ids
    assert root.json()["token_strs"] == tokenizer.convert_ids_to_tokens(ids)

    back = httpx.post(f"{url}/detokenize", json={"model": GPT, "tokens": ids}, headers=AUTH, timeout=60)
    assert back.status_code == 200, back.text
    assert back.json()["prompt"] == tokenizer.decode(ids)


def test_root_tokenizer_routes_refuse_as_v1(url: str) -> None:
    outside = httpx.post(f"{url}/detokenize", json={"model": GPT, "tokens": [10**6]}, headers=AUTH, timeout=60)
    assert outside.status_code == 400
    assert outside.json()["error"]["param"] == "tokens"
    unknown = httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}, headers=AUTH, timeout=60)
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]["message"]
    both = httpx.post(f"{url}/tokenize", json={"model": GPT, "prompt": "x", "messages": []}, headers=AUTH)
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "prompt"
    no_key = httpx.post(f"{url}/tokenize", json={"model": GPT, "prompt": "x"}, timeout=60)
    assert no_key.status_code == 401
    assert "API key" in no_key.json()["error"]["message"]
    assert httpx.get(f"{url}/tokenize", headers=AUTH).status_code == 405
