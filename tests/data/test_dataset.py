"""Token files, caching, bytes-per-token and deterministic batch sampling."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import condformer.data.dataset as dataset_module
from condformer.data import BPETokenizer, ByteTokenizer, TokenData, load_corpus, prepare_data
from condformer.errors import DataError

requires_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None, reason="the optional tokenizers package is not installed"
)

WORDS = [
    *("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"),
    *("café", "😀", "<eos>"),
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONDFORMER_CACHE", str(cache))
    return cache


@pytest.fixture()
def corpus_dir(tmp_path: Path) -> Path:
    """40 random-word documents of 1-3 KB: small, but long enough that windows are unambiguous."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        words = [rng.choice(WORDS) + rng.choice(["", "", str(rng.randint(0, 999))]) for _ in range(300)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    return root


@pytest.fixture()
def data(corpus_dir: Path) -> TokenData:
    return prepare_data(str(corpus_dir), "byte", val_fraction=0.2)


def expected_stream(docs: list, eos: int) -> np.ndarray:
    """The byte-token stream built independently: each document's UTF-8 bytes followed by eos."""
    out: list[int] = []
    for doc in docs:
        out.extend(doc.text.encode("utf-8"))
        out.append(eos)
    return np.array(out, dtype=np.int64)


def find_window(stream: np.ndarray, window: np.ndarray) -> list[int]:
    """All offsets at which ``window`` occurs as a contiguous slice of ``stream``."""
    views = np.lib.stride_tricks.sliding_window_view(stream.astype(np.int64), len(window))
    return np.flatnonzero((views == window).all(axis=1)).tolist()


def cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


# -------------------------------------------------------------------------------------------- token files


def test_byte_token_stream_matches_the_corpus(data: TokenData, corpus_dir: Path) -> None:
    corpus = load_corpus(str(corpus_dir), val_fraction=0.2)
    assert data.train_tokens.dtype == np.uint16 and data.val_tokens.dtype == np.uint16
    assert isinstance(data.train_tokens, np.memmap)
    np.testing.assert_array_equal(data.train_tokens, expected_stream(corpus.train, 258))
    np.testing.assert_array_equal(data.val_tokens, expected_stream(corpus.val, 258))
    fp = data.fingerprint
    assert fp["sha256"] == corpus.fingerprint()["sha256"]
    assert fp["tokenizer"] == "byte"
    assert (fp["train_tokens"], fp["val_tokens"]) == (len(data.train_tokens), len(data.val_tokens))
    assert data.directory is not None and data.directory.name == f"{fp['sha256'][:16]}-byte-v0.2"


def test_bytes_per_token_for_bytes(data: TokenData, corpus_dir: Path) -> None:
    corpus = load_corpus(str(corpus_dir), val_fraction=0.2)
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        n_bytes = sum(len(doc.text.encode("utf-8")) for doc in docs)
        assert data.bytes_per_token(split) == n_bytes / (n_bytes + len(docs))
        assert 0.99 < data.bytes_per_token(split) < 1.0


def test_prepared_files_are_reused(
    corpus_dir: Path, _isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    files = cache_files(_isolated_cache)
    assert {p.name for p in files} == {"train.bin", "val.bin", "meta.json"}  # and no leftover temp files
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def no_tokenising(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-tokenised although the cached files match")

    monkeypatch.setattr(dataset_module, "_write_split", no_tokenising)
    second = prepare_data(str(corpus_dir) + "/", "byte", val_fraction=0.2)
    assert {p: p.stat().st_mtime_ns for p in cache_files(_isolated_cache)} == mtimes
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    assert second.fingerprint["source"] == str(corpus_dir) + "/"
    with pytest.raises(AssertionError, match="re-tokenised"):
        prepare_data(str(corpus_dir), "byte", val_fraction=0.25)  # another split is another cache entry


def test_changed_corpus_is_retokenised(corpus_dir: Path) -> None:
    first = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    (corpus_dir / "doc00.txt").write_text("replaced\n", encoding="utf-8")
    second = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    assert second.directory != first.directory
    assert second.fingerprint["sha256"] != first.fingerprint["sha256"]
    assert len(second.train_tokens) + len(second.val_tokens) < len(first.train_tokens) + len(first.val_tokens)


def test_truncated_token_file_is_rebuilt(data: TokenData, corpus_dir: Path) -> None:
    assert data.directory is not None
    expected = np.array(data.train_tokens)
    train_bin = data.directory / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:100])  # simulate a damaged cache
    again = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    np.testing.assert_array_equal(again.train_tokens, expected)


