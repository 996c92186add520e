"""A Stable Diffusion pipeline with random weights and a locally built CLIP tokenizer, for examples and tests.

Nothing is downloaded: the tokenizer's vocabulary is the 256 byte-level symbols CLIP's tokenizer starts from (each
alone and as a word end) with no merges, and the weights are drawn from a fixed seed. The pipeline has the real
components of Stable Diffusion (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, a DDIM scheduler),
only tiny, and is saved with ``save_pretrained`` as any Stable Diffusion folder is, so serving it runs the same code
as a real checkpoint. It makes 64x64 images of coloured noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The latent is 32x32: the VAE's two blocks halve the side once (a scale factor of 2), so the images are 64x64.
LATENT_SIZE = 32
IMAGE_SIZE = 64


def build_clip_tokenizer() -> Any:
    """CLIP's byte-level BPE tokenizer with the byte alphabet as its whole vocabulary (any text encodes)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[symbol] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77
    return tokenizer


def build_text_to_image_pipeline(out: Path, *, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` folder at ``out`` (about 2 MB of float32 weights)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(out)
    return out
