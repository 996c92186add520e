"""Models whose backends import torch load together in a fresh server process, as the bundled repository does.

The server loads every model at once, each on a thread of its own, and in a fresh process none of torch's lazily
imported parts (``torch._dynamo``, ``torch._inductor``) are imported yet: the pytorch backend's
``torch.export.load``, transformers' and diffusers' ``from_pretrained`` and ``import vllm`` all import them for the
first time together. Without one lock shared by all backends (``backends/framework_lock.py``), the torch.export model
failed with "partially initialized module" or ``KeyError: 'torch._dynamo'`` on every start-up of the bundled
repository. Only a fresh process shows it, so the test starts a real server rather than loading in this one (which
has imported torch's lazy parts long ago).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import BUNDLED_REPOSITORY, ServerProcess
from tests.lifecycle_models import index

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("diffusers")

TORCH_MODELS = ("torch_mlp", "tiny_gpt", "tiny_diffusion")
# A vLLM model with a misspelt engine argument, which the vllm backend finds by comparing the parameters with the
# fields of vLLM's AsyncEngineArgs: ``import vllm`` races the other loads, and no engine starts.
REFUSED_VLLM_CONFIG = """
backend: vllm
parameters:
  max_model_length: 256
"""
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def torch_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("torch-models") / "repository"
    for name in TORCH_MODELS:
        shutil.copytree(BUNDLED_REPOSITORY / name, repository / name)
    if HAS_VLLM:
        vllm_model = repository / "refused_vllm"
        shutil.copytree(BUNDLED_REPOSITORY / "tiny_vllm" / "1", vllm_model / "1")
        (vllm_model / "config.yaml").write_text(REFUSED_VLLM_CONFIG)
    return repository


@pytest.mark.slow
def test_torch_models_load_together_in_a_fresh_process(
    start_server: Callable[..., ServerProcess], torch_repository: Path
) -> None:
    server = start_server(torch_repository, "--model-control-mode", "none", wait=False)
    server.wait_ready(timeout=600)
    # A model that failed as a whole has one row, without a version.
    states = {name: row for (name, _), row in index(server.url).items()}
    for name in TORCH_MODELS:
        assert states[name]["state"] == "READY", f"{name}: {states[name].get('reason')}\n{server.log()}"
    if HAS_VLLM:
        refused = states["refused_vllm"]
        assert refused["state"] == "UNAVAILABLE"
        assert "parameters.max_model_length" in refused["reason"], refused["reason"]

    # The model that failed to load before serves the answers torch itself gives.
    features = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    request = httpclient.InferInput("features", list(features.shape), "FP32")
    request.set_data_from_numpy(features)
    result = client.infer("torch_mlp", [request])
    program = torch.export.load(str(BUNDLED_REPOSITORY / "torch_mlp" / "1" / "model.pt2"))
    expected = program.module()(torch.from_numpy(features))
    for name in ("logits", "probabilities"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name].detach().numpy(), rtol=1e-5, atol=1e-6)
