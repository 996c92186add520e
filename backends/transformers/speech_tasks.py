"""Which speech task a transformers folder serves, told from ``config.json``'s architectures, and its loading.

transformers keeps, for each auto class, the architectures it maps to; a folder whose architecture is one of the
speech-to-text auto classes' (``WhisperForConditionalGeneration``, ``Wav2Vec2ForCTC``...) transcribes, one of the
text-to-waveform classes' (``VitsModel``...) speaks. Reading those tables instead of listing names here keeps new
architectures working as transformers adds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.config import ModelConfig

SPEECH_TASKS = ("transcribe", "speak")


def speech_task(architectures: list[str]) -> str:
    """``transcribe``, ``speak`` or "" (not a speech model) for a config's ``architectures``."""
    from transformers.models.auto import modeling_auto

    recognizers = {
        *modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values(),
        *modeling_auto.MODEL_FOR_CTC_MAPPING_NAMES.values(),
    }
    speakers = set(modeling_auto.MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES.values())
    if any(name in recognizers for name in architectures):
        return "transcribe"
    if any(name in speakers for name in architectures):
        return "speak"
    return ""


def complete_speech_config(task: str, config: ModelConfig) -> ModelConfig:
    """The KServe v2 inputs and outputs (and batching) of a speech model, unless the config names its own."""
    if task == "transcribe":
        from backends.transformers import speech_recognition

        return speech_recognition.complete_config(config)
    from backends.transformers import text_to_speech

    return text_to_speech.complete_config(config)


def load_speech_model(task: str, config: ModelConfig, folder: Path, torch_device: Any, dtype: Any) -> Any:
    """The loaded model for ``task``: an object with ``execute(inputs, output_names)`` for whole batches."""
    if task == "transcribe":
        from backends.transformers.speech_recognition import SpeechRecognitionModel

        return SpeechRecognitionModel(config, folder, torch_device, dtype)
    from backends.transformers.text_to_speech import SpeechSynthesisModel

    return SpeechSynthesisModel(config, folder, torch_device, dtype)