def test_crash_while_tokenising_leaves_nothing_half_written(
    corpus_dir: Path, _isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dataset_module._encode_texts
    calls = []

    def crash_on_second_chunk(*args: object) -> list:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dataset_module, "_ENCODE_CHUNK", 8)
    monkeypatch.setattr(dataset_module, "_encode_texts", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    assert cache_files(_isolated_cache) == []  # neither partial .bin files nor temp files survive
    monkeypatch.setattr(dataset_module, "_encode_texts", real)
    data = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)
    assert {p.name for p in cache_files(_isolated_cache)} == {"train.bin", "val.bin", "meta.json"}
    assert data.num_tokens("train") > 0


@requires_tokenizers
def test_bpe_stream_decodes_to_the_corpus_and_compresses(corpus_dir: Path) -> None:
    data = prepare_data(str(corpus_dir), "bpe:320", val_fraction=0.2)
    corpus = load_corpus(str(corpus_dir), val_fraction=0.2)
    tok = data.tokenizer
    assert data.fingerprint["tokenizer"] == tok.name and tok.name.startswith("bpe-")
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        stream = data.tokens(split)
        assert stream.dtype == np.uint16
        assert int((stream == tok.eos_id).sum()) == len(docs)  # literal "<eos>" text is not an eos token
        assert tok.decode(stream.tolist()) == "".join(doc.text for doc in docs)
        assert data.bytes_per_token(split) > 1.5


@requires_tokenizers
def test_prepare_data_accepts_a_tokenizer_instance(corpus_dir: Path) -> None:
    """Evaluating a checkpoint on new text must use the checkpoint's tokenizer, not a freshly trained one."""
    foreign = BPETokenizer.train(["completely different training text, with its own merges\n" * 50], 300)
    data = prepare_data(str(corpus_dir), foreign, val_fraction=0.2)
    corpus = load_corpus(str(corpus_dir), val_fraction=0.2)
    assert data.tokenizer is foreign
    expected = [i for doc in corpus.val for i in (*foreign.encode(doc.text), foreign.eos_id)]
    assert data.val_tokens.tolist() == expected
    assert data.fingerprint["tokenizer"] == foreign.name
    byte_data = prepare_data(str(corpus_dir), ByteTokenizer(), val_fraction=0.2)
    assert byte_data.val_tokens.tolist() == [i for doc in corpus.val for i in (*doc.text.encode(), 258)]


# ------------------------------------------------------------------------------------------------ batches


def test_batch_windows_are_contiguous_slices(data: TokenData) -> None:
    x, y = data.get_batch("train", step=3, batch_size=6, seq_len=32, seed=7)
    assert x.shape == y.shape == (6, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = np.asarray(data.train_tokens)
    for row in range(6):
        window = torch.cat([x[row], y[row, -1:]]).numpy()
        offsets = find_window(stream, window)
        assert offsets, f"row {row} is not a contiguous slice of the training stream"
        start = offsets[0]
        np.testing.assert_array_equal(y[row].numpy(), stream[start + 1 : start + 33])


def test_val_batches_come_from_the_val_stream(data: TokenData) -> None:
    x, y = data.get_batch("val", step=0, batch_size=4, seq_len=48, seed=0)
    stream = np.asarray(data.val_tokens)
    for row in range(4):
        assert find_window(stream, torch.cat([x[row], y[row, -1:]]).numpy())


def test_batches_are_a_pure_function_of_seed_split_step(data: TokenData, corpus_dir: Path) -> None:
    args = {"batch_size": 4, "seq_len": 16}
    x1, y1 = data.get_batch("train", step=5, seed=1, **args)
    data.get_batch("train", step=6, seed=1, **args)  # interleaved calls must not matter
    x2, y2 = data.get_batch("train", step=5, seed=1, **args)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    resumed = prepare_data(str(corpus_dir), "byte", val_fraction=0.2)  # a "restarted" process
    assert torch.equal(resumed.get_batch("train", step=5, seed=1, **args)[0], x1)
    assert not torch.equal(data.get_batch("train", step=6, seed=1, **args)[0], x1)
    assert not torch.equal(data.get_batch("train", step=5, seed=2, **args)[0], x1)
    assert not torch.equal(data.get_batch("val", step=5, seed=1, **args)[0], x1)


def test_ranks_partition_the_global_batch(data: TokenData) -> None:
    args = {"step": 11, "seq_len": 24, "seed": 3}
    x_all, y_all = data.get_batch("train", batch_size=6, **args)
    parts = [data.get_batch("train", batch_size=3, rank=r, world_size=2, **args) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), y_all)
    assert not torch.equal(parts[0][0], parts[1][0])
    thirds = [data.get_batch("train", batch_size=2, rank=r, world_size=3, **args)[0] for r in range(3)]
    assert torch.equal(torch.cat(thirds), x_all)


