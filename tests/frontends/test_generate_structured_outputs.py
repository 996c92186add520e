"""Constraints through Triton's generate extension, KServe infer and gRPC streaming, on the tiny random GPT-2:
``structured_outputs``, ``logit_bias`` and ``min_tokens`` travel in ``sampling_parameters``; a bad spec is a 400
(INVALID_ARGUMENT over gRPC) naming its field, and the server keeps serving."""

from __future__ import annotations

import json
import queue
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import ServerProcess  # noqa: E402

MODEL = "lm"
PROMPT = "Write a user record:"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
}


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory, causal_lm_dir: Path):
    """A server with the language model alone: it starts in seconds, unlike one on the whole bundled repository."""
    repo = tmp_path_factory.mktemp("structured-repo")
    (repo / MODEL).mkdir()
    (repo / MODEL / "config.yaml").write_text("backend: transformers\n")
    shutil.copytree(causal_lm_dir, repo / MODEL / "1")
    return start_server(repo)


def generate(server: ServerProcess, sampling: dict, route: str = "generate") -> httpx.Response:
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "sampling_parameters": json.dumps(sampling)}
    return httpx.post(f"{server.url}/v2/models/{MODEL}/{route}", json=body, timeout=60)


def test_generate_extension_honours_a_json_schema(server: ServerProcess) -> None:
    for seed in range(3):
        sampling = {"structured_outputs": {"json": SCHEMA}, "max_tokens": 120, "temperature": 1.0, "seed": seed}
        response = generate(server, sampling)
        assert response.status_code == 200, response.text
        jsonschema.validate(json.loads(response.json()["text_output"]), SCHEMA)


def test_generate_stream_honours_a_regex(server: ServerProcess) -> None:
    sampling = {"structured_outputs": {"regex": r"\d{2}:\d{2}"}, "max_tokens": 20, "temperature": 0}
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL}/generate_stream",
        json={"text_input": PROMPT, "sampling_parameters": json.dumps(sampling)},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert re.fullmatch(r"\d{2}:\d{2}", "".join(e["text_output"] for e in events))


def test_tritonclient_http_infer_with_logit_bias_and_min_tokens(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))

    def infer(sampling: dict) -> str:
        inputs = []
        for name, datatype, value in (
            ("text_input", "BYTES", np.array([PROMPT.encode()], dtype=object)),
            ("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], dtype=object)),
            ("exclude_input_in_output", "BOOL", np.array([True])),
        ):
            tensor = httpclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return client.infer(MODEL, inputs).as_numpy("text_output")[0].decode()

    plain = infer({"max_tokens": 4, "temperature": 0, "ignore_eos": True})
    # Token 36 is a single character in the tiny tokenizer (its byte-level alphabet comes first).
    forced = infer({"max_tokens": 4, "temperature": 0, "logit_bias": {"36": 100}})
    assert len(set(forced)) == 1 and len(forced) == 4 and forced != plain
    # The end token (0) under +100 ends at once, unless min_tokens holds it back.
    assert infer({"max_tokens": 10, "temperature": 0, "logit_bias": {"0": 100}}) == ""
    held = infer({"max_tokens": 10, "temperature": 0, "logit_bias": {"0": 100}, "min_tokens": 3})
    assert held == infer({"max_tokens": 3, "temperature": 0, "logit_bias": {"0": -100}})


def test_grpc_stream_honours_a_choice_and_refuses_a_bad_regex(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    choices = ["sunny", "rainy with wind", "snow"]

    def send(sampling: dict, request_id: str) -> None:
        inputs = []
        for name, datatype, value in (
            ("text_input", "BYTES", np.array([PROMPT.encode()], dtype=object)),
            ("stream", "BOOL", np.array([True])),
            ("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], dtype=object)),
        ):
            tensor = grpcclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)

    try:
        send({"structured_outputs": {"regex": "(unclosed"}, "max_tokens": 5}, "bad")
        result, error = results.get(timeout=60)
        # A stream carries a request's error in its response's error_message; the stream stays open.
        assert result is None and isinstance(error, InferenceServerException)
        assert "structured_outputs.regex: the regular expression cannot be compiled" in error.message()
        send({"structured_outputs": {"choice": choices}, "max_tokens": 20, "temperature": 1.0, "seed": 4}, "ok")
        chunks, final = [], False
        while not final:
            result, error = results.get(timeout=60)
            assert error is None, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            chunks.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
    assert "".join(chunks) in choices


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        ({"structured_outputs": {"json": {"type": "objectx"}}}, "structured_outputs.json: the JSON schema is invalid"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern"),
        ({"logit_bias": {"999999": 1.0}}, "logit_bias"),
        ({"logprobs": 2}, "'logprobs'"),
        ({"prompt_logprobs": 1}, "'prompt_logprobs'"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(server: ServerProcess, sampling: dict, words: str) -> None:
    response = generate(server, {"max_tokens": 5, **sampling})
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    again = generate(server, {"max_tokens": 3, "temperature": 0, "structured_outputs": {"choice": ["ok"]}})
    assert again.status_code == 200 and again.json()["text_output"] == "ok"
