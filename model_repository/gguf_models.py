"""A tiny Llama in GGUF, the file format llama.cpp reads, for ``backend: llamacpp`` examples and tests.

The model is made the way a real GGUF is: a ``transformers`` Llama (random weights from a fixed seed, the byte-level
BPE tokenizer of ``language_models.py``) written tensor by tensor with the ``gguf`` package's writer, under the
tensor names llama.cpp's own converter (``convert_hf_to_gguf.py``) gives them, with the query and key rows permuted
as that converter does (Hugging Face rotates the two halves of each head, llama.cpp interleaved pairs). The
tokenizer (tokens, types, merges, special ids) and a chat template go into the file's metadata, so llama.cpp needs
nothing beside it. Nothing is downloaded, and the same bytes come out on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The chat template of ``language_models.py``, plus the tools a request offers, shown to the model as JSON in a
# system turn (a tiny random model cannot call them, but the rendering is what a real tool-calling model gets).
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>You may call these tools: {{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5


def _permute_rotary(weights: Any, n_head: int) -> Any:
    """Reorder a query or key projection's rows from Hugging Face's rotary layout to llama.cpp's, per head."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def build_tiny_llama(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    context_length: int = 256,
    vocab_size: int = 512,
    initializer_range: float = 0.2,
) -> tuple[Any, Any]:
    """A ``transformers`` Llama (grouped-query attention, tied embeddings) with random weights, and its tokenizer.

    The wide ``initializer_range`` spreads the logits, so greedy decoding has clear winners and the same prompt
    decodes to the same tokens however the runtime orders its arithmetic.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_repository.language_models import build_tokenizer

    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=context_length,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def build_tiny_llama_gguf(path: Path, **sizes: Any) -> Path:
    """``build_tiny_llama(**sizes)`` written as one float32 GGUF file at ``path``."""
    model, tokenizer = build_tiny_llama(**sizes)
    return write_llama_gguf(model, tokenizer, path)


def write_llama_gguf(model: Any, tokenizer: Any, path: Path) -> Path:
    """A ``transformers`` Llama and its byte-level BPE tokenizer as a GGUF file, as llama.cpp's converter writes
    one (float32, so llama.cpp computes with the very weights ``transformers`` does)."""
    import gguf
    import torch

    config = model.config
    hidden_size, num_layers = config.hidden_size, config.num_hidden_layers
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    intermediate_size, context_length = config.intermediate_size, config.max_position_embeddings

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(hidden_size // num_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer))

    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokenizer))]
    )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:  # llama.cpp then reads token_embd
            continue
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            data = _permute_rotary(data, num_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute_rotary(data, num_kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {name}")
        writer.add_tensor(gguf_name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_gguf_models(out: Path) -> list[Path]:
    """``tiny_gguf`` (``backend: llamacpp``). Needs transformers (the llm extra) and gguf (the llamacpp extra);
    without them the committed file is left alone."""
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print(
            "note: gguf or transformers is not installed; tiny_gguf not rebuilt (pip install 'modeldock[llamacpp,llm]')"
        )
        return []
    return [build_tiny_llama_gguf(out / "tiny_gguf" / "1" / "model.gguf")]
