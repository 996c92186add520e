"""Audio files in and out: decoding an uploaded file to mono float samples at a model's rate, encoding samples back.

Decoding and encoding go through libsndfile (the ``soundfile`` package, whose wheels bundle libsndfile 1.2: WAV,
FLAC, OGG Vorbis/Opus and MP3 both ways), so no ffmpeg binary is needed. The format is read from the file's own
header, never from its name. Resampling uses ``soxr`` (libsoxr's high-quality band-limited resampler, the one
librosa itself defaults to): it is one small wheel with no other dependencies, where librosa would bring numba and
scipy for the same call. Both are in the ``audio`` extra; without it the first call says which command installs them.

Limits are checked before the work: a file's duration comes from its header, so an hour-long upload is refused
before a sample of it is decoded.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from server.errors import InvalidInput

AUDIO_EXTRA = 'pip install "modeldock[audio]"'
# What ``encode_audio`` writes, with libsndfile's container and sample format for each.
ENCODINGS: dict[str, tuple[str, str | None]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
# ``pcm``: raw 16-bit little-endian samples with no header, as OpenAI's ``pcm`` format is.
SPEECH_FORMATS = ("wav", "flac", "pcm", "mp3", "opus")
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
}
# Opus codes only these rates; other rates are resampled to 48 kHz first.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class AudioError(InvalidInput):
    """An upload that is not audio, or audio over a limit; ``param`` names the field it came in."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _soundfile() -> Any:
    try:
        import soundfile
    except ImportError as exc:
        raise InvalidInput(f"audio needs soundfile and soxr ({exc}): {AUDIO_EXTRA}") from None
    return soundfile


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``samples`` (1-D float32) from one sample rate to another; a copy only when the rates differ."""
    if from_rate == to_rate:
        return samples
    try:
        import soxr
    except ImportError as exc:
        raise InvalidInput(f"resampling audio needs soxr ({exc}): {AUDIO_EXTRA}") from None
    return np.asarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def decode_audio(
    data: bytes, sample_rate: int | None, *, max_seconds: float, param: str = "file"
) -> tuple[np.ndarray, int]:
    """An encoded file (WAV, FLAC, OGG, MP3...) as mono float32 samples at ``sample_rate`` (the file's own rate
    when None), and that rate.

    Channels are averaged, as Whisper's own preprocessing does. Raises ``AudioError`` naming ``param`` when the
    bytes are not audio libsndfile reads, when the file is empty, or when it lasts longer than ``max_seconds``.
    """
    soundfile = _soundfile()
    if not data:
        raise AudioError(f"'{param}' is empty", param)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio:
            if audio.samplerate <= 0:
                raise AudioError(f"'{param}': the file gives no sample rate", param)
            # MP3 headers may not know the length (frames == 0 or a guess); the decoded length is checked below.
            seconds = audio.frames / audio.samplerate
            if seconds > max_seconds:
                raise AudioError(
                    f"'{param}': the audio lasts {seconds:.1f} s; at most {max_seconds:g} s are accepted", param
                )
            samples = audio.read(dtype="float32", always_2d=True)
            rate = int(audio.samplerate)
    except AudioError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's message names the BytesIO object first; its reason is what follows the last colon.
        reason = str(exc).rpartition(": ")[2] or type(exc).__name__
        raise AudioError(
            f"'{param}' is not an audio file this server decodes (wav, flac, ogg, mp3): {reason}", param
        ) from None
    if samples.shape[0] == 0:
        raise AudioError(f"'{param}' holds no audio samples", param)
    if samples.shape[0] / rate > max_seconds:
        raise AudioError(
            f"'{param}': the audio lasts {samples.shape[0] / rate:.1f} s; at most {max_seconds:g} s are accepted",
            param,
        )
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if sample_rate is None:
        return mono, rate
    return resample(mono, rate, sample_rate), sample_rate


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as 16-bit integers (clipped, rounded to nearest): what a PCM_16 WAV holds."""
    return np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """Mono float32 samples as a file of ``audio_format`` (one of ``SPEECH_FORMATS``)."""
    if audio_format == "pcm":
        return pcm16(samples).tobytes()
    container, subtype = ENCODINGS[audio_format]
    if audio_format == "opus" and sample_rate not in _OPUS_RATES:
        samples, sample_rate = resample(samples, sample_rate, 48000), 48000
    soundfile = _soundfile()
    buffer = io.BytesIO()
    if subtype == "PCM_16":
        # Written from integers rounded here, so a client reading the file gets exactly ``pcm16(samples)``.
        soundfile.write(buffer, pcm16(samples), sample_rate, format=container, subtype=subtype)
    else:
        soundfile.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def float_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """Samples as a 32-bit float WAV: a lossless container for passing decoded audio on to a model."""
    buffer = io.BytesIO()
    _soundfile().write(buffer, samples, sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


# Formats whose bytes can go out as they are written, so a body can be sent while the audio is still being made.
STREAMED_FORMATS = ("pcm", "wav", "opus", "mp3")
# A streamed WAV's RIFF and data sizes: unknown up front, so the largest value, as OpenAI's streamed WAV has them.
_UNKNOWN_SIZE = 0xFFFFFFFF
# libsndfile's 0 (best) to 1 (smallest) for a streamed MP3's constant bit rate: 0.5 gives about 85 kbit/s at 16 kHz.
_STREAMED_MP3_COMPRESSION = 0.5


class _ForwardSink:
    """The file object libsndfile encodes into for a stream: bytes pile up until ``take`` hands them on.

    Bytes handed on are gone, so a write that goes back over them is dropped. libsndfile writes Ogg pages strictly
    in order; for MP3 it goes back only at the end, to fill its first frame with a Xing header (the length and
    gapless information), which a stream cannot know up front: that frame stays as it went out, silence, as in a
    live MP3 stream.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._sent = 0
        self._position = 0

    def write(self, data: bytes) -> int:
        size = len(data)
        start = self._position - self._sent
        if start < 0:
            data, start = data[-start:], 0
        self._pending[start : start + len(data)] = data
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        end = self._sent + len(self._pending)
        self._position = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: end}[whence]
        return self._position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data, self._pending = bytes(self._pending), bytearray()
        self._sent += len(data)
        return data


class StreamingEncoder:
    """Samples in, the bytes of one audio file out as the samples come (``STREAMED_FORMATS`` only).

    ``pcm`` has no header. ``wav`` starts with a 16-bit PCM header whose sizes say "unknown", which libsndfile,
    ffmpeg and browsers read to the end of the body. ``opus`` is libsndfile's Ogg Opus writer, fed piece by piece,
    with rates Opus cannot code resampled by one soxr stream so piece boundaries leave no seams. ``mp3`` is
    libsndfile's LAME encoder at a constant bit rate: with no Xing header to give the length (see ``_ForwardSink``)
    readers reckon it from the size and bit rate, which only a constant rate gets right. FLAC is not offered: a
    reader of a FLAC stream whose STREAMINFO does not give its length (libsndfile's own) fails.

    The samples a reader decodes from ``header() + encode(a) + encode(b) + close()`` are those of one file written
    from ``a`` and ``b`` joined: ``pcm16`` is taken sample by sample, and the Opus and MP3 encoders keep their
    state (MP3 then has a silent first frame and no gapless information, as a live stream has).
    """

    def __init__(self, audio_format: str, sample_rate: int) -> None:
        if audio_format not in STREAMED_FORMATS:
            raise ValueError(f"'{audio_format}' is not streamed; use encode_audio")
        self.audio_format = audio_format
        self.sample_rate = sample_rate
        self._sink: _ForwardSink | None = None
        self._file: Any = None
        self._resampler: Any = None
        if audio_format == "opus":
            coded_rate = sample_rate if sample_rate in _OPUS_RATES else 48000
            if coded_rate != sample_rate:
                try:
                    import soxr
                except ImportError as exc:
                    raise InvalidInput(f"resampling audio needs soxr ({exc}): {AUDIO_EXTRA}") from None
                self._resampler = soxr.ResampleStream(sample_rate, coded_rate, 1, dtype="float32", quality="HQ")
            self._sink = _ForwardSink()
            container, subtype = ENCODINGS["opus"]
            self._file = _soundfile().SoundFile(self._sink, "w", coded_rate, 1, format=container, subtype=subtype)
        elif audio_format == "mp3":
            self._sink = _ForwardSink()
            container, subtype = ENCODINGS["mp3"]
            self._file = _soundfile().SoundFile(
                self._sink,
                "w",
                sample_rate,
                1,
                format=container,
                subtype=subtype,
                compression_level=_STREAMED_MP3_COMPRESSION,
                bitrate_mode="CONSTANT",
            )

    def header(self) -> bytes:
        """What goes out before the first samples."""
        if self.audio_format != "wav":
            return self._sink.take() if self._sink is not None else b""
        fmt = struct.pack("<HHIIHH", 1, 1, self.sample_rate, self.sample_rate * 2, 2, 16)
        return (
            b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", _UNKNOWN_SIZE)
        )  # fmt: skip

    def encode(self, samples: np.ndarray) -> bytes:
        """The bytes for the next mono float32 samples (possibly none yet: the encoders fill whole pages, frames)."""
        if self._file is None:
            return pcm16(samples).tobytes()
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(np.ascontiguousarray(samples, dtype=np.float32))
        self._file.write(np.clip(samples, -1.0, 1.0))
        return self._sink.take()  # type: ignore[union-attr]

    def close(self) -> bytes:
        """The last bytes: what the encoder still held, and the end of the Ogg stream."""
        if self._file is None:
            return b""
        if self._resampler is not None:
            self._file.write(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self._file.close()
        return self._sink.take()  # type: ignore[union-attr]
