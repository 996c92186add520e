"""A vision-language model with random weights and a locally built processor, for examples and tests.

Idefics3 (the architecture of SmolVLM): a SigLIP-style vision encoder whose patches are pixel-shuffled into a
Llama's embedding space. Nothing is downloaded: the tokenizer is the trained byte-level BPE of
``language_models.py`` with Idefics3's image tokens added, the image processor resizes to 32x32 without splitting
(one global image, four image tokens), and the weights are drawn from a fixed seed. It answers nonsense, but
through the real ``AutoProcessor`` and ``AutoModelForImageTextToText`` code paths of a SmolVLM folder.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIDE = 32
PATCH = 8
SCALE_FACTOR = 2
# (32 / 8)^2 patches, merged 2x2 by the pixel shuffle.
IMAGE_SEQ_LEN = (IMAGE_SIDE // PATCH) ** 2 // SCALE_FACTOR**2
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_vision_language_model(out: Path, *, seed: int = 0, text_heads: int = 4, text_kv_heads: int = 2) -> Path:
    """An ``Idefics3ForConditionalGeneration`` folder (config, weights, tokenizer, processor) at ``out``.

    The language model is 64 wide; vLLM's CPU attention wants heads of at least 32 dimensions, so its tests ask for
    ``text_heads=2``.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    from model_repository.language_models import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", *IMAGE_TOKENS]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIDE},
        max_image_size={"longest_edge": IMAGE_SIDE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<end_of_utterance>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": text_heads,
            "num_key_value_heads": text_kv_heads,
            "max_position_embeddings": 1024,
            # Wide initial weights spread the logits, so greedy decoding has clear winners.
            "initializer_range": 0.2,
            "tie_word_embeddings": False,
            **special,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIDE,
            "patch_size": PATCH,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        **special,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
