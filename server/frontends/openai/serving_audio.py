"""``POST /v1/audio/transcriptions``, ``/v1/audio/translations`` and ``/v1/audio/speech`` in OpenAI's shape.

Each request becomes an ordinary KServe v2 ``InferRequest`` through ``InferenceServer.infer``, so transcriptions
from concurrent clients meet in the model's dynamic batcher and run as one batch; the speech model's inputs and
outputs are the ones a Triton client sees (see ``backends/transformers/speech_recognition.py`` and
``text_to_speech.py``). The upload is decoded here once before it is queued, so a file that is not audio, or is too
long, is a 400 naming ``file`` for its own client and never fails a batch shared with others.

Speech is made a piece at a time (``speech_pieces``: sentences, and clauses of long ones) and sent as each piece is
ready, so the first audio arrives after the first sentence rather than after the whole text. Each piece is its own
request (seeded alike), so what a client hears equals the model speaking each sentence alone, whether it reads the
body as it comes or all at once. ``pcm``, ``wav`` (its header sizes marked unknown, as OpenAI streams WAV),
``opus`` and ``mp3`` (constant bit rate) are streamed (``audio_codec.StreamingEncoder``); ``flac`` needs its length
in its header and comes whole once all is spoken.
``stream_format: sse`` sends the same bytes base64 in ``speech.audio.delta`` events, then ``speech.audio.done``.

A streamed transcription (``stream=true``) is cut into the model's windows (30 s for Whisper); every window is its
own request, all queued at once (so they are batched together), and each window's text is sent as a
``transcript.text.delta`` event as soon as it and the windows before it are done, then ``transcript.text.done``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from server.core import InferenceServer
from server.errors import ModelNotFound
from server.frontends.openai.errors import OpenAIRequestError, field_error
from server.frontends.openai.events import EventStreamResponse, sse
from server.frontends.openai.serving_engine import ModelNotFoundError, request_id
from server.protocol import audio_codec
from server.protocol.types import InferRequest, RequestedOutput

# OpenAI's limit on an upload.
MAX_FILE_BYTES = 25 * 1024 * 1024
# The speech-recognition backend's default bound on a clip, unless the model's parameters.max_audio_seconds says.
DEFAULT_MAX_AUDIO_SECONDS = 3600.0
WINDOW_SECONDS = 30.0
# The longest piece of text spoken in one model call: a sentence over it is cut at clauses, then at spaces.
MAX_PIECE_CHARS = 250
# Pieces of one speech request queued at once: one being sent while the next is made, without one long text
# filling the model's queue ahead of other clients.
SPEECH_LOOKAHEAD = 2


class TranscriptionForm(BaseModel):
    """The multipart fields of a transcription or translation (``file`` is checked apart: it is an upload)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    language: str | None = Field(default=None, min_length=2, max_length=8)
    prompt: str | None = None
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=list)
    stream: bool = False


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``; ``seed`` is ModelDock's own (the model's noise is seeded, 0 unless given)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str = Field(max_length=4096)
    voice: str | dict[str, Any] = "default"
    instructions: str | None = None
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = Field(default=None, ge=0)


def _model_parameters(core: InferenceServer, model: str) -> dict[str, str]:
    parameters = core.model_config(model).get("parameters", {})
    return {key: value.get("string_value", "") for key, value in parameters.items()}


def _check_task(core: InferenceServer, model: str, task: str, what: str) -> None:
    try:
        found = core.model_task(model)
    except ModelNotFound:
        raise ModelNotFoundError(model) from None
    if found != task:
        raise OpenAIRequestError(f"model '{model}' does not support {what} (its task is '{found or 'none'}')", "model")


