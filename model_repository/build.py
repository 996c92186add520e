"""Builds the bundled example models with ``onnx.helper`` (and torch) so every file in the repository can be regenerated.

Run ``python model_repository/build.py`` from the repository root. Seeds are fixed, so the ONNX files come out byte
for byte as committed; ``model.pt2`` gets the same weights and graph, but torch.export writes a random archive id
and this script's path into it, so its bytes differ between runs. ``torch_mlp`` needs torch to build; without it
the script leaves the committed file alone and says so. ``tiny_gpt`` and ``tiny_embedder`` (random-weight GPT-2 and
BERT with a trained tokenizer, see ``language_models.py``) need transformers, and are likewise left alone without
it. ``text_preprocessor`` is plain Python source, committed as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def build_simple() -> onnx.ModelProto:
    """Triton's ``simple`` example in FP32: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    shape = ["batch", 16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, shape),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def build_accumulator(reset_on_start: bool = True) -> onnx.ModelProto:
    """A running sum kept as implicit state: OUTPUT = INPUT + INPUT_STATE, and OUTPUT_STATE (the new state) = OUTPUT.

    With ``reset_on_start`` the graph also takes the START control input ([batch, 1], 0 or 1) and drops the carried
    state when it is 1, so a sequence's first request sums from zero whatever its state input holds.
    """
    shape = ["batch", 1]
    inputs = [
        helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, shape),
        helper.make_tensor_value_info("INPUT_STATE", TensorProto.FLOAT, shape),
    ]
    if reset_on_start:
        inputs.append(helper.make_tensor_value_info("START", TensorProto.FLOAT, shape))
        nodes = [
            helper.make_node("Sub", ["ONE", "START"], ["KEEP"]),
            helper.make_node("Mul", ["INPUT_STATE", "KEEP"], ["CARRIED"]),
            helper.make_node("Add", ["INPUT", "CARRIED"], ["OUTPUT"]),
        ]
        initializers = [numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "ONE")]
    else:
        nodes = [helper.make_node("Add", ["INPUT", "INPUT_STATE"], ["OUTPUT"])]
        initializers = []
    nodes.append(helper.make_node("Identity", ["OUTPUT"], ["OUTPUT_STATE"]))
    graph = helper.make_graph(
        nodes,
        "accumulator",
        inputs,
        [
            helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("OUTPUT_STATE", TensorProto.FLOAT, shape),
        ],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


MLP_FEATURES = 256
MLP_HIDDEN = 1024
MLP_CLASSES = 10


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    """A 3-layer MLP classifier: ``features`` [batch, 256] -> ``logits`` and ``probabilities`` [batch, 10]."""
    rng = np.random.default_rng(seed)

    def dense(name: str, fan_in: int, fan_out: int) -> list[onnx.TensorProto]:
        scale = np.sqrt(2.0 / fan_in)
        weight = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        return [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]

    initializers = (
        dense("fc1", MLP_FEATURES, MLP_HIDDEN)
        + dense("fc2", MLP_HIDDEN, MLP_HIDDEN)
        + dense("fc3", MLP_HIDDEN, MLP_CLASSES)
    )
    nodes = [
        helper.make_node("Gemm", ["features", "fc1.weight", "fc1.bias"], ["h1_pre"]),
        helper.make_node("Relu", ["h1_pre"], ["h1"]),
        helper.make_node("Gemm", ["h1", "fc2.weight", "fc2.bias"], ["h2_pre"]),
        helper.make_node("Relu", ["h2_pre"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc3.weight", "fc3.bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp_classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", MLP_FEATURES])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", MLP_CLASSES]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", MLP_CLASSES]),
        ],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


TORCH_FEATURES = 16
TORCH_HIDDEN = 64
TORCH_CLASSES = 4


def build_torch_mlp(path: Path, seed: int = 0) -> bool:
    """A 2-layer MLP as a torch.export program: ``features`` [batch, 16] -> ``logits``, ``probabilities`` [batch, 4].

    Returns False (and writes nothing) when torch is not installed.
    """
    try:
        import torch
    except ImportError:
        return False

    class TorchMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(TORCH_FEATURES, TORCH_HIDDEN)
            self.fc2 = torch.nn.Linear(TORCH_HIDDEN, TORCH_CLASSES)

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.fc2(torch.relu(self.fc1(features)))
            return {"logits": logits, "probabilities": torch.softmax(logits, dim=-1)}

    torch.manual_seed(seed)
    model = TorchMLP().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.zeros(2, TORCH_FEATURES),), dynamic_shapes={"features": {0: batch}})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return True


