"""A tiny Llama with random weights, and LoRA adapters for it, for ``backend: vllm`` examples and tests.

vLLM's CPU attention wants heads of at least 32 dimensions and its LoRA support wants a model class that declares
it (Llama does, GPT-2 does not), so this is a Llama with 2 heads of 32 rather than the GPT-2 of ``tiny_gpt``. It
shares that model's trained tokenizer and chat template (``language_models.py``), and like it is saved with
``save_pretrained``, so vLLM reads it as it reads any Hugging Face checkpoint. Two heads (and two key/value heads)
also let tensor parallelism split it over two ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

# The projections a LoRA adapter made by ``build_lora_adapter`` changes.
LORA_TARGET_MODULES = ("q_proj", "v_proj", "o_proj", "down_proj")


def build_tiny_llama(
    out: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 256,
    vocab_size: int = 512,
    initializer_range: float = 0.2,
) -> Path:
    """A Llama model folder (config, safetensors weights, tokenizer, chat template) at ``out``.

    The wide ``initializer_range`` spreads the logits, so greedy decoding has clear winners and answers agree across
    engines, batch sizes and tensor-parallel splits instead of flipping on rounding.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_repository.language_models import build_tokenizer

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_vllm_models(out: Path) -> list[Path]:
    """``tiny_vllm`` (``backend: vllm``): the tiny Llama in its version folder and its ``pirate`` LoRA adapter.

    Needs transformers (not vLLM); without it the committed folders are left alone. ``config.yaml`` is committed as
    written by hand.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("note: transformers is not installed; tiny_vllm not rebuilt (pip install 'modeldock[llm]')")
        return []
    model = build_tiny_llama(out / "tiny_vllm" / "1")
    adapter = build_lora_adapter(model, out / "tiny_vllm" / "adapters" / "pirate", base_name="tiny_vllm")
    return sorted(path for folder in (model, adapter) for path in folder.iterdir())


def build_lora_adapter(
    base: Path, out: Path, *, seed: int = 1, rank: int = 8, scale: float = 0.5, base_name: str = ""
) -> Path:
    """A LoRA adapter for the model at ``base``, written as PEFT writes one (``adapter_config.json`` and
    ``adapter_model.safetensors``), with random non-zero A and B so that it changes the model's answers.

    It is written by hand rather than with ``peft`` so that building it needs nothing beyond torch and safetensors;
    the tensor names and config fields are PEFT's, which is what vLLM and ``peft`` itself load.
    """
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    intermediate = int(config["intermediate_size"])
    shapes = {  # (in_features, out_features) of each target projection
        "q_proj": (hidden, heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "down_proj": (intermediate, hidden),
    }
    kinds = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "down_proj": "mlp"}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module in LORA_TARGET_MODULES:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{kinds[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(LORA_TARGET_MODULES),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out
