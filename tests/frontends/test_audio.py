"""Speech to text and text to speech end to end: the real server on folders built here, the real ``openai`` and
``tritonclient`` clients, and every answer checked against transformers itself (its ASR pipeline, greedy; VITS
called directly with the same seed).

The machine running these may be shared and small, so the server and this process both run torch on one thread:
the same on both sides, and far faster than two processes' thread pools fighting over two cores.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

pytest.importorskip("soundfile")
pytest.importorskip("soxr")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import soundfile  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from model_repository.speech_models import build_vits, build_whisper  # noqa: E402
from server.protocol.audio_codec import pcm16  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

WHISPER = "whisper"
TTS = "tts"
RATE = 16000
MAX_SECONDS = 50
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """This module runs torch on one thread (see above); later modules compare against torch at its own count,
    and a CPU result can depend on the thread count (the order of a sum), so it is put back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def audio_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("audio") / "models"
    build_whisper(repository / WHISPER / "1")
    (repository / WHISPER / "config.yaml").write_text(
        f"backend: transformers\nparameters:\n  max_audio_seconds: '{MAX_SECONDS}'\n"
    )
    build_vits(repository / TTS / "1")
    (repository / TTS / "config.yaml").write_text("backend: transformers\n")
    return repository


@pytest.fixture(scope="module")
def audio_server(start_server: Callable[..., ServerProcess], audio_repository: Path) -> ServerProcess:
    # Importing torch and transformers can take a minute on a busy machine: a longer wait than the default.
    server = start_server(audio_repository, wait=False, env=ONE_THREAD)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {row["name"]: row["state"] for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        if all(states.get(name) == "READY" for name in (WHISPER, TTS)):
            return server
        time.sleep(0.2)
    raise TimeoutError(f"speech models not ready: {states}\n{server.log()}")


@pytest.fixture(scope="module")
def client(audio_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{audio_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def asr(audio_repository: Path) -> Any:
    """transformers' own speech-recognition pipeline on the served folder: the reference."""
    torch.set_num_threads(1)
    return transformers.pipeline("automatic-speech-recognition", model=str(audio_repository / WHISPER / "1"))


def clip(seed: int, seconds: float = 3.0) -> np.ndarray:
    """A mono clip at 16 kHz: a tone whose pitch depends on the seed, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def encoded(samples: np.ndarray, audio_format: str = "WAV", subtype: str | None = "FLOAT", rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=audio_format, subtype=subtype)
    return buffer.getvalue()


def reference(asr: Any, samples: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """The pipeline's greedy transcript (it decodes with 5 beams unless told otherwise)."""
    kwargs["generate_kwargs"] = {"num_beams": 1, **kwargs.get("generate_kwargs", {})}
    return asr(samples.copy(), **kwargs)  # type: ignore[no-any-return]


# -- speech to text ---------------------------------------------------------------------------------------------
def test_transcription_equals_pipeline(client: openai.OpenAI, asr: Any) -> None:
    samples = clip(1)
    result = client.audio.transcriptions.create(model=WHISPER, file=("clip.wav", encoded(samples)))
    assert result.text == reference(asr, samples)["text"]
    assert result.text  # the random model always says something
    assert {WHISPER, TTS} <= {model.id for model in client.models.list().data}


def test_formats_decode_to_the_same_samples(client: openai.OpenAI, asr: Any) -> None:
    """FLAC is lossless, so its transcript is the WAV's; OGG Vorbis and MP3 are lossy and only have to decode."""
    samples = clip(2)
    expected = reference(asr, samples)["text"]
    flac_file = encoded(samples, "FLAC", "PCM_16")
    flac = client.audio.transcriptions.create(model=WHISPER, file=("a.flac", flac_file))
    assert flac.text == reference(asr, soundfile.read(io.BytesIO(flac_file), dtype="float32")[0])["text"]
    stereo_wav = encoded(np.stack([samples, samples], axis=1))
    assert client.audio.transcriptions.create(model=WHISPER, file=("s.wav", stereo_wav)).text == expected
    for audio_format, subtype in (("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        lossy = encoded(samples, audio_format, subtype)
        assert client.audio.transcriptions.create(model=WHISPER, file=("x", lossy)).text


def test_other_sample_rates_are_resampled(client: openai.OpenAI, asr: Any) -> None:
    import soxr

    samples_44k = clip(3)  # any samples will do; sent as 44.1 kHz
    resampled = soxr.resample(samples_44k, 44100, RATE, quality="HQ").astype(np.float32)
    result = client.audio.transcriptions.create(model=WHISPER, file=("a.wav", encoded(samples_44k, rate=44100)))
    assert result.text == reference(asr, resampled)["text"]


def test_batched_transcriptions_equal_solo_ones(client: openai.OpenAI, audio_server: ServerProcess) -> None:
    clips = [encoded(clip(seed)) for seed in range(10, 18)]
    solo = [client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data)).text for data in clips]
    before = httpx.get(f"{audio_server.url}/v2/models/{WHISPER}/stats").json()["model_stats"][0]
    with ThreadPoolExecutor(8) as pool:
        batched = list(
            pool.map(lambda data: client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data)).text, clips)
        )
    after = httpx.get(f"{audio_server.url}/v2/models/{WHISPER}/stats").json()["model_stats"][0]
    assert batched == solo
    assert len(set(solo)) > 1  # different clips, different babble: the comparison means something
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 8 and executions < 8, (inferences, executions)


def test_long_audio_is_chunked_as_the_pipeline_chunks_it(client: openai.OpenAI, asr: Any) -> None:
    samples = clip(4, seconds=40)
    result = client.audio.transcriptions.create(model=WHISPER, file=("long.wav", encoded(samples)))
    assert result.text == reference(asr, samples, chunk_length_s=30.0, batch_size=1)["text"]


def test_language_translation_and_timestamps(client: openai.OpenAI, asr: Any) -> None:
    samples = clip(5)
    data = encoded(samples)
    french = client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data), language="fr")
    assert french.text == reference(asr, samples, generate_kwargs={"language": "fr"})["text"]
    translated = client.audio.translations.create(model=WHISPER, file=("c.wav", data))
    assert translated.text == reference(asr, samples, generate_kwargs={"task": "translate"})["text"]

    verbose = client.audio.transcriptions.create(
        model=WHISPER, file=("c.wav", data), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    expected = reference(asr, samples, return_timestamps=True)
    assert verbose.text == expected["text"]
    assert verbose.duration == pytest.approx(3.0)
    assert [s.text for s in verbose.segments] == [c["text"] for c in expected["chunks"]]
    assert [s.start for s in verbose.segments] == [c["timestamp"][0] or 0.0 for c in expected["chunks"]]

    srt = client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data), response_format="srt")
    assert srt.count(" --> ") == len(expected["chunks"])
    vtt = client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data), response_format="vtt")
    assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == len(expected["chunks"])
    text = client.audio.transcriptions.create(model=WHISPER, file=("c.wav", data), response_format="text")
    assert text == reference(asr, samples)["text"]


