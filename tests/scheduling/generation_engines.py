"""The tiny engine the generation tests run, and transformers' own greedy answers they are checked against.

One copy for every engine test module (continuous batching, prefix caching, speculation, overload, structured
outputs): each builds the same in-process ``GenerationEngine`` over a test GPT-2 folder, with only its
``parameters`` differing, and compares greedy tokens with ``model.generate`` on the same folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from backends.transformers import TransformersBackend
from server.config import ModelConfig
from server.devices import CPU, Device
from server.extensions.generation_metrics import GenerationStats
from server.protocol.generation import SamplingParams
from server.scheduling.generation.engine import EngineLimits, GenerationEngine


def make_engine(folder: Path, device: Device = CPU, **parameters: str) -> GenerationEngine:
    """An engine over the model in ``folder`` with the given model ``parameters`` (as a config's YAML has them)."""
    config = TransformersBackend.auto_complete_config(
        ModelConfig(name="lm", backend="transformers", parameters=parameters), folder
    )
    backend = TransformersBackend(config, folder, device)
    return GenerationEngine("lm", backend, EngineLimits.from_config(config, backend), GenerationStats())


def greedy_reference(folder: Path) -> Callable[[str, int], list[int]]:
    """``generate_alone(prompt, max_new_tokens)``: transformers' greedy tokens for one prompt, alone, to the full
    length (no end-of-sequence stop, as the tests ask the engine with ``ignore_eos``)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    def generate_alone(prompt: str, max_new_tokens: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return list(out[0, ids.shape[1] :].tolist())

    return generate_alone


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    """Greedy sampling to exactly ``max_tokens`` tokens."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)
