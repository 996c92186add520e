"""Small speech models with random weights and locally built tokenizers, for examples, tests and benchmarks.

Nothing is downloaded. ``build_whisper`` writes a Whisper folder (speech to text) whose tokenizer holds a byte-level
BPE trained on a few lines of text plus Whisper's own special tokens (start of transcript, the language and task
tokens, the timestamp tokens), and whose generation config carries the token ids Whisper's ``generate`` looks up, as a
real checkpoint's does. ``build_vits`` writes a VITS folder (text to speech) with a character tokenizer. Both are
saved with ``save_pretrained``, so serving them takes the same code path as ``openai/whisper-*`` or
``facebook/mms-tts-*``; their output is noise and babble, but it is the model's own output, which is what tests
compare.
"""

from __future__ import annotations

import json
from pathlib import Path

_CORPUS = """
ModelDock transcribes speech and speaks text. The quick brown fox jumps over the lazy dog. Hello world! One, two,
three, four, five, six, seven, eight, nine, ten. What is the weather like today? It is sunny with a light breeze.
Bonjour tout le monde. Guten Tag. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.
"""

# Whisper's special tokens after the text vocabulary, in the order its checkpoints hold them; the timestamp tokens
# (<|0.00|> to <|30.00|> in steps of 0.02 s) follow <|notimestamps|>, as the timestamp processor expects.
_TASK_TOKENS = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
_TIMESTAMP_STEPS = 1501


def _whisper_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = WhisperTokenizer(vocab=state["vocab"], merges=merges, pad_token="<|endoftext|>")
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *_TASK_TOKENS, "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(_TIMESTAMP_STEPS)])
    return tokenizer


def build_whisper(
    out: Path,
    *,
    seed: int = 0,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 400,
    max_target_positions: int = 64,
    init_std: float = 0.2,
) -> Path:
    """A Whisper folder (config, weights, tokenizer, feature extractor, generation config) at ``out``.

    The defaults make a model of about 2 MB; ``d_model=384, layers=4, heads=6`` is Whisper-tiny's size. The wide
    ``init_std`` spreads the logits, so greedy decoding has clear winners and a clip decodes to the same tokens alone
    or in a batch. ``max_target_positions`` bounds a transcript's tokens (448 in real checkpoints): random weights
    rarely say end-of-text, so every transcript runs to it.
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    tokenizer = _whisper_tokenizer(vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    sot = ids("<|startoftranscript|>")
    no_timestamps = ids("<|notimestamps|>")
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=d_model * 4,
        decoder_ffn_dim=d_model * 4,
        max_source_positions=1500,
        max_target_positions=max_target_positions,
        init_std=init_std,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    model = WhisperForConditionalGeneration(config).eval()
    # Whisper's output layer is its token embedding. Timestamp rows a tenth as large keep the random model from
    # picking timestamp tokens where none were asked for (a trained model learns not to), which would otherwise make
    # ``generate`` decode every clip several times over, one "segment" per stray timestamp.
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[no_timestamps + 1 :] *= 0.1
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_target_positions,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")},
        no_timestamps_token_id=no_timestamps,
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
        # Cross-attention heads read for word timestamps (real checkpoints list the heads that align best).
        alignment_heads=[[layer, head] for layer in range(layers) for head in range(heads)],
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(out)
    return out


def build_vits(
    out: Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    sampling_rate: int = 16000,
) -> Path:
    """A VITS folder (MMS-TTS's architecture) with a lower-case character tokenizer, at ``out``.

    The upsampling rates multiply to 256, as in MMS-TTS, so one spectrogram frame is 256 samples.
    """
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    characters = list(" abcdefghijklmnopqrstuvwxyz0123456789'.,!?-")
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(characters)}, "<unk>": len(characters) + 1}
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = VitsTokenizer(str(vocab_file), phonemize=False, add_blank=True, normalize=True)
    torch.manual_seed(seed)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=hidden_size * 4,
        flow_size=hidden_size,
        spectrogram_bins=65,
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=2,
        posterior_encoder_num_wavenet_layers=2,
        duration_predictor_num_flows=2,
        duration_predictor_filter_channels=hidden_size,
        upsample_initial_channel=hidden_size * 2,
        upsample_rates=[8, 8, 4],
        upsample_kernel_sizes=[16, 16, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        sampling_rate=sampling_rate,
    )
    model = VitsModel(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