def test_streamed_transcription_sends_deltas_then_done(client: openai.OpenAI, asr: Any) -> None:
    samples = clip(6)
    events = list(client.audio.transcriptions.create(model=WHISPER, file=("c.wav", encoded(samples)), stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert "".join(deltas) == events[-1].text == reference(asr, samples)["text"]


def test_kserve_transcription_over_http_and_grpc(audio_server: ServerProcess, asr: Any) -> None:
    samples = clip(7)
    expected = reference(asr, samples)["text"]
    http = httpclient.InferenceServerClient(audio_server.url.removeprefix("http://"), network_timeout=300)
    metadata = http.get_model_metadata(WHISPER)
    assert {i["name"] for i in metadata["inputs"]} == {"audio", "samples", "options"}
    audio = httpclient.InferInput("audio", [1, 1], "BYTES")
    audio.set_data_from_numpy(np.array([[encoded(samples)]], dtype=np.object_))
    result = http.infer(WHISPER, [audio], outputs=[httpclient.InferRequestedOutput("text")])
    assert result.as_numpy("text")[0, 0].decode() == expected

    grpc = grpcclient.InferenceServerClient(audio_server.grpc_url)
    raw = grpcclient.InferInput("samples", [1, samples.size], "FP32")
    raw.set_data_from_numpy(samples[None, :])
    result = grpc.infer(WHISPER, [raw], client_timeout=300)
    assert result.as_numpy("text")[0, 0].decode() == expected
    assert result.as_numpy("duration")[0, 0] == pytest.approx(3.0)


# -- text to speech ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vits(audio_repository: Path) -> tuple[Any, Any]:
    folder = audio_repository / TTS / "1"
    return transformers.VitsModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def vits_output(vits: tuple[Any, Any], text: str, seed: int = 0, speed: float = 1.0) -> np.ndarray:
    model, tokenizer = vits
    torch.set_num_threads(1)
    model.speaking_rate = speed
    with torch.inference_mode():
        torch.manual_seed(seed)
        return model(**tokenizer(text, return_tensors="pt")).waveform[0].numpy()  # type: ignore[no-any-return]


def test_speech_is_a_wav_of_the_models_samples(client: openai.OpenAI, vits: tuple[Any, Any]) -> None:
    text = "hello world, this is modeldock."
    response = client.audio.speech.create(model=TTS, input=text, voice="alloy", response_format="wav")
    samples, rate = soundfile.read(io.BytesIO(response.read()), dtype="int16")
    assert rate == vits[0].config.sampling_rate
    np.testing.assert_array_equal(samples, pcm16(vits_output(vits, text)))

    faster = client.audio.speech.create(model=TTS, input=text, voice="alloy", response_format="pcm", speed=2.0)
    pcm = np.frombuffer(faster.read(), dtype="<i2")
    np.testing.assert_array_equal(pcm, pcm16(vits_output(vits, text, speed=2.0)))
    assert pcm.size < samples.size

    seeded = client.audio.speech.create(
        model=TTS, input=text, voice="alloy", response_format="flac", extra_body={"seed": 7}
    )
    flac, _ = soundfile.read(io.BytesIO(seeded.read()), dtype="int16")
    np.testing.assert_array_equal(flac, pcm16(vits_output(vits, text, seed=7)))
    for audio_format in ("mp3", "opus"):
        coded = client.audio.speech.create(model=TTS, input=text, voice="alloy", response_format=audio_format)
        decoded, _ = soundfile.read(io.BytesIO(coded.read()))
        assert decoded.size > 0


# Sentences the model speaks one at a time when sent together; each is spoken alone for the reference.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a streamed answer starts before the last sentence is spoken!",
    "is this the third sentence?",
    "yes, and it is followed by a fourth one.",
    "five sentences make a short paragraph.",
]


def spoken_alone(vits: tuple[Any, Any], sentences: list[str], seed: int = 0) -> np.ndarray:
    """What the model says for each sentence alone, with the seed the server uses, joined."""
    return np.concatenate([vits_output(vits, sentence, seed=seed) for sentence in sentences])


def test_speech_pieces_are_sentences_and_bounded_clauses() -> None:
    from server.frontends.openai.serving_audio import speech_pieces

    assert speech_pieces(" ".join(SENTENCES)) == SENTENCES
    assert speech_pieces('he said "stop." then left\nnew line... ok') == [
        'he said "stop."',
        "then left",
        "new line...",
        "ok",
    ]
    long = ", ".join(["one clause of a long sentence"] * 20) + "."
    pieces = speech_pieces(long, max_chars=80)
    assert len(pieces) > 1 and all(len(piece) <= 80 for piece in pieces)
    assert " ".join(pieces) == long
    assert speech_pieces("x" * 200, max_chars=80) == ["x" * 80, "x" * 80, "x" * 40]


def test_streamed_speech_arrives_sentence_by_sentence(client: openai.OpenAI, vits: tuple[Any, Any]) -> None:
    text = " ".join(SENTENCES * 2)
    expected = pcm16(spoken_alone(vits, SENTENCES * 2))
    started = time.monotonic()
    arrivals: list[float] = []
    chunks: list[bytes] = []
    with client.audio.speech.with_streaming_response.create(
        model=TTS, input=text, voice="alloy", response_format="pcm"
    ) as response:
        assert response.headers.get("content-length") is None
        for chunk in response.iter_bytes():
            arrivals.append(time.monotonic() - started)
            chunks.append(chunk)
    total = time.monotonic() - started
    # Audio came in pieces, the first well before the request ended.
    assert len(chunks) > 1 and arrivals[0] < total
    assert arrivals[0] < arrivals[-1]
    np.testing.assert_array_equal(np.frombuffer(b"".join(chunks), dtype="<i2"), expected)
    # A client that reads the body at once gets the same bytes.
    assert client.audio.speech.create(model=TTS, input=text, voice="alloy", response_format="pcm").read() == b"".join(
        chunks
    )


def test_streamed_formats_decode_to_the_sentences_samples(client: openai.OpenAI, vits: tuple[Any, Any]) -> None:
    from server.protocol.audio_codec import encode_audio

    text = " ".join(SENTENCES)
    joined = spoken_alone(vits, SENTENCES, seed=3)
    rate = vits[0].config.sampling_rate

    def body(audio_format: str) -> bytes:
        with client.audio.speech.with_streaming_response.create(
            model=TTS, input=text, voice="alloy", response_format=audio_format, extra_body={"seed": 3}
        ) as response:
            return b"".join(response.iter_bytes())

    wav = body("wav")
    # The header goes out first, so its sizes say "unknown"; readers take the samples up to the end of the body.
    assert wav[4:8] == b"\xff\xff\xff\xff" and wav[40:44] == b"\xff\xff\xff\xff"
    samples, wav_rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert wav_rate == rate
    np.testing.assert_array_equal(samples, pcm16(joined))
    flac, _ = soundfile.read(io.BytesIO(body("flac")), dtype="int16")
    np.testing.assert_array_equal(flac, pcm16(joined))
    # Opus streamed page by page decodes to what the same samples encoded as one file decode to.
    opus, _ = soundfile.read(io.BytesIO(body("opus")))
    whole, _ = soundfile.read(io.BytesIO(encode_audio(joined, rate, "opus")))
    np.testing.assert_array_equal(opus, whole)
    # MP3 frames as they are coded: a silent first frame and the encoder's delay come first (no Xing header can
    # say to skip them), then the speech, lossy.
    mp3, _ = soundfile.read(io.BytesIO(body("mp3")), dtype="float32")
    assert 0 < mp3.size - joined.size < 3000
    lag = max(range(mp3.size - joined.size), key=lambda shift: float(np.dot(mp3[shift : shift + joined.size], joined)))
    assert np.corrcoef(mp3[lag : lag + joined.size], joined)[0, 1] > 0.9


def test_speech_as_server_sent_events(audio_server: ServerProcess, client: openai.OpenAI) -> None:
    import base64
    import json

    text = " ".join(SENTENCES)
    request = {"model": TTS, "input": text, "voice": "alloy", "response_format": "pcm", "stream_format": "sse"}
    events = []
    with httpx.stream("POST", f"{audio_server.url}/v1/audio/speech", json=request, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) > 1 and events[-1]["type"] == "speech.audio.done" and len(events) == len(deltas) + 1
    assert events[-1]["usage"]["input_tokens"] == len(text)
    audio = b"".join(base64.b64decode(delta["audio"]) for delta in deltas)
    assert audio == client.audio.speech.create(model=TTS, input=text, voice="alloy", response_format="pcm").read()


def test_a_client_that_leaves_stops_the_speech(audio_server: ServerProcess, client: openai.OpenAI) -> None:
    import re

    def spoken_pieces() -> float:
        text = httpx.get(f"{audio_server.url}/metrics", timeout=10).text
        found = re.search(rf'^nv_inference_request_success\{{model="{TTS}",version="1"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    sentences = SENTENCES * 8
    before = spoken_pieces()
    request = {"model": TTS, "input": " ".join(sentences), "voice": "alloy", "response_format": "pcm"}
    with httpx.stream("POST", f"{audio_server.url}/v1/audio/speech", json=request, timeout=300) as response:
        assert next(response.iter_bytes())
    time.sleep(1.0)
    # The first piece, and the few queued ahead of it when the client left: not the other forty sentences.
    assert spoken_pieces() - before <= 4
    assert client.audio.speech.create(model=TTS, input="still here.", voice="alloy", response_format="pcm").read()


def test_kserve_speech_returns_the_models_float_samples(audio_server: ServerProcess, vits: tuple[Any, Any]) -> None:
    text = "one two three"
    grpc = grpcclient.InferenceServerClient(audio_server.grpc_url)
    text_input = grpcclient.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result = grpc.infer(TTS, [text_input])
    np.testing.assert_allclose(result.as_numpy("waveform"), vits_output(vits, text), atol=1e-6)
    assert result.as_numpy("sample_rate")[0] == vits[0].config.sampling_rate


# -- bad input --------------------------------------------------------------------------------------------------
def post_transcription(url: str, files: dict[str, Any], data: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/transcriptions", files=files, data=data, timeout=300)


def assert_openai_error(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param in error["message"]


def test_bad_input_is_a_400_naming_the_field(audio_server: ServerProcess, client: openai.OpenAI) -> None:
    url = audio_server.url
    model = {"model": WHISPER}
    assert_openai_error(post_transcription(url, {"file": ("a.wav", b"RIFF but not really audio")}, model), "file")
    assert_openai_error(post_transcription(url, {"file": ("a.wav", b"")}, model), "file")
    too_long = encoded(np.zeros((MAX_SECONDS + 1) * RATE, dtype=np.float32), subtype="PCM_16")
    assert_openai_error(post_transcription(url, {"file": ("long.wav", too_long)}, model), "file")
    too_big = b"\0" * (25 * 1024 * 1024 + 1)
    assert_openai_error(post_transcription(url, {"file": ("big.wav", too_big)}, model), "file")
    ok = {"file": ("a.wav", encoded(clip(8)))}
    assert_openai_error(post_transcription(url, ok, {**model, "response_format": "docx"}), "response_format")
    assert_openai_error(post_transcription(url, ok, {**model, "temperature": "3"}), "temperature")
    assert_openai_error(post_transcription(url, ok, {"model": TTS}), "model")
    assert_openai_error(post_transcription(url, ok, {**model, "language": "xx"}), "language")
    assert_openai_error(httpx.post(f"{url}/v1/audio/transcriptions", data=model, timeout=60), "file")

    speech = {"model": TTS, "input": "hello", "voice": "alloy"}
    for body, param in (
        ({**speech, "input": ""}, "input"),
        ({**speech, "input": "   "}, "input"),
        ({**speech, "response_format": "aac"}, "response_format"),
        ({**speech, "speed": 9}, "speed"),
        ({**speech, "model": WHISPER}, "model"),
        ({**speech, "stream_format": "video"}, "stream_format"),
    ):
        assert_openai_error(httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60), param)
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="no_such_model", input="hi", voice="alloy")
    # Over KServe v2 too: a row that is not audio, and an empty clip of samples.
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    audio = httpclient.InferInput("audio", [1, 1], "BYTES")
    audio.set_data_from_numpy(np.array([[b"not audio"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="'audio'"):
        http.infer(WHISPER, [audio])
    empty = httpclient.InferInput("samples", [1, 0], "FP32")
    empty.set_data_from_numpy(np.zeros((1, 0), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="'samples'"):
        http.infer(WHISPER, [empty])
    # Still serving everyone after all that.
    assert client.audio.transcriptions.create(model=WHISPER, file=("a.wav", encoded(clip(8)))).text
    assert httpx.get(f"{url}/v2/models/{TTS}/ready").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
