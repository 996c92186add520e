"""Text to speech (``parameters.task: speak``): VITS (MMS-TTS) and other text-to-waveform models.

VITS makes a whole utterance in one forward pass (it is not autoregressive), so there is nothing to stream while
it runs: a request gets its waveform once the pass is done. Streaming is the OpenAI front end's work: it sends a
long text here a sentence at a time and passes each waveform on as it comes (``serving_audio.speech_pieces``). Its duration predictor and prior draw random noise, so
the same text gives a different waveform on each call unless the random generator is seeded; every request is
seeded (``options.seed``, else ``parameters.seed``, else 0), so a text spoken twice sounds the same and equals what
the model itself gives after ``torch.manual_seed(seed)``. Utterances differ in length, so the model serves one
request per call (``max_batch_size: 0``); instances give concurrency.

Inputs (KServe v2): ``text_input`` (BYTES [1]) and optionally ``options`` (BYTES: ``SpeechOptions`` as JSON).
Outputs: ``waveform`` (FP32 [-1]: mono samples in [-1, 1]) and ``sample_rate`` (INT32 [1]).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import tensor
from server.config import ModelConfig
from server.errors import ConfigError, InvalidInput, ModelLoadError

TASK = "speak"
# OpenAI's bound on ``input``.
MAX_INPUT_CHARS = 4096


class SpeechOptions(BaseModel):
    """What one utterance asks of the model; the ``options`` input carries it as JSON."""

    model_config = ConfigDict(extra="forbid")

    speed: float = Field(default=1.0, ge=0.25, le=4.0, description="Speaking rate; 2.0 is twice as fast")
    voice: str | None = Field(default=None, description="Speaker index of a multi-speaker model")
    seed: int | None = Field(default=None, ge=0, description="Seed of the model's noise; the model's default if None")


def complete_config(config: ModelConfig) -> ModelConfig:
    if config.max_batch_size:
        raise ConfigError("field 'max_batch_size': a text-to-speech model serves one utterance per call; leave it at 0")
    if not config.input:
        config.input = [tensor("text_input", "TYPE_STRING", [1]), tensor("options", "TYPE_STRING", [1], True)]
    if not config.output:
        config.output = [tensor("waveform", "TYPE_FP32", [-1]), tensor("sample_rate", "TYPE_INT32", [1])]
    return config


def _text(item: Any, name: str) -> str:
    try:
        return item.decode() if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}' is not valid UTF-8") from None


class SpeechSynthesisModel:
    """One loaded text-to-waveform model."""

    def __init__(self, config: ModelConfig, folder: Path, torch_device: Any, dtype: Any) -> None:
        import torch
        from transformers import AutoModelForTextToWaveform, AutoTokenizer

        self._torch = torch
        self.config = config
        self.torch_device = torch_device
        self.default_seed = config.int_parameter("seed") or 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForTextToWaveform.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"{folder}: transformers cannot load the model: {type(exc).__name__}: {exc}") from None
        self.model.to(torch_device).eval()
        self.sampling_rate = int(self.model.config.sampling_rate)
        self.speakers = int(getattr(self.model.config, "num_speakers", 1) or 1)
        self._default_rate = float(getattr(self.model.config, "speaking_rate", 1.0) or 1.0)

    def _speaker(self, voice: str | None) -> int | None:
        """A multi-speaker model's speaker index; single-speaker models take any voice name (OpenAI's included)."""
        if self.speakers <= 1:
            return None
        if voice is None or not voice.isdigit() or int(voice) >= self.speakers:
            raise InvalidInput(
                f"'voice': model '{self.config.name}' has {self.speakers} speakers; name one as 0 to "
                f"{self.speakers - 1}, got '{voice}'"
            )
        return int(voice)

    def synthesize(self, text: str, options: SpeechOptions) -> np.ndarray:
        """The model's waveform for ``text`` (float32, mono), with the noise seeded as ``options`` says."""
        if not text.strip():
            raise InvalidInput("'input': the text to speak is empty")
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidInput(f"'input': {len(text)} characters; at most {MAX_INPUT_CHARS} are accepted")
        speaker = self._speaker(options.voice)
        encoded = self.tokenizer(text, return_tensors="pt")
        if encoded["input_ids"].shape[1] == 0:
            raise InvalidInput("'input': no character of the text is in the model's vocabulary")
        encoded = {k: v.to(self.torch_device) for k, v in encoded.items()}
        torch = self._torch
        seed = self.default_seed if options.seed is None else options.seed
        # VITS reads its speaking rate from the module; an instance runs one call at a time, so setting it is safe.
        self.model.speaking_rate = self._default_rate * options.speed
        with torch.inference_mode():
            torch.manual_seed(seed)
            extra = {} if speaker is None else {"speaker_id": speaker}
            waveform = self.model(**encoded, **extra).waveform[0]
        return waveform.float().cpu().numpy()

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        text = _text(inputs["text_input"].reshape(-1)[0], "text_input")
        raw = _text(inputs["options"].reshape(-1)[0], "options") if "options" in inputs else ""
        try:
            options = SpeechOptions.model_validate_json(raw or "{}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidInput(f"input 'options': '{where}': {first['msg']}" if where else first["msg"]) from None
        waveform = self.synthesize(text, options)
        return {"waveform": waveform, "sample_rate": np.array([self.sampling_rate], dtype=np.int32)}
