"""``backend: vllm`` end to end: the real server with vLLM's engine (its CPU build) on a tiny Llama made at test time,
talked to with the openai client, tritonclient (HTTP and gRPC) and httpx, and checked against vLLM's own offline
``LLM.generate`` on the same folder.

Engine starts are the slow part (tens of seconds each on two shared cores), so one server holds every model and
the reference answers come from one offline run, started while the server loads.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from model_repository.llama_models import build_lora_adapter, build_tiny_llama
from tests.conftest import BUNDLED_REPOSITORY, ROOT, ServerProcess

pytest.importorskip("vllm", reason="backend: vllm needs the vllm extra (in the test extra on Linux)")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

pytestmark = pytest.mark.slow

BASE = "tiny_vllm"
TP2 = "tiny_vllm_tp2"
ADAPTER = "pirate"
RUNTIME_ADAPTER = "parrot"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time there was"]
MAX_TOKENS = 16
MAX_MODEL_LEN = 256
# A busy two-core machine starts three engines at once here (this server's two and the offline reference), so
# loads get far more than the default 300 s.
ENGINE_PARAMETERS = f"""  max_model_len: {MAX_MODEL_LEN}
  dtype: float32
  max_lora_rank: 8
  load_timeout_secs: 900
"""
# The one-rank engines leave their threads unpinned: vLLM's automatic binding would pin both to core 0, beside the
# first tensor-parallel rank (pinned to core 0 by "0|1"), and OpenMP threads spinning on one core starve each other.
UNPINNED = "nobind"
LOAD_TIMEOUT_S = 900

# vLLM's own offline engine on the same folder and adapter: greedy token ids, text and the chosen tokens'
# log-probabilities, without and with the adapter.
_REFERENCE = textwrap.dedent(
    """
    import json, sys

    def main() -> None:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        folder, adapter, prompts, max_tokens, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        llm = LLM(folder, max_model_len=256, dtype="float32", enable_lora=True, max_lora_rank=8)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)

        def answers(lora):
            results = llm.generate(prompts, params, lora_request=lora)
            return [
                {
                    "text": r.outputs[0].text,
                    "token_ids": list(r.outputs[0].token_ids),
                    "logprobs": [p[t].logprob for t, p in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)],
                }
                for r in results
            ]

        base = answers(None)
        lora = answers(LoRARequest("adapter", 1, adapter))
        with open(out, "w") as f:
            json.dump({"base": base, "lora": lora}, f)

    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture(scope="module")
def vllm_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vllm")
    repository = root / "models"
    folder = build_tiny_llama(repository / BASE / "1")
    build_lora_adapter(folder, repository / BASE / "adapters" / ADAPTER, seed=1)
    build_lora_adapter(folder, root / "adapters" / RUNTIME_ADAPTER, seed=2)
    # enable_log_requests, one of vLLM's own engine arguments, makes vLLM log the requests it aborts.
    (repository / BASE / "config.yaml").write_text(
        f"backend: vllm\nparameters:\n{ENGINE_PARAMETERS}  enable_log_requests: true\n"
        f"  cpu_omp_threads_bind: {UNPINNED}\n"
        f'  lora_adapters: \'{{"{ADAPTER}": "adapters/{ADAPTER}"}}\'\n'
    )
    # The same weights split over two tensor-parallel ranks (one core each), read from the first model's folder.
    (repository / TP2 / "1").mkdir(parents=True)
    (repository / TP2 / "config.yaml").write_text(
        f"backend: vllm\nparameters:\n{ENGINE_PARAMETERS}  tensor_parallel_size: 2\n  model_path: ../{BASE}/1\n"
        # Without LoRA, vLLM's CPU build compiles the model with inductor (minutes on a busy machine); eager is enough.
        "  enforce_eager: true\n"
    )
    (repository / "misspelt").mkdir()
    (repository / "misspelt" / "1").mkdir()
    (repository / "misspelt" / "config.yaml").write_text(
        f"backend: vllm\nparameters:\n  model_path: ../{BASE}/1\n  tensor_paralel_size: 2\n"
    )
    return repository


