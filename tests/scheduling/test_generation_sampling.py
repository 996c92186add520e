"""Per-request logits processing and incremental detokenization, on crafted inputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from server.errors import InvalidInput  # noqa: E402
from server.protocol.generation import SamplingParams  # noqa: E402
from server.scheduling.generation.detokenizer import IncrementalDetokenizer  # noqa: E402
from server.scheduling.generation.sampling import SequenceSampler  # noqa: E402


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_greedy_takes_the_largest_and_skips_banned_tokens() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=0), [])
    assert sampler.choose(logits(1, 5, 3), []) == 1
    assert sampler.choose(logits(1, 5, 3), [1]) == 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=4.0), prompt_token_ids=[0, 2])
    # Token 0 (4.0 → 1.0) now loses to token 1 (2.0); token 2 (-1 → -4) stays last.
    assert sampler.choose(logits(4.0, 2.0, -1.0), []) == 1


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5), [1])
    for _ in range(2):
        sampler.record(0)
    # Token 0: 3.0 - 2*1.0 - 0.5 = 0.5 < token 1's 1.0 (a prompt token: not penalised).
    assert sampler.choose(logits(3.0, 1.0, 0.0), []) == 1


def test_top_k_one_and_a_tiny_top_p_are_greedy_even_when_sampling() -> None:
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=0),
        SamplingParams(temperature=1.5, top_p=0.01, seed=0),
    ):
        sampler = SequenceSampler(params, [])
        assert {sampler.choose(logits(0.0, 2.0, 1.9, 1.8), []) for _ in range(50)} == {1}


def test_top_k_keeps_only_the_k_best_candidates() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=100.0, top_k=2, seed=3), [])
    drawn = {sampler.choose(logits(0.0, 5.0, 4.9, 0.1, 0.2), []) for _ in range(200)}
    assert drawn == {1, 2}


def test_the_same_seed_draws_the_same_tokens() -> None:
    def draws(seed: int) -> list[int]:
        sampler = SequenceSampler(SamplingParams(temperature=1.0, seed=seed), [])
        return [sampler.choose(logits(*([0.0] * 50)), []) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_bad_sampling_parameters_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidInput, match="'temperature'"):
        SamplingParams.parse({"temperature": -1}, "request")
    with pytest.raises(InvalidInput, match="'top_p'"):
        SamplingParams.parse({"top_p": 0}, "request")
    with pytest.raises(InvalidInput, match="'beam_width'"):
        SamplingParams.parse({"beam_width": 2}, "request")
    assert SamplingParams.parse({"stop": "END"}, "request").stop == ["END"]


class CharTokenizer:
    """Each token id is one UTF-8 byte, so characters split across tokens as in byte-level BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(detokenizer: IncrementalDetokenizer, text: str) -> tuple[list[str], bool]:
    chunks, stopped = [], False
    for byte in text.encode():
        chunk, stopped = detokenizer.add(byte)
        chunks.append(chunk)
        if stopped:
            break
    return chunks, stopped


def test_a_multibyte_character_is_sent_whole() -> None:
    chunks, _ = feed(IncrementalDetokenizer(CharTokenizer(), []), "aé")
    assert chunks == ["a", "", "é"]


def test_text_that_may_begin_a_stop_string_is_held_until_decided() -> None:
    detokenizer = IncrementalDetokenizer(CharTokenizer(), ["END"])
    chunks, stopped = feed(detokenizer, "abENx")
    assert "".join(chunks) == "abENx" and not stopped
    assert chunks[2:4] == ["", ""]  # "E" and "EN" could have begun "END"
    detokenizer = IncrementalDetokenizer(CharTokenizer(), ["END"])
    chunks, stopped = feed(detokenizer, "abEND and more")
    assert stopped and "".join(chunks) == "ab"


def test_each_token_decodes_a_short_window_not_the_whole_completion() -> None:
    class CountingTokenizer(CharTokenizer):
        longest = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return super().decode(ids, skip_special_tokens)

    tokenizer = CountingTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "déjà vu, naïve café " * 50
    chunks, _ = feed(detokenizer, text)
    assert "".join(chunks) + detokenizer.flush() == text
    assert tokenizer.longest <= 4  # a window of a few tokens, never the 1000-byte completion


def test_streamed_text_equals_decoding_the_whole_completion(causal_lm_dir) -> None:
    """With a real byte-level BPE tokenizer: spaces, multibyte characters, and bytes left over at the end."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm_dir)
    ids = tokenizer.encode("Hello world! Ünïcödé text, 2026 — ok\n  indented   spaces ✓")
    ids += tokenizer.encode("é")[:1]  # the first byte of a character whose second byte never comes
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detokenizer.add(i)[0] for i in ids) + detokenizer.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_bytes_that_never_form_utf8_are_sent_as_replacement_characters_without_stalling() -> None:
    """Stray continuation bytes, a lead byte cut short by ASCII, a byte that is never valid: every token's text goes
    out by the next token at the latest, and the held text is never more than one (incomplete) character."""
    data = bytes([0x41, 0xE2, 0x82, 0x42, 0x80, 0x80, 0x43, 0xFF, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0x44] * 20)
    detokenizer = IncrementalDetokenizer(CharTokenizer(), [])
    streamed = ""
    for count, byte in enumerate(data, start=1):
        chunk, _ = detokenizer.add(byte)
        streamed += chunk
        whole = data[:count].decode("utf-8", errors="replace")
        assert whole.startswith(streamed)
        assert len(whole) - len(streamed) <= 1, f"after {count} bytes {whole[len(streamed) :]!r} is held back"
    assert streamed + detokenizer.flush() == data.decode("utf-8", errors="replace")


def test_a_byte_level_bpe_completion_of_invalid_utf8_streams_as_it_goes(causal_lm_dir) -> None:
    """The real tokenizer's single-byte tokens, in an order that is not UTF-8: text arrives with each token."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm_dir)
    alphabet = {char: byte for byte, char in _byte_level_alphabet().items()}
    vocab = tokenizer.get_vocab()
    byte_ids = {alphabet[token]: i for token, i in vocab.items() if len(token) == 1 and token in alphabet}
    pattern = [0xE2, 0x82, 0x20, 0xA9, 0x61, 0xF0, 0x9F, 0x98, 0x62, 0xC3, 0xA9, 0x80]
    ids = [byte_ids[b] for b in pattern * 10]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    streamed = ""
    for count, token in enumerate(ids, start=1):
        streamed += detokenizer.add(token)[0]
        whole = tokenizer.decode(ids[:count], skip_special_tokens=True)
        assert whole.startswith(streamed) and len(whole) - len(streamed) <= 1
    assert streamed + detokenizer.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
