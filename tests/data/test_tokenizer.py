"""Byte and BPE tokenizers: round trips, robust decoding, serialisation and the BPE cache."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from condformer.data import (
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    Document,
    build_tokenizer,
    default_cache_dir,
    tokenizer_from_dict,
)
from condformer.errors import DataError

requires_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None, reason="the optional tokenizers package is not installed"
)

SAMPLE = (
    "def greet(name):\n    return f'hello {name}!'\n\n"
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def increment(self, by=1):\n        self.count += by\n        return self.count\n\n"
    "# café, naïve, 日本語, emoji 😀🚀\n"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([SAMPLE * 20], vocab_size=320)


def small_corpus(text: str = SAMPLE) -> Corpus:
    return Corpus(source="test", train=[Document("a.py", text * 10)], val=[Document("b.py", text)])


def random_text(rng: random.Random, length: int) -> str:
    """Random text mixing ASCII, Latin, CJK, emoji and control characters (no lone surrogates)."""
    ranges = [
        (0x20, 0x7E),
        (0x0, 0x1F),
        (0xA0, 0x24F),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
        (0x10000, 0x10FFF),
    ]
    chars = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def arbitrary_ids(rng: random.Random, vocab_size: int) -> list:
    ids: list = [rng.randint(-5, vocab_size + 5) for _ in range(300)]
    ids += [-(2**70), 2**70, np.int64(65), np.uint16(66), 0, 1, 2, 3, vocab_size - 1, vocab_size]
    rng.shuffle(ids)
    return ids


def one_line(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


# --------------------------------------------------------------------------------------------------- byte


def test_byte_tokenizer_layout() -> None:
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size) == ("byte", 260)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (256, 257, 258, 259)
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]


def test_byte_round_trip_on_random_unicode() -> None:
    rng = random.Random(0)
    tok = ByteTokenizer()
    for length in (0, 1, 7, 200, 2000):
        text = random_text(rng, length)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("emoji 😀🚀 done")) == "emoji 😀🚀 done"


def test_byte_decode_never_raises_and_skips_specials() -> None:
    tok = ByteTokenizer()
    rng = random.Random(1)
    for _ in range(20):
        assert isinstance(tok.decode(arbitrary_ids(rng, tok.vocab_size)), str)
    assert tok.decode([72, 256, 105, 257, 258, 259, 33]) == "Hi!"
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"  # truncated emoji -> replacement char
    assert tok.decode([104, "bad", None, 3.0, 105]) == "h\x03i"  # type: ignore[list-item]


def test_byte_to_dict_round_trip() -> None:
    data = json.loads(json.dumps(ByteTokenizer().to_dict()))
    rebuilt = tokenizer_from_dict(data)
    assert isinstance(rebuilt, ByteTokenizer)
    assert rebuilt.encode("xyz") == [120, 121, 122]


# ---------------------------------------------------------------------------------------------------- BPE


@requires_tokenizers
def test_bpe_layout_and_compression(bpe: BPETokenizer) -> None:
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id) == (0, 1, 2, 3)
    assert 260 < bpe.vocab_size <= 320
    assert bpe.name == f"bpe-{bpe.vocab_size}"
    ids = bpe.encode(SAMPLE)
    assert len(ids) < len(SAMPLE.encode("utf-8")) / 2
    assert all(4 <= i < bpe.vocab_size for i in ids)


@requires_tokenizers
def test_bpe_round_trip_exact(bpe: BPETokenizer) -> None:
    rng = random.Random(2)
    texts = [
        SAMPLE,
        "  leading spaces, trailing spaces  \n\n\ttabs\r\nCRLF",
        "literal special strings <pad> <bos> <eos> <mask> stay text",
        random_text(rng, 500),
        "",
    ]
    for text in texts:
        ids = bpe.encode(text)
        assert not set(ids) & bpe.special_ids
        assert bpe.decode(ids) == text


@requires_tokenizers
def test_bpe_encode_batch_matches_encode(bpe: BPETokenizer) -> None:
    texts = [SAMPLE, "x = 1\n", "😀"]
    assert bpe.encode_batch(texts) == [bpe.encode(text) for text in texts]


@requires_tokenizers
def test_bpe_decode_never_raises(bpe: BPETokenizer) -> None:
    rng = random.Random(3)
    for _ in range(20):
        assert isinstance(bpe.decode(arbitrary_ids(rng, bpe.vocab_size)), str)
    hello = bpe.encode("hello")
    assert bpe.decode([bpe.bos_id, *hello, bpe.eos_id, bpe.pad_id, bpe.mask_id]) == "hello"


@requires_tokenizers
def test_bpe_to_dict_round_trip(bpe: BPETokenizer) -> None:
    data = json.loads(json.dumps(bpe.to_dict()))
    rebuilt = tokenizer_from_dict(data)
    assert isinstance(rebuilt, BPETokenizer)
    assert rebuilt.vocab_size == bpe.vocab_size
    text = SAMPLE + " <eos> 😀"
    assert rebuilt.encode(text) == bpe.encode(text)
    assert rebuilt.decode(bpe.encode(text)) == text


@requires_tokenizers
def test_build_tokenizer_caches_bpe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = small_corpus()
    first = build_tokenizer("bpe:300", corpus)
    cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and "bpe-300" in cached[0].name

    def no_training(*args: object, **kwargs: object) -> BPETokenizer:
        raise AssertionError("BPE was retrained despite a cached tokenizer")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    second = build_tokenizer("bpe:300", corpus)
    assert second.to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="retrained"):
        build_tokenizer("bpe:310", corpus)  # a different vocab size is a different cache entry
    with pytest.raises(AssertionError, match="retrained"):
        build_tokenizer("bpe:300", small_corpus(SAMPLE + "new text"))  # and so is a different corpus


@requires_tokenizers
def test_build_tokenizer_trains_on_the_train_split_only(tmp_path: Path) -> None:
    corpus = Corpus(source="t", train=[Document("a", "ab" * 2000)], val=[Document("b", "xyz" * 2000)])
    tok = build_tokenizer("bpe:300", corpus, cache_dir=tmp_path / "explicit")
    assert len(tok.encode("ab" * 64)) < 20  # learned merges for train text
    assert len(tok.encode("xyz" * 64)) == 192  # none for validation-only text
    assert list((tmp_path / "explicit" / "tokenizers").glob("*.json"))


def test_build_byte_tokenizer() -> None:
    assert isinstance(build_tokenizer("byte", small_corpus()), ByteTokenizer)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe:abc", "bpe:100", "BYTE", "bpe:"])
def test_bad_tokenizer_kind(kind: str) -> None:
    with pytest.raises(DataError) as excinfo:
        build_tokenizer(kind, small_corpus())
    message = one_line(excinfo)
    assert kind in message or "at least 300" in message


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(DataError) as excinfo:
        build_tokenizer("sentencepiece", small_corpus())
    message = one_line(excinfo)
    assert "'byte'" in message and "'bpe'" in message and "bpe:N" in message


def test_missing_tokenizers_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DataError) as excinfo:
        build_tokenizer("bpe", small_corpus())
    assert "pip install 'condformer[bpe]'" in one_line(excinfo)


@pytest.mark.parametrize(
    "data", [{}, {"kind": "wordpiece"}, {"kind": "bpe"}, {"kind": "bpe", "tokenizer_json": "{not json"}]
)
def test_tokenizer_from_bad_dict(data: dict) -> None:
    with pytest.raises(DataError) as excinfo:
        tokenizer_from_dict(data)
    one_line(excinfo)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CONDFORMER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "condformer"
