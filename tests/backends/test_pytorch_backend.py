"""The PyTorch backend end to end: TorchScript, torch.export and eager modules compared with running them directly."""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from backends.base import backend_class
from server.errors import ModelLoadError
from tests.conftest import BUNDLED_REPOSITORY, ServerProcess

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

EAGER_SOURCE = """
import torch


class Scorer(torch.nn.Module):
    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, hidden)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(features)))
"""


class TwoInputs(torch.nn.Module):
    """Positional inputs and a tuple of outputs, the shape of a typical Triton ``pytorch_libtorch`` model."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(a - b)
        return y, y.sum(dim=-1, keepdim=True)


class DictOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.linear(x) * scale
        return {"logits": logits, "best": logits.argmax(dim=-1, keepdim=True)}


def _eager_module(version_dir: Path) -> torch.nn.Module:
    namespace: dict[str, object] = {}
    exec(compile((version_dir / "model.py").read_text(), "model.py", "exec"), namespace)  # noqa: S102
    model = namespace["Scorer"](hidden=5)  # type: ignore[operator]
    model.load_state_dict(load_file(str(version_dir / "model.safetensors")))
    return model.eval()


def _write(repo: Path, name: str, config: str) -> Path:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.yaml").write_text(textwrap.dedent(config))
    return version


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    repo = tmp_path_factory.mktemp("pytorch-backend")

    # Config order deliberately differs from position order: the __<i> suffix decides.
    version = _write(
        repo,
        "torchscript",
        """
        backend: pytorch
        max_batch_size: 8
        input:
          - {name: INPUT__1, data_type: TYPE_FP32, dims: [8]}
          - {name: INPUT__0, data_type: TYPE_FP32, dims: [8]}
        output:
          - {name: OUTPUT__1, data_type: TYPE_FP32, dims: [1]}
          - {name: OUTPUT__0, data_type: TYPE_FP32, dims: [3]}
    """,
    )
    torch.jit.save(torch.jit.script(TwoInputs().eval()), str(version / "model.pt"))

    # No inputs or outputs in the config: they come from the exported program's signature.
    version = _write(repo, "exported", "backend: pytorch\nmax_batch_size: 16\n")
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(
        DictOutputs().eval(),
        (torch.zeros(2, 5), torch.ones(2, 1)),
        dynamic_shapes={"x": {0: batch}, "scale": {0: batch}},
    )
    torch.export.save(program, str(version / "model.pt2"))

    eager_config = textwrap.dedent("""
        backend: pytorch
        max_batch_size: 4
        input:
          - {name: features, data_type: TYPE_FP32, dims: [6]}
        output:
          - {name: scores, data_type: TYPE_FP32, dims: [2]}
        parameters:
          module_kwargs: '{"hidden": 5}'
    """)
    version = _write(repo, "eager", eager_config)
    (version / "model.py").write_text(EAGER_SOURCE)
    namespace: dict[str, object] = {}
    exec(compile(EAGER_SOURCE, "model.py", "exec"), namespace)  # noqa: S102
    save_file(namespace["Scorer"](hidden=5).state_dict(), str(version / "model.safetensors"))  # type: ignore[operator]

    compiled = _write(repo, "eager_compiled", eager_config + "  torch_compile: true\n  torch_compile_backend: eager\n")
    shutil.copy(version / "model.py", compiled / "model.py")
    shutil.copy(version / "model.safetensors", compiled / "model.safetensors")

    broken = _write(repo, "broken_torchscript", eager_config)
    (broken / "model.pt").write_bytes(b"this is not a TorchScript archive")

    wrong = _write(repo, "wrong_weights", eager_config)
    (wrong / "model.py").write_text(EAGER_SOURCE)
    save_file({"proj.weight": torch.zeros(2, 2)}, str(wrong / "model.safetensors"))

    bad_names = _write(repo, "bad_input_names", eager_config.replace("name: features", "name: pixels"))
    shutil.copy(version / "model.py", bad_names / "model.py")
    shutil.copy(version / "model.safetensors", bad_names / "model.safetensors")

    shutil.copytree(BUNDLED_REPOSITORY / "simple", repo / "simple")
    return repo


@pytest.fixture(scope="module")
def torch_server(start_server: Callable[..., ServerProcess], torch_repo: Path) -> ServerProcess:
    return start_server(torch_repo)


def _client(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def _input(name: str, array: np.ndarray, datatype: str = "FP32") -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_torchscript_maps_inputs_and_outputs_by_position(torch_server: ServerProcess, torch_repo: Path) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 5, 8)).astype(np.float32)
    result = _client(torch_server).infer("torchscript", [_input("INPUT__0", a), _input("INPUT__1", b)])
    module = torch.jit.load(str(torch_repo / "torchscript" / "1" / "model.pt"))
    y, total = module(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), y.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__1"), total.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_program_fills_in_its_config_and_maps_dict_outputs(
    torch_server: ServerProcess, torch_repo: Path
) -> None:
    metadata = httpx.get(f"{torch_server.url}/v2/models/exported").json()
    assert metadata["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 5]},
        {"name": "scale", "datatype": "FP32", "shape": [-1, 1]},
    ]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "best", "datatype": "INT64", "shape": [-1, 1]},
    ]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (7, 1)).astype(np.float32)
    result = _client(torch_server).infer("exported", [_input("scale", scale), _input("x", x)])
    expected = torch.export.load(str(torch_repo / "exported" / "1" / "model.pt2")).module()(
        torch.from_numpy(x), torch.from_numpy(scale)
    )
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("best"), expected["best"].detach().numpy())


@pytest.mark.parametrize("model", ["eager", "eager_compiled"])
def test_eager_module_with_safetensors_weights(torch_server: ServerProcess, torch_repo: Path, model: str) -> None:
    features = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    result = _client(torch_server).infer(model, [_input("features", features)])
    with torch.inference_mode():
        expected = _eager_module(torch_repo / model / "1")(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)


def test_bad_model_files_are_unavailable_with_a_reason_and_others_serve(torch_server: ServerProcess) -> None:
    rows = {row["name"]: row for row in httpx.post(f"{torch_server.url}/v2/repository/index", json={}).json()}
    assert rows["broken_torchscript"]["state"] == "UNAVAILABLE"
    assert "model.pt" in rows["broken_torchscript"]["reason"] and "TorchScript" in rows["broken_torchscript"]["reason"]
    assert rows["wrong_weights"]["state"] == "UNAVAILABLE"
    assert "model.safetensors" in rows["wrong_weights"]["reason"]
    assert rows["bad_input_names"]["state"] == "UNAVAILABLE"
    assert "pixels" in rows["bad_input_names"]["reason"] and "INPUT__0" in rows["bad_input_names"]["reason"]
    for name in ("torchscript", "exported", "eager", "eager_compiled", "simple"):
        assert rows[name]["state"] == "READY", rows[name]


def test_bundled_torch_mlp_matches_the_exported_program(server: ServerProcess) -> None:
    features = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    result = _client(server).infer("torch_mlp", [_input("features", features)])
    module = torch.export.load(str(BUNDLED_REPOSITORY / "torch_mlp" / "1" / "model.pt2")).module()
    expected = module(torch.from_numpy(features))
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), np.ones(3), rtol=1e-5)


def test_missing_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail as if it were not installed
    for name in [m for m in sys.modules if m == "backends.pytorch" or m.startswith("backends.pytorch.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModelLoadError) as error:
        backend_class("pytorch")
    assert 'pip install "modeldock[torch]"' in error.value.message


def test_server_without_torch_serves_everything_else(
    start_server: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "no-torch" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    repo = tmp_path / "repo"
    for name in ("torch_mlp", "simple"):
        shutil.copytree(BUNDLED_REPOSITORY / name, repo / name)
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    server = start_server(repo)
    rows = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index", json={}).json()}
    assert rows["torch_mlp"]["state"] == "UNAVAILABLE"
    assert 'pip install "modeldock[torch]"' in rows["torch_mlp"]["reason"]
    x = np.ones((1, 16), dtype=np.float32)
    result = _client(server).infer("simple", [_input("INPUT0", x), _input("INPUT1", x)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + x)


@pytest.mark.gpu
def test_eager_module_on_the_gpu_matches_the_cpu(
    start_server: Callable[..., ServerProcess], torch_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(torch_repo / "eager", repo / "eager_gpu")
    config = repo / "eager_gpu" / "config.yaml"
    config.write_text(config.read_text() + "instance_group:\n  - {kind: KIND_GPU, gpus: [0]}\n")
    server = start_server(repo)
    features = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    result = _client(server).infer("eager_gpu", [_input("features", features)])
    with torch.inference_mode():
        expected = _eager_module(torch_repo / "eager" / "1")(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-3, atol=1e-4)