def _timestamp(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(segments: list[dict[str, Any]], vtt: bool) -> str:
    """SubRip or WebVTT cues, one per segment."""
    cues = []
    for index, segment in enumerate(segments, start=1):
        start = _timestamp(segment["start"], "." if vtt else ",")
        end = _timestamp(segment["end"], "." if vtt else ",")
        text = segment["text"].strip()
        cues.append(f"{start} --> {end}\n{text}\n" if vtt else f"{index}\n{start} --> {end}\n{text}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


class OpenAIServingAudio:
    def __init__(self, core: InferenceServer) -> None:
        self.core = core

    # -- speech to text -------------------------------------------------------------------------------------
    async def _read_form(self, request: Request, task: str) -> tuple[TranscriptionForm, bytes]:
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exc:  # starlette raises its own errors for a body that is not multipart
            raise OpenAIRequestError(f"the body is not multipart/form-data: {exc}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise OpenAIRequestError("'file': an audio file upload is required", "file")
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key == "file":
                continue
            if not isinstance(value, str):
                raise OpenAIRequestError(f"'{key}': expected a form field, got a file", key)
            if key in ("timestamp_granularities[]", "timestamp_granularities"):
                fields.setdefault("timestamp_granularities", []).append(value)
            else:
                fields[key] = value
        if task == "translate" and "language" in fields:
            raise OpenAIRequestError("'language': translations are always into English; leave it out", "language")
        try:
            parsed = TranscriptionForm.model_validate(fields)
        except ValidationError as exc:
            raise field_error(exc) from None
        data = await upload.read(MAX_FILE_BYTES + 1)
        await upload.close()
        if len(data) > MAX_FILE_BYTES:
            raise OpenAIRequestError(f"'file': larger than {MAX_FILE_BYTES // (1024 * 1024)} MB", "file")
        return parsed, data

    async def transcribe(self, request: Request, task: Literal["transcribe", "translate"]) -> Response:
        form, data = await self._read_form(request, task)
        _check_task(self.core, form.model, "transcribe", "speech to text")
        limit = float(_model_parameters(self.core, form.model).get("max_audio_seconds") or DEFAULT_MAX_AUDIO_SECONDS)
        samples, rate = await asyncio.to_thread(audio_codec.decode_audio, data, None, max_seconds=limit, param="file")
        granularities = set(form.timestamp_granularities)
        if granularities and form.response_format != "verbose_json":
            raise OpenAIRequestError(
                "'timestamp_granularities': only with response_format verbose_json", "timestamp_granularities"
            )
        options: dict[str, Any] = {"task": task, "temperature": form.temperature}
        if form.language:
            options["language"] = form.language
        if form.prompt:
            options["prompt"] = form.prompt
        duration = samples.size / rate
        if form.stream:
            if form.response_format not in ("json", "text"):
                raise OpenAIRequestError("'stream': only with response_format json or text", "stream")
            return self._stream(form.model, samples, rate, options, duration)
        wants_segments = form.response_format in ("verbose_json", "srt", "vtt") and (
            not granularities or "segment" in granularities
        )
        calls = [self._infer(form.model, data, {**options, "timestamps": "segment" if wants_segments else "none"})]
        if "word" in granularities:
            calls.append(self._infer(form.model, data, {**options, "timestamps": "word"}))
        results = await asyncio.gather(*calls)
        text, segments = results[0]
        if form.response_format == "text":
            return Response(text, media_type="text/plain")
        if form.response_format in ("srt", "vtt"):
            return Response(
                subtitles(_closed(segments, duration), form.response_format == "vtt"), media_type="text/plain"
            )
        if form.response_format == "json":
            body: dict[str, Any] = {"text": text, "usage": {"type": "duration", "seconds": int(np.ceil(duration))}}
            return Response(orjson.dumps(body), media_type="application/json")
        body = {
            "task": "translate" if task == "translate" else "transcribe",
            "language": "english" if task == "translate" else (form.language or "unknown"),
            "duration": duration,
            "text": text,
        }
        if wants_segments:
            body["segments"] = [
                {
                    "id": i,
                    "seek": 0,
                    "start": s["start"],
                    "end": s["end"],
                    "text": s["text"],
                    "temperature": form.temperature,
                }
                for i, s in enumerate(_closed(segments, duration))
            ]
        if "word" in granularities:
            body["words"] = [
                {"word": w["text"].strip(), "start": w["start"], "end": w["end"]}
                for w in _closed(results[1][1], duration)
            ]
        return Response(orjson.dumps(body), media_type="application/json")

    async def _infer(self, model: str, audio: bytes, options: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        response = await self.core.infer(
            InferRequest(
                model_name=model,
                id=request_id("audio"),
                inputs={
                    "audio": np.array([[audio]], dtype=np.object_),
                    "options": np.array([[json.dumps(options).encode()]], dtype=np.object_),
                },
                input_datatypes={"audio": "BYTES", "options": "BYTES"},
                outputs=[RequestedOutput("text"), RequestedOutput("chunks")],
            )
        )
        text = response.outputs["text"].reshape(-1)[0]
        chunks = response.outputs["chunks"].reshape(-1)[0]
        return (text.decode() if isinstance(text, bytes) else str(text)), json.loads(chunks)

    def _stream(self, model: str, samples: np.ndarray, rate: int, options: dict[str, Any], duration: float) -> Response:
        step = int(WINDOW_SECONDS * rate)
        windows = [samples[start : start + step] for start in range(0, samples.size, step)]

        async def events() -> AsyncIterator[bytes]:
            options["timestamps"] = "none"
            # Every window queued at once, so the batcher may run them together; their text goes out in order.
            tasks = [
                asyncio.ensure_future(self._infer(model, audio_codec.float_wav(window, rate), options))
                for window in windows
            ]
            pieces: list[str] = []
            try:
                for task in tasks:
                    text, _ = await task
                    delta = text if not pieces else " " + text.lstrip()
                    pieces.append(delta)
                    yield sse(orjson.dumps({"type": "transcript.text.delta", "delta": delta}).decode())
            finally:
                for task in tasks:
                    task.cancel()
            done = {
                "type": "transcript.text.done",
                "text": "".join(pieces),
                "usage": {"type": "duration", "seconds": int(np.ceil(duration))},
            }
            yield sse(orjson.dumps(done).decode())

        stream = events()
        return EventStreamResponse(stream, stream)

    # -- text to speech -------------------------------------------------------------------------------------
    async def speak(self, request: SpeechRequest) -> Response:
        """The speech for ``request.input``, one piece (sentence, or clause of a long one) at a time.

        The first piece is awaited before the response starts, so a text the model cannot speak is a 400 and not a
        broken stream. A one-piece input is answered whole (with its length), as before streaming existed.
        """
        _check_task(self.core, request.model, "speak", "text to speech")
        if not request.input.strip():
            raise OpenAIRequestError("'input' must not be empty", "input")
        voice = request.voice if isinstance(request.voice, str) else str(request.voice.get("id", ""))
        options: dict[str, Any] = {"speed": request.speed, "voice": voice}
        if request.seed is not None:
            options["seed"] = request.seed
        pieces = speech_pieces(request.input)
        spoken = self._spoken(request.model, pieces, json.dumps(options).encode())
        first, rate = await anext(spoken)
        media_type = audio_codec.MEDIA_TYPES[request.response_format]
        headers = {"X-Sample-Rate": str(rate)}
        audio_format = request.response_format
        if request.stream_format == "sse":
            events = self._speech_events(first, spoken, rate, audio_format, len(request.input))
            return EventStreamResponse(events, spoken)
        if len(pieces) == 1 or audio_format not in audio_codec.STREAMED_FORMATS:
            # Nothing to stream, or a format whose header needs the whole length: one body once all is spoken.
            waveform = np.concatenate([first, *[piece async for piece, _ in spoken]])
            body = await asyncio.to_thread(audio_codec.encode_audio, waveform, rate, audio_format)
            return Response(body, media_type=media_type, headers=headers)
        chunks = self._encoded(first, spoken, rate, audio_format)
        return AudioStreamResponse(chunks, spoken, media_type, headers)

    async def _spoken(self, model: str, pieces: list[str], options: bytes) -> AsyncIterator[tuple[np.ndarray, int]]:
        """Each piece's waveform and rate, in order. ``SPEECH_LOOKAHEAD`` pieces are queued at a time, so the next
        is being made while one is sent (and several instances work in parallel) without one long text taking
        the whole queue from other clients; leaving early cancels what is still queued."""
        queued: deque[asyncio.Future[tuple[np.ndarray, int]]] = deque()
        upcoming = iter(pieces)
        try:
            for piece in itertools.islice(upcoming, SPEECH_LOOKAHEAD):
                queued.append(asyncio.ensure_future(self._speak_piece(model, piece, options)))
            while queued:
                waveform, rate = await queued.popleft()
                for piece in itertools.islice(upcoming, 1):
                    queued.append(asyncio.ensure_future(self._speak_piece(model, piece, options)))
                yield waveform, rate
        finally:
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)

    async def _speak_piece(self, model: str, text: str, options: bytes) -> tuple[np.ndarray, int]:
        response = await self.core.infer(
            InferRequest(
                model_name=model,
                id=request_id("speech"),
                inputs={
                    "text_input": np.array([text.encode()], dtype=np.object_),
                    "options": np.array([options], dtype=np.object_),
                },
                input_datatypes={"text_input": "BYTES", "options": "BYTES"},
                outputs=[RequestedOutput("waveform"), RequestedOutput("sample_rate")],
            )
        )
        waveform = response.outputs["waveform"].reshape(-1).astype(np.float32, copy=False)
        return waveform, int(response.outputs["sample_rate"].reshape(-1)[0])

    @staticmethod
    async def _encoded(
        first: np.ndarray, rest: AsyncIterator[tuple[np.ndarray, int]], rate: int, audio_format: str
    ) -> AsyncIterator[bytes]:
        """The file's bytes as each piece is spoken; pieces that give no bytes yet (an encoder filling a page) send none."""
        encoder = await asyncio.to_thread(audio_codec.StreamingEncoder, audio_format, rate)
        head = encoder.header() + await asyncio.to_thread(encoder.encode, first)
        if head:
            yield head
        async for waveform, _ in rest:
            data = await asyncio.to_thread(encoder.encode, waveform)
            if data:
                yield data
        tail = await asyncio.to_thread(encoder.close)
        if tail:
            yield tail

    async def _speech_events(
        self,
        first: np.ndarray,
        rest: AsyncIterator[tuple[np.ndarray, int]],
        rate: int,
        audio_format: str,
        characters: int,
    ) -> AsyncIterator[bytes]:
        """OpenAI's ``speech.audio.delta`` events (base64 of the file's next bytes), then ``speech.audio.done``.
        A format that cannot be streamed comes as one delta holding the whole file once all is spoken."""
        if audio_format in audio_codec.STREAMED_FORMATS:
            chunks = self._encoded(first, rest, rate, audio_format)
        else:
            chunks = self._whole(first, rest, rate, audio_format)
        async for chunk in chunks:
            delta = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")}
            yield sse(orjson.dumps(delta).decode())
        # The model reads characters, not tokens: usage counts the input's characters and no output tokens.
        usage = {"input_tokens": characters, "output_tokens": 0, "total_tokens": characters}
        yield sse(orjson.dumps({"type": "speech.audio.done", "usage": usage}).decode())

    @staticmethod
    async def _whole(
        first: np.ndarray, rest: AsyncIterator[tuple[np.ndarray, int]], rate: int, audio_format: str
    ) -> AsyncIterator[bytes]:
        waveform = np.concatenate([first, *[piece async for piece, _ in rest]])
        yield await asyncio.to_thread(audio_codec.encode_audio, waveform, rate, audio_format)


class AudioStreamResponse(EventStreamResponse):
    """An audio file's bytes sent as they are made (chunked, no Content-Length), closed however the send ends."""

    def __init__(
        self, chunks: AsyncIterator[bytes], source: AsyncIterator[object], media_type: str, headers: dict[str, str]
    ) -> None:
        self.media_type = media_type
        super().__init__(chunks, source)
        for key, value in headers.items():
            self.headers[key] = value


# A sentence's end: terminal punctuation with any closing quotes or brackets, before a space (kept with the
# sentence); CJK full stops need no space. Line breaks end a sentence too.
_SENTENCE_END = re.compile(r"([.!?\u2026;]+[\"'\u201d\u2019)\]]*)\s+|([\u3002\uff01\uff1f]+)")
# Where a clause of a long sentence ends.
_CLAUSE_END = re.compile(r"(?<=[,:\u2014\u3001\uff0c])\s*")


def speech_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """``text`` cut into the pieces spoken one at a time: sentences; a sentence over ``max_chars`` cut at its
    clauses, packed while they fit, then at spaces, then anywhere. A piece with no letter or digit (a lone "...")
    joins the piece before it, as the model might find nothing in it to say."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.sub(lambda end: (end.group(1) or end.group(2)) + "\n", text).split("\n"):
        sentence = sentence.strip()
        if not sentence:
            continue
        if not any(c.isalnum() for c in sentence) and pieces:
            pieces[-1] = f"{pieces[-1]} {sentence}"
            continue
        if len(sentence) <= max_chars:
            pieces.append(sentence)
            continue
        pieces.extend(_packed(sentence, max_chars))
    return pieces


def _packed(sentence: str, max_chars: int) -> list[str]:
    """A long sentence as pieces of at most ``max_chars``: whole clauses where they fit, else words, else cuts."""
    units: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        clause = clause.strip()
        if len(clause) <= max_chars:
            units.append(clause)
            continue
        for word in clause.split():
            units.extend(word[i : i + max_chars] for i in range(0, len(word), max_chars))
    pieces: list[str] = []
    for unit in filter(None, units):
        if pieces and len(pieces[-1]) + 1 + len(unit) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {unit}"
        else:
            pieces.append(unit)
    return pieces


def _closed(segments: list[dict[str, Any]], duration: float) -> list[dict[str, Any]]:
    """Segments with an end time: Whisper may leave the last one open (``None``); it ends with the audio."""
    return [
        {**s, "start": float(s["start"] or 0.0), "end": float(s["end"] if s["end"] is not None else duration)}
        for s in segments
    ]