def build(out: Path = HERE) -> list[Path]:
    written = []
    models = (("simple", build_simple()), ("mlp_classifier", build_mlp()), ("accumulator", build_accumulator()))
    for name, model in models:
        path = out / name / "1" / "model.onnx"
        _save(model, path)
        written.append(path)
    torch_path = out / "torch_mlp" / "1" / "model.pt2"
    if build_torch_mlp(torch_path):
        written.append(torch_path)
    else:
        print(f"note: torch is not installed; {torch_path} not rebuilt (pip install 'modeldock[torch]')")
    written += build_language_models(out)
    from model_repository.gguf_models import build_gguf_models

    written += build_gguf_models(out)
    from model_repository.llama_models import build_vllm_models

    written += build_vllm_models(out)
    written += build_diffusion_models(out)
    written += build_speech_models(out)
    return written


def build_speech_models(out: Path) -> list[Path]:
    """``tiny_whisper`` (speech to text) and ``tiny_tts`` (text to speech, VITS), see ``speech_models.py``.

    Needs the llm extra; without it the committed folders are left alone.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(
            "note: transformers is not installed; tiny_whisper and tiny_tts not rebuilt (pip install 'modeldock[llm]')"
        )
        return []
    from model_repository.speech_models import build_vits, build_whisper

    folders = [build_whisper(out / "tiny_whisper" / "1"), build_vits(out / "tiny_tts" / "1")]
    return sorted(path for folder in folders for path in folder.iterdir())


def build_language_models(out: Path) -> list[Path]:
    """``tiny_gpt`` (text generation) and ``tiny_embedder`` (embeddings) as Hugging Face folders.

    Needs the llm extra; without it the committed folders are left alone.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(
            "note: transformers is not installed; tiny_gpt and tiny_embedder not rebuilt (pip install 'modeldock[llm]')"
        )
        return []
    from model_repository.language_models import build_causal_lm, build_encoder

    # tiny_gpt's 256 drawn positions grown to 1,024 (same weights otherwise), room for a prompt that lists tools.
    folders = [
        build_causal_lm(out / "tiny_gpt" / "1", n_positions=1024, drawn_positions=256),
        build_encoder(out / "tiny_embedder" / "1"),
    ]
    return sorted(path for folder in folders for path in folder.iterdir())


def build_diffusion_models(out: Path) -> list[Path]:
    """``tiny_diffusion``: a random-weight Stable Diffusion pipeline folder (see ``diffusion_models.py``).

    Needs the diffusers extra; without it the committed folder is left alone.
    """
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("note: diffusers is not installed; tiny_diffusion not rebuilt (pip install 'modeldock[diffusers]')")
        return []
    from model_repository.diffusion_models import build_text_to_image_pipeline

    folder = build_text_to_image_pipeline(out / "tiny_diffusion" / "1")
    return sorted(path for path in folder.rglob("*") if path.is_file())


if __name__ == "__main__":
    # Run as a script, this folder is on the path but the repository root (for ``model_repository.*``) is not.
    sys.path.insert(0, str(HERE.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE, help="repository folder to write into")
    for path in build(parser.parse_args().out):
        print(f"wrote {path}")
