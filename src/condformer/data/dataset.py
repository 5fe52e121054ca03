"""Tokenised train/validation streams on disk and deterministic batch sampling.

``prepare_data`` tokenises a corpus once into flat ``.bin`` token files (memory-mapped afterwards, so a
corpus larger than RAM still works and a rerun starts instantly). ``TokenData.get_batch`` draws random
windows whose offsets are a pure function of ``(seed, split, step)`` plus the row index: a resumed run sees
exactly the batches an uninterrupted one would, without saving any RNG state, and data-parallel ranks
partition one global batch instead of drawing independent ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from condformer.data.corpus import Corpus, Document, load_corpus
from condformer.data.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    atomic_writer,
    build_tokenizer,
    default_cache_dir,
    parse_tokenizer_kind,
    tokenizer_digest,
    tokenizer_of_run,
)
from condformer.errors import DataError

__all__ = ["TokenData", "prepare_data", "token_dtype"]

FORMAT_VERSION = 1
"""Bump when the on-disk layout changes so old caches are rebuilt instead of misread."""

SPLITS = ("train", "val")
_SPLIT_LABELS = {"train": "training", "val": "validation"}
_SPLIT_HINTS = {
    "train": "use a larger corpus or a smaller --seq-len",
    "val": "use a larger corpus, a smaller --seq-len or a larger val fraction",
}
_PROGRESS_MIN_DOCS = 200
_ENCODE_CHUNK = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype for the ids: uint16 halves disk and page-cache use for small vocabs."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class TokenData:
    """Train/val token streams in memory-mapped .bin files (uint16 if vocab<=65535 else uint32).

    Also constructible directly from in-memory arrays (handy in tests); then ``train_bytes``/``val_bytes``
    must be given for :meth:`bytes_per_token` to work.
    """

    def __init__(
        self,
        train_tokens: Any,
        val_tokens: Any,
        tokenizer: Tokenizer,
        fingerprint: dict | None = None,
        *,
        train_bytes: int | None = None,
        val_bytes: int | None = None,
        directory: Path | None = None,
    ) -> None:
        self.train_tokens = _as_stream(train_tokens, "train_tokens")
        self.val_tokens = _as_stream(val_tokens, "val_tokens")
        self.tokenizer = tokenizer
        self.fingerprint = (
            dict(fingerprint)
            if fingerprint is not None
            else {
                "tokenizer": tokenizer.name,
                "train_tokens": len(self.train_tokens),
                "val_tokens": len(self.val_tokens),
            }
        )
        self._bytes = {"train": train_bytes, "val": val_bytes}
        self.directory = directory

    def __repr__(self) -> str:
        return (
            f"TokenData(tokenizer={self.tokenizer.name!r}, train_tokens={len(self.train_tokens)}, "
            f"val_tokens={len(self.val_tokens)})"
        )

    def tokens(self, split: str) -> np.ndarray:
        """The 1-D token stream of ``split`` ("train" or "val")."""
        _check_split(split)
        return self.train_tokens if split == "train" else self.val_tokens

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of the split's text divided by its token count (end-of-document tokens included).

        Multiplying a loss in nats/token by ``1 / (ln 2 * bytes_per_token)`` gives bits per byte, which is
        comparable across tokenizers, unlike per-token loss.
        """
        n_tokens = self.num_tokens(split)
        n_bytes = self._bytes[split]
        if n_bytes is None:
            raise DataError(
                f"byte count of the {split} split is unknown; build TokenData with prepare_data()"
            )
        return n_bytes / n_tokens

    def get_batch(
        self,
        split: str,
        step: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``x`` and next-token targets ``y`` (int64, shape ``[batch_size, seq_len]``).

        Offsets come from :func:`window_offsets`, a pure function of ``(seed, split, step)``; the global
        batch has ``batch_size * world_size`` rows and ``rank`` takes rows
        ``[rank*batch_size, (rank+1)*batch_size)``, so two ranks with batch B see exactly the rows one
        process with batch 2B sees.
        """
        tokens = self.tokens(split)
        _check_batch_args(batch_size, seq_len, rank, world_size)
        _check_length(split, len(tokens), seq_len + 1, f"seq_len+1={seq_len + 1}")
        offsets = window_offsets(seed, split, step, batch_size * world_size, len(tokens) - seq_len)
        rows = offsets[rank * batch_size : (rank + 1) * batch_size]
        window = np.asarray(tokens[rows[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
        full = torch.from_numpy(window)
        return full[:, :-1].contiguous(), full[:, 1:].contiguous()


def window_offsets(seed: int, split: str, step: int, count: int, num_starts: int) -> np.ndarray:
    """``count`` window starts in ``[0, num_starts)``, derived from a SHAKE-256 stream of (seed, split, step).

    A hash rather than a seeded RNG keeps the offsets identical across numpy/torch versions, and SHAKE's
    output for ``count`` rows is a prefix of its output for more rows, so row ``i`` never depends on the
    batch size or world size. Modulo bias is below 2**-32 for any realistic stream length.
    """
    key = f"condformer-batch|{int(seed)}|{split}|{int(step)}".encode()
    raw = np.frombuffer(hashlib.shake_256(key).digest(8 * count), dtype="<u8")
    return (raw % np.uint64(num_starts)).astype(np.int64)


def _as_stream(tokens: Any, name: str) -> np.ndarray:
    array = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if array.ndim != 1 or len(array) == 0:
        raise DataError(f"{name} must be a non-empty 1-D token array, got shape {array.shape}")
    return array


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")


def _check_batch_args(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}; pass a positive --batch-size")
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}; pass a positive --seq-len")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size}); check the distributed launch")


def _check_length(split: str, n_tokens: int, needed: int, what: str) -> None:
    """Raise the one-line 'split too short' error shared by get_batch and prepare_data(min_tokens=...)."""
    if n_tokens < needed:
        raise DataError(
            f"{_SPLIT_LABELS[split]} split has {n_tokens} tokens, fewer than {what}; {_SPLIT_HINTS[split]}"
        )


# ---------------------------------------------------------------------------------------------- preparing


def prepare_data(
    spec: str = "stdlib",
    tokenizer: str | Tokenizer = "byte",
    val_fraction: float = 0.05,
    cache_dir: Path | None = None,
    min_tokens: int | None = None,
) -> TokenData:
    """Load, tokenise and cache a corpus; reuse the cached token files when corpus and tokenizer match.

    Files live in ``cache_dir/<sha256[:16]>-<tokenizer name>-v<val_fraction>/`` as ``train.bin``, ``val.bin``
    and ``meta.json``. Each is written atomically and ``meta.json`` last, so it doubles as a commit marker: a
    crashed run leaves no meta (or an old, mismatching one) and the next run simply re-tokenises.
    ``tokenizer`` is a kind (``"byte"``, ``"bpe"``, ``"bpe:N"``) or an existing :class:`Tokenizer`, for
    example one restored from a checkpoint to evaluate on new text with the tokenizer the model knows.
    ``min_tokens`` (for example ``seq_len + 1``) makes a too-small split fail here, with a clear message,
    rather than at the first validation step.
    """
    if not isinstance(tokenizer, Tokenizer):
        parse_tokenizer_kind(tokenizer)  # reject a bad --tokenizer before reading a large corpus
        if tokenizer.startswith("run:"):
            tokenizer = tokenizer_of_run(tokenizer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = load_corpus(spec, val_fraction)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer, corpus, root)
    corpus_fp = corpus.fingerprint()
    directory = root / f"{corpus_fp['sha256'][:16]}-{tok.name}-v{val_fraction}"
    expected = {
        "format": FORMAT_VERSION,
        "sha256": corpus_fp["sha256"],
        "tokenizer_sha256": tokenizer_digest(tok),
        "dtype": token_dtype(tok.vocab_size).name,
    }
    meta = _read_meta(directory, expected)
    if meta is None:
        meta = _write_prepared(directory, corpus, tok, expected)
    data = _open_prepared(directory, meta, tok, corpus_fp)
    if min_tokens is not None:
        for split in SPLITS:
            _check_length(split, data.num_tokens(split), min_tokens, f"the required {min_tokens}")
    return data


def _read_meta(directory: Path, expected: dict) -> dict | None:
    """The cached meta.json when it matches ``expected`` and the token files have the recorded sizes."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return None
    itemsize = np.dtype(expected["dtype"]).itemsize
    for split in SPLITS:
        try:
            size = (directory / f"{split}.bin").stat().st_size
        except OSError:
            return None
        count = meta.get(f"{split}_tokens")
        if not isinstance(count, int) or count < 1 or size != count * itemsize:
            return None
        if not isinstance(meta.get(f"{split}_bytes"), int):
            return None
    return meta


def _write_prepared(directory: Path, corpus: Corpus, tokenizer: Tokenizer, expected: dict) -> dict:
    """Tokenise both splits into ``.bin`` files, then commit them by writing ``meta.json``."""
    dtype = np.dtype(expected["dtype"])
    show = len(corpus.train) + len(corpus.val) > _PROGRESS_MIN_DOCS
    meta = dict(expected)
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        n_tokens, n_bytes = _write_split(directory / f"{split}.bin", docs, tokenizer, dtype, show)
        meta[f"{split}_tokens"] = n_tokens
        meta[f"{split}_bytes"] = n_bytes
    with atomic_writer(directory / "meta.json") as handle:
        handle.write(json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))
    return meta


