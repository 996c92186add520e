"""Speech to text (``parameters.task: transcribe``): Whisper and other speech-recognition models, batch by batch.

The model runs through transformers' own ``automatic-speech-recognition`` pipeline, handed a whole batch of clips at
once: the pipeline turns each clip into features, cuts audio longer than the model's window (30 s for Whisper) into
overlapping chunks and stitches their text back together, and Whisper's timestamp and word-alignment decoding comes
with it. ModelDock's part is what the pipeline does not do: the dynamic batcher puts concurrent requests in one
batch, and this module hands every clip of that batch to one ``generate`` call (an encoder pass and a decoder loop
for all of them) instead of one per request. Clips whose options differ (language, task, prompt, temperature,
timestamps) cannot share a ``generate`` call, so a batch runs once per distinct set of options.

Inputs (KServe v2): ``audio`` (BYTES: an encoded file, one per batch row) or ``samples`` (FP32: mono samples at the
model's sampling rate), and optionally ``options`` (BYTES: ``TranscriptionOptions`` as JSON). Outputs: ``text``,
``chunks`` (BYTES: JSON list of ``{"start", "end", "text"}`` when timestamps were asked for, else ``[]``) and
``duration`` (FP32 seconds of audio).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import tensor
from server.config import DynamicBatching, ModelConfig
from server.errors import InvalidInput, ModelLoadError
from server.protocol.audio_codec import AudioError, decode_audio

TASK = "transcribe"
DEFAULT_BATCH = 16
DEFAULT_QUEUE_DELAY_US = 20_000
# The longest clip accepted unless ``parameters.max_audio_seconds`` says otherwise: an hour of speech is 120 windows
# of Whisper's 30 s, a few minutes of a CPU's time with whisper-tiny.
DEFAULT_MAX_AUDIO_SECONDS = 3600.0


class TranscriptionOptions(BaseModel):
    """What one clip asks of the model; the ``options`` input carries it as JSON."""

    model_config = ConfigDict(extra="forbid")

    language: str | None = Field(default=None, description="Spoken language (ISO-639-1, e.g. 'en'); None detects")
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = Field(default=None, description="Text that came before, to steer spelling and style")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 decodes greedily, more samples")
    timestamps: Literal["none", "segment", "word"] = "none"

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        # Transcribing is Whisper's default; naming the task anyway would put its token in the prompt, which the
        # model's own defaults (and so transformers' pipeline) leave out.
        kwargs: dict[str, Any] = {"task": "translate"} if self.task == "translate" else {}
        # The pipeline decodes with 5 beams unless the model's generation config names a beam count; OpenAI's API
        # has no beams, and greedy decoding is what batches well (beam search reorders every cache at every step).
        kwargs["num_beams"] = 1
        if self.language:
            kwargs["language"] = self.language
        if self.prompt:
            kwargs["prompt_ids"] = tokenizer.get_prompt_ids(self.prompt, return_tensors="pt")
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
        return kwargs


def complete_config(config: ModelConfig) -> ModelConfig:
    """A batching model (dynamic batcher on) with the inputs and outputs above, unless the config names its own."""
    if not config.max_batch_size:
        config.max_batch_size = DEFAULT_BATCH
    if config.dynamic_batching is None:
        # A batch takes hundreds of milliseconds to seconds, so waiting up to 20 ms for clients that arrive together
        # costs little and lets their first batch hold all of them instead of only the first to arrive.
        config.dynamic_batching = DynamicBatching(max_queue_delay_microseconds=DEFAULT_QUEUE_DELAY_US)
    if not config.input:
        config.input = [
            tensor("audio", "TYPE_STRING", [1], optional=True),
            tensor("samples", "TYPE_FP32", [-1], optional=True),
            tensor("options", "TYPE_STRING", [1], optional=True),
        ]
    if not config.output:
        config.output = [
            tensor("text", "TYPE_STRING", [1]),
            tensor("chunks", "TYPE_STRING", [1]),
            tensor("duration", "TYPE_FP32", [1]),
        ]
    return config


def _text(item: Any, name: str) -> str:
    try:
        return item.decode() if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidInput(f"input '{name}' is not valid UTF-8") from None


def parse_options(item: Any) -> TranscriptionOptions:
    raw = _text(item, "options")
    try:
        return TranscriptionOptions.model_validate_json(raw or "{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"input 'options': '{where}': {first['msg']}" if where else first["msg"]) from None


class SpeechRecognitionModel:
    """One loaded speech-recognition model and the pipeline that drives it."""

    def __init__(self, config: ModelConfig, folder: Path, torch_device: Any, dtype: Any) -> None:
        from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

        self.config = config
        self.max_seconds = float(config.parameters.get("max_audio_seconds") or DEFAULT_MAX_AUDIO_SECONDS)
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            try:
                model = AutoModelForSpeechSeq2Seq.from_pretrained(folder, local_files_only=True, dtype=dtype)
            except ValueError:
                model = AutoModelForCTC.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except Exception as exc:
            raise ModelLoadError(f"{folder}: transformers cannot load the model: {type(exc).__name__}: {exc}") from None
        model.to(torch_device).eval()
        self.tokenizer = processor.tokenizer
        self.pipeline = pipeline(
            "automatic-speech-recognition",
            model=model,
            tokenizer=processor.tokenizer,
            feature_extractor=processor.feature_extractor,
            device=torch_device,
            dtype=dtype,
        )
        self.sampling_rate = int(processor.feature_extractor.sampling_rate)
        # The model's window in seconds (Whisper: 30); longer clips are cut into chunks of it.
        self.window_s = float(getattr(processor.feature_extractor, "chunk_length", 0) or 30)
        self.whisper = self.pipeline.type == "seq2seq_whisper"

    def _speaks(self, language: str) -> bool:
        """Whether Whisper's ``generate`` takes ``language``: a code (``fr``) or a name (``french``) it has a token for."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        known = getattr(self.pipeline.model.generation_config, "lang_to_id", None) or {}
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        return f"<|{code}|>" in known

    def _clips(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if "audio" in inputs:
            return [
                decode_audio(bytes(item), self.sampling_rate, max_seconds=self.max_seconds, param="audio")[0]
                for item in inputs["audio"].reshape(-1)
            ]
        if "samples" in inputs:
            rows = inputs["samples"].astype(np.float32, copy=False)
            clips = [np.ascontiguousarray(row) for row in rows.reshape(rows.shape[0], -1)]
            for clip in clips:
                if clip.size == 0:
                    raise InvalidInput("input 'samples' holds no audio samples")
                if clip.size / self.sampling_rate > self.max_seconds:
                    raise InvalidInput(
                        f"input 'samples': {clip.size / self.sampling_rate:.1f} s of audio; at most "
                        f"{self.max_seconds:g} s are accepted"
                    )
            return clips
        raise InvalidInput("one of the inputs 'audio' (an encoded file) or 'samples' (FP32 samples) is required")

    def _check(self, options: TranscriptionOptions) -> None:
        if self.whisper:
            if options.language and not self._speaks(options.language):
                raise AudioError(
                    f"'language': model '{self.config.name}' does not know '{options.language}'", "language"
                )
            return
        if options.language or options.task != "transcribe" or options.prompt or options.timestamps == "segment":
            raise InvalidInput(
                f"input 'options': model '{self.config.name}' is not a Whisper model: it takes no language, task, "
                "prompt or segment timestamps"
            )

    def execute(self, inputs: Mapping[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        clips = self._clips(inputs)
        rows = len(clips)
        raw_options = inputs["options"].reshape(-1) if "options" in inputs else [b""] * rows
        options = [parse_options(item) for item in raw_options]
        for option in options:
            self._check(option)
        # One pipeline call per distinct set of options; each call is one batch through the model.
        groups: dict[str, list[int]] = {}
        for row, option in enumerate(options):
            groups.setdefault(option.model_dump_json(), []).append(row)
        texts: list[str] = [""] * rows
        chunks: list[str] = ["[]"] * rows
        for members in groups.values():
            option = options[members[0]]
            long = any(clips[row].size > self.window_s * self.sampling_rate for row in members)
            call: dict[str, Any] = {"batch_size": len(members)}
            if long:
                call["chunk_length_s"] = self.window_s
            if option.timestamps != "none":
                call["return_timestamps"] = "word" if option.timestamps == "word" else True
            if self.whisper:
                call["generate_kwargs"] = option.generate_kwargs(self.tokenizer)
            # The pipeline takes ownership of the arrays it is given (it may write into them): copies go in.
            results = self.pipeline([clips[row].copy() for row in members], **call)
            for row, result in zip(members, results, strict=True):
                texts[row] = result["text"]
                if option.timestamps != "none":
                    chunks[row] = json.dumps(
                        [
                            {"start": chunk["timestamp"][0], "end": chunk["timestamp"][1], "text": chunk["text"]}
                            for chunk in result.get("chunks", [])
                        ]
                    )
        return {
            "text": np.array([[t.encode()] for t in texts], dtype=np.object_),
            "chunks": np.array([[c.encode()] for c in chunks], dtype=np.object_),
            "duration": np.array([[clip.size / self.sampling_rate] for clip in clips], dtype=np.float32),
        }