@pytest.fixture(scope="module")
def reference(vllm_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict]]:
    """vLLM's offline answers, computed in a child process while the server loads (call to wait for them)."""
    work = tmp_path_factory.mktemp("reference")
    script, out = work / "reference.py", work / "answers.json"
    script.write_text(_REFERENCE)
    args = [
        sys.executable,
        str(script),
        str(vllm_repository / BASE / "1"),
        str(vllm_repository / BASE / "adapters" / ADAPTER),
        json.dumps(PROMPTS),
        str(MAX_TOKENS),
        str(out),
    ]
    log = open(work / "reference.log", "wb")
    process = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        # A plain script may fork its engine process, which spares the child a second import of vLLM.
        env={
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": UNPINNED,
            "VLLM_WORKER_MULTIPROC_METHOD": "fork",
        },
        cwd=work,
    )

    def answers() -> dict:
        if process.wait(timeout=LOAD_TIMEOUT_S) != 0:
            raise AssertionError(f"vLLM's offline run failed:\n{(work / 'reference.log').read_text()[-5000:]}")
        return json.loads(out.read_text())

    yield answers
    if process.poll() is None:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def server(
    start_server: Callable[..., ServerProcess], vllm_repository: Path, reference: Callable[[], dict]
) -> ServerProcess:
    """One server in explicit mode, both engines loaded through the repository API at once."""
    server = start_server(vllm_repository, "--model-control-mode", "explicit")
    errors: list[str] = []

    def load(name: str) -> None:
        response = httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=LOAD_TIMEOUT_S)
        if response.status_code != 200:
            errors.append(f"{name}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=load, args=(name,)) for name in (BASE, TP2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{errors}\n{server.log()[-8000:]}"
    return server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)


def complete(client: openai.OpenAI, model: str, prompt: str, **extra: Any) -> Any:
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **extra)


def metric(server: ServerProcess, name: str, model: str = BASE) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    prefix = f'{name}{{model="{model}",version="1"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_greedy_answers_equal_vllms_offline_engine(client: openai.OpenAI, reference: Callable[[], dict]) -> None:
    expected = reference()["base"]
    for prompt, answer in zip(PROMPTS, expected, strict=True):
        result = complete(client, BASE, prompt, logprobs=2)
        choice = result.choices[0]
        assert choice.text == answer["text"]
        assert result.usage.completion_tokens == len(answer["token_ids"])
        assert choice.logprobs.token_logprobs == pytest.approx(answer["logprobs"], abs=1e-4)
        # Two alternatives a position, fewer where two tokens decode to the same text (OpenAI keys them by text).
        assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_tensor_parallel_2_gives_the_same_greedy_answers(client: openai.OpenAI, reference: Callable[[], dict]) -> None:
    for prompt, answer in zip(PROMPTS, reference()["base"], strict=True):
        assert complete(client, TP2, prompt).choices[0].text == answer["text"]


def test_lora_adapter_changes_the_answer_and_the_base_model_keeps_its_own(
    client: openai.OpenAI, reference: Callable[[], dict]
) -> None:
    answers = reference()
    for prompt, base, lora in zip(PROMPTS, answers["base"], answers["lora"], strict=True):
        assert lora["text"] != base["text"]
        assert complete(client, f"{BASE}:{ADAPTER}", prompt).choices[0].text == lora["text"]
        assert complete(client, ADAPTER, prompt).choices[0].text == lora["text"]
        assert complete(client, BASE, prompt).choices[0].text == base["text"]


def test_adapters_are_listed_and_load_and_unload_at_run_time(
    client: openai.OpenAI, server: ServerProcess, vllm_repository: Path
) -> None:
    listed = {model.id for model in client.models.list()}
    assert {BASE, TP2, f"{BASE}:{ADAPTER}", ADAPTER} <= listed
    assert RUNTIME_ADAPTER not in listed
    base = complete(client, BASE, PROMPTS[0]).choices[0].text
    pirate = complete(client, ADAPTER, PROMPTS[0]).choices[0].text

    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    folder = vllm_repository.parent / "adapters" / RUNTIME_ADAPTER
    triton.load_model(f"{BASE}:{RUNTIME_ADAPTER}", config=json.dumps({"parameters": {"lora_path": str(folder)}}))
    assert {f"{BASE}:{RUNTIME_ADAPTER}", RUNTIME_ADAPTER} <= {model.id for model in client.models.list()}
    parrot = complete(client, f"{BASE}:{RUNTIME_ADAPTER}", PROMPTS[0]).choices[0].text
    assert parrot not in (base, pirate)
    assert complete(client, RUNTIME_ADAPTER, PROMPTS[0]).choices[0].text == parrot

    triton.unload_model(f"{BASE}:{RUNTIME_ADAPTER}")
    with pytest.raises(openai.NotFoundError):
        complete(client, RUNTIME_ADAPTER, PROMPTS[0])
    assert complete(client, BASE, PROMPTS[0]).choices[0].text == base
    # The config's own adapter is loaded again by name; a name neither listed nor given a folder is refused.
    triton.unload_model(f"{BASE}:{ADAPTER}")
    assert ADAPTER not in {model.id for model in client.models.list()}
    triton.load_model(f"{BASE}:{ADAPTER}")
    assert complete(client, ADAPTER, PROMPTS[0]).choices[0].text == pirate
    refused = httpx.post(f"{server.url}/v2/repository/models/{BASE}:nobody/load")
    assert refused.status_code == 400 and "lora_path" in refused.json()["error"]