def _write_split(
    path: Path, docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype, show_progress: bool
) -> tuple[int, int]:
    """Stream ``doc tokens + eos`` for every document into ``path``; return (tokens, UTF-8 bytes)."""
    n_tokens = n_bytes = 0
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    progress = tqdm(
        total=len(docs),
        desc=f"tokenizing {path.stem}",
        unit="doc",
        file=sys.stderr,
        leave=False,
        disable=None if show_progress else True,
    )
    with progress, atomic_writer(path) as handle:
        for chunk in _chunks(docs, _ENCODE_CHUNK):
            for ids in _encode_texts(tokenizer, [doc.text for doc in chunk], dtype):
                handle.write(ids.tobytes())
                handle.write(eos.tobytes())
                n_tokens += len(ids) + 1
            n_bytes += sum(len(doc.text.encode("utf-8")) for doc in chunk)
            progress.update(len(chunk))
    return n_tokens, n_bytes


def _chunks(docs: Sequence[Document], size: int) -> Iterator[Sequence[Document]]:
    for start in range(0, len(docs), size):
        yield docs[start : start + size]


def _encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Token arrays for ``texts``; bytes skip the Python-list detour, which dominates for large corpora."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) for text in texts]
    return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]


def _open_prepared(directory: Path, meta: dict, tokenizer: Tokenizer, corpus_fp: dict) -> TokenData:
    """Memory-map the token files described by ``meta``."""
    dtype = np.dtype(meta["dtype"])
    streams = {
        split: np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r", shape=(meta[f"{split}_tokens"],))
        for split in SPLITS
    }
    fingerprint = {
        **corpus_fp,
        "tokenizer": tokenizer.name,
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "train_bytes": meta["train_bytes"],
        "val_bytes": meta["val_bytes"],
    }
    return TokenData(
        streams["train"],
        streams["val"],
        tokenizer,
        fingerprint,
        train_bytes=meta["train_bytes"],
        val_bytes=meta["val_bytes"],
        directory=directory,
    )