def test_seq_len_can_use_the_whole_split(data: TokenData) -> None:
    n = data.num_tokens("val")
    x, y = data.get_batch("val", step=0, batch_size=2, seq_len=n - 1, seed=0)
    expected = torch.from_numpy(np.asarray(data.val_tokens, dtype=np.int64))
    assert torch.equal(x[0], expected[:-1]) and torch.equal(y[1], expected[1:])


def test_token_data_from_arrays() -> None:
    stream = np.arange(100, dtype=np.int64) % 250
    data = TokenData(stream, stream[:40], ByteTokenizer(), train_bytes=90, val_bytes=36)
    x, y = data.get_batch("train", step=0, batch_size=3, seq_len=10, seed=0)
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive integers: y is x shifted by one
    assert data.bytes_per_token("val") == 36 / 40


# ------------------------------------------------------------------------------------------------- errors


def one_line(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_seq_len_too_large_for_the_val_split(data: TokenData) -> None:
    n = data.num_tokens("val")
    with pytest.raises(DataError) as excinfo:
        data.get_batch("val", step=0, batch_size=1, seq_len=n, seed=0)
    message = one_line(excinfo)
    assert f"validation split has {n} tokens, fewer than seq_len+1={n + 1}" in message
    assert "--seq-len" in message and "val fraction" in message


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"split": "test"}, "unknown split 'test'"),
        ({"batch_size": 0}, "batch size"),
        ({"seq_len": 0}, "seq_len"),
        ({"rank": 2, "world_size": 2}, "rank 2"),
    ],
)
def test_bad_batch_arguments(data: TokenData, kwargs: dict, needle: str) -> None:
    args = {"split": "train", "step": 0, "batch_size": 2, "seq_len": 8, "seed": 0, **kwargs}
    with pytest.raises(DataError) as excinfo:
        data.get_batch(**args)
    assert needle in one_line(excinfo)


def test_min_tokens(corpus_dir: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        prepare_data(str(corpus_dir), "byte", val_fraction=0.2, min_tokens=10**7)
    assert "split has" in one_line(excinfo)
    assert prepare_data(str(corpus_dir), "byte", val_fraction=0.2, min_tokens=100).num_tokens("val") >= 100


def test_bad_tokenizer_fails_before_reading_the_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        prepare_data(str(tmp_path / "missing"), "wordpiece")
    assert "unknown tokenizer" in one_line(excinfo)


def test_explicit_cache_dir_wins_and_the_corpus_is_untouched(
    corpus_dir: Path, _isolated_cache: Path, tmp_path: Path
) -> None:
    before = sorted(os.listdir(corpus_dir))
    data = prepare_data(str(corpus_dir), "byte", val_fraction=0.2, cache_dir=tmp_path / "explicit")
    assert sorted(os.listdir(corpus_dir)) == before
    assert cache_files(_isolated_cache) == []
    assert data.directory is not None and data.directory.parent == tmp_path / "explicit"