def test_streamed_chat_equals_whole_and_is_rendered_with_the_chat_template(
    client: openai.OpenAI, vllm_repository: Path
) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a robot."}]
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_repository / BASE / "1")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_generate_extension_and_grpc_stream_give_the_completion(
    client: openai.OpenAI, server: ServerProcess, reference: Callable[[], dict]
) -> None:
    expected = reference()["base"][0]["text"]
    body = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "exclude_input_in_output": True}
    response = httpx.post(f"{server.url}/v2/models/{BASE}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] == expected

    triton = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = []
        sampling = json.dumps({"max_tokens": MAX_TOKENS, "temperature": 0}).encode()
        for name, datatype, value in (
            ("text_input", "BYTES", np.array([PROMPTS[0].encode()], dtype=object)),
            ("stream", "BOOL", np.array([True])),
            ("sampling_parameters", "BYTES", np.array([sampling], dtype=object)),
        ):
            tensor = grpcclient.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        triton.async_stream_infer(BASE, inputs, request_id="stream-1", enable_empty_final_response=True)
        chunks, finals = [], []
        while not finals or not finals[-1]:
            result, error = results.get(timeout=60)
            assert error is None, error
            finals.append(result.get_response().parameters["triton_final_response"].bool_param)
            chunks.append(result.as_numpy("text_output")[0].decode())
    finally:
        triton.stop_stream()
    assert len(chunks) >= 2 and finals.count(True) == 1
    assert "".join(chunks) == expected


def test_json_schema_is_enforced_by_vllms_structured_outputs(client: openai.OpenAI) -> None:
    # JSON allows whitespace anywhere, and a random-weight model may write nothing else until max_tokens; this
    # prompt's greedy answer closes the object (the weights are drawn from a fixed seed).
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    result = client.completions.create(
        model=BASE, prompt="Hello", max_tokens=60, temperature=0, extra_body={"structured_outputs": {"json": schema}}
    )
    assert result.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(result.choices[0].text), schema)
    # Without free whitespace the same schema needs no lucky prompt: every greedy answer closes the object, with
    # the grammar ModelDock's own engine uses (vLLM alone reads the flag from its server-wide settings only).
    for prompt in ("Hello", "Once upon a time", "JSON:"):
        compact = client.completions.create(
            model=BASE,
            prompt=prompt,
            max_tokens=60,
            temperature=0,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        )
        text = compact.choices[0].text
        assert compact.choices[0].finish_reason == "stop", text
        assert text == json.dumps(json.loads(text)), text  # ", " and ": " only
        jsonschema.validate(json.loads(text), schema)
    # A regular expression pins the shape down completely, whatever the model would rather write.
    shaped = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    person = client.completions.create(
        model=BASE,
        prompt="A person as JSON:",
        max_tokens=40,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r'\{"name": "[a-z]{1,8}", "age": [1-9][0-9]?\}'}},
    )
    jsonschema.validate(json.loads(person.choices[0].text), shaped)
    choice = client.completions.create(
        model=BASE,
        prompt="Pick one:",
        max_tokens=5,
        temperature=0.8,
        seed=3,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert choice.choices[0].text in ("red", "green", "blue")


def test_bad_requests_are_400_naming_the_field_and_the_engine_keeps_serving(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    too_long = httpx.post(
        f"{server.url}/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": MAX_MODEL_LEN * 2}
    )
    assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]
    two_kinds = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": BASE, "prompt": "hi", "structured_outputs": {"regex": "a+", "choice": ["a"]}},
    )
    assert two_kinds.status_code == 400, two_kinds.text
    embeddings = httpx.post(f"{server.url}/v1/embeddings", json={"model": BASE, "input": "hi"})
    assert embeddings.status_code == 400 and embeddings.json()["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        complete(client, f"{BASE}:nobody", "hi")
    assert complete(client, BASE, PROMPTS[0]).usage.completion_tokens == MAX_TOKENS


def test_a_client_leaving_aborts_its_request_in_vllm(server: ServerProcess) -> None:
    # The tiny model can write its whole answer before a busy server notices the closed connection; such a request
    # has nothing left to abort and counts as finished, so the client leaves again with a new one (a few times).
    body = {"model": BASE, "prompt": PROMPTS[1], "max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True, "stream": True}
    for _ in range(5):
        aborted = metric(server, "modeldock_llm_requests_aborted_total")
        finished = metric(server, "modeldock_llm_requests_finished_total")
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
        completion_id = json.loads(first.removeprefix("data: "))["id"]
        deadline = time.monotonic() + 30
        while metric(server, "modeldock_llm_requests_aborted_total") <= aborted:
            if metric(server, "modeldock_llm_requests_finished_total") > finished:
                break
            assert time.monotonic() < deadline, "the request was neither aborted nor finished"
            time.sleep(0.2)
        else:
            # vLLM's own word that its engine dropped the request (it logs aborts with enable_log_requests).
            while not any("Aborted request" in line and completion_id in line for line in server.log().splitlines()):
                assert time.monotonic() < deadline, f"vLLM did not abort {completion_id}"
                time.sleep(0.2)
            return
    pytest.fail("every request finished before the server saw its client leave")


def test_metrics_and_statistics_count_its_tokens(client: openai.OpenAI, server: ServerProcess) -> None:
    tokens = metric(server, "modeldock_llm_generation_tokens_total")
    prompts = metric(server, "modeldock_llm_prompt_tokens_total")
    first_tokens = metric(server, "modeldock_llm_time_to_first_token_seconds_count")
    result = complete(client, BASE, PROMPTS[2])
    assert metric(server, "modeldock_llm_generation_tokens_total") == tokens + result.usage.completion_tokens
    assert metric(server, "modeldock_llm_prompt_tokens_total") == prompts + result.usage.prompt_tokens
    assert metric(server, "modeldock_llm_time_to_first_token_seconds_count") == first_tokens + 1
    stats = httpx.get(f"{server.url}/v2/models/{BASE}/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 1


def test_a_misspelt_engine_argument_is_refused_by_name(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/repository/models/misspelt/load", timeout=120)
    assert response.status_code == 400
    assert "parameters.tensor_paralel_size" in response.json()["error"]
    assert "tensor_parallel_size" in response.json()["error"]  # the suggestion
    assert httpx.get(f"{server.url}/v2/models/{BASE}/ready").status_code == 200


def test_unloading_shuts_the_engine_and_its_processes_down(client: openai.OpenAI, server: ServerProcess) -> None:
    import psutil

    def engine_processes() -> set[int]:
        """vLLM's engine cores and workers (it names them ``VLLM::...``) still running under the server."""
        found = set()
        for child in psutil.Process(server.process.pid).children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "VLLM" in " ".join([child.name(), *child.cmdline()]):
                    found.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return found

    before = engine_processes()
    assert len(before) >= 3  # one engine core for each model, and the second's two tensor-parallel workers
    httpx.post(f"{server.url}/v2/repository/models/{TP2}/unload", timeout=120).raise_for_status()
    after = engine_processes()  # the unload returns once the engine's processes have exited
    assert 0 < len(after) < len(before) and after < before
    assert TP2 not in {model.id for model in client.models.list()}
    # The other engine serves on; unloading it leaves no engine process at all.
    assert complete(client, BASE, PROMPTS[0]).usage.completion_tokens == MAX_TOKENS
    httpx.post(f"{server.url}/v2/repository/models/{BASE}/unload", timeout=120).raise_for_status()
    assert engine_processes() == set()
    assert ADAPTER not in {model.id for model in client.models.list()}


def test_validate_checks_the_engine_arguments(vllm_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "validate", str(vllm_repository)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},
    )
    # The misspelt model is the only problem: the other two pass vLLM's own checks of their arguments.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 problem(s) in" in result.stdout and "tensor_paralel_size" in result.stdout, result.stdout


def test_without_vllm_the_model_is_unavailable_with_the_pip_command(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """vLLM hidden from the server (``sys.modules['vllm'] = None`` makes it unimportable): the model is refused with
    the pip command as its reason, and the rest of the repository serves."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / BASE).mkdir()
    (repository / BASE / "1").mkdir()
    (repository / BASE / "config.yaml").write_text("backend: vllm\n")
    import shutil

    shutil.copytree(BUNDLED_REPOSITORY / "simple", repository / "simple")
    pythonpath = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH", "")]))
    server = start_server(repository, env={"PYTHONPATH": pythonpath})
    rows = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index").json()}
    assert rows["simple"]["state"] == "READY"
    assert rows[BASE]["state"] == "UNAVAILABLE"
    assert "pip install 'modeldock[vllm]'" in rows[BASE]["reason"]


def test_tensor_parallel_overlay_takes_a_nodes_gpus_with_shared_memory_for_its_ranks() -> None:
    """deploy/kubernetes/overlays/vllm-tp renders to valid objects: the vLLM CUDA image, four GPUs, a memory-backed
    /dev/shm for NCCL and the model repository from the claim."""
    from tests.deploy.test_kubernetes import CUSTOM_KINDS, render, validate

    objects = render("overlays/vllm-tp")
    for document in objects.values():
        if document["kind"] not in CUSTOM_KINDS:
            validate(document, "kubectl kustomize overlays/vllm-tp")
    pod = objects[("Deployment", "modeldock")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "modeldock:vllm-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"/dev/shm", "/models", "/tmp"} <= {m["mountPath"] for m in container["volumeMounts"]}
