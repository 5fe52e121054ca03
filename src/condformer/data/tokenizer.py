"""Tokenizers: a dependency-free byte tokenizer and a locally trained byte-level BPE.

Both share one small interface (:class:`Tokenizer`) and serialise to a JSON-friendly dict, so a checkpoint
carries the exact tokenizer it was trained with and generation never depends on a cache file still existing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

from condformer.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from condformer.data.corpus import Corpus

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "build_tokenizer",
    "tokenizer_from_dict",
    "default_cache_dir",
    "DEFAULT_BPE_VOCAB",
    "MIN_BPE_VOCAB",
]

DEFAULT_BPE_VOCAB = 8192
MIN_BPE_VOCAB = 300
"""256 byte tokens + 4 specials leave room for at least 40 merges; fewer makes BPE pointless."""

_VALID_KINDS = "'byte', 'bpe', 'bpe:N' (N >= 300) or 'run:PATH' (the tokenizer of a run, e.g. an imported model's)"


# ------------------------------------------------------------------------------------------- cache helpers


def default_cache_dir() -> Path:
    """Where tokenizers and token files are cached: ``$CONDFORMER_CACHE`` or ``~/.cache/condformer``."""
    env = os.environ.get("CONDFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "condformer"


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` via a temp file in the same directory and ``os.replace`` it into place.

    A crash (or Ctrl-C) mid-write leaves at most a hidden ``.tmp`` file, never a truncated ``path`` that a
    later run would trust; the rename is atomic on POSIX and Windows within one filesystem.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DataError(
            f"cannot write cache file '{path}' ({exc.strerror or exc}); "
            "free disk space or set CONDFORMER_CACHE to a writable directory"
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ----------------------------------------------------------------------------------------------- tokenizers


def _valid_ids(ids: Iterable[Any], keep: Callable[[int], bool]) -> list[int]:
    """Convert ids to ints and drop those ``keep`` rejects or that are not integers at all.

    Decoding runs on model samples and user input; it must never raise, whatever the ids are.
    """
    out = []
    for raw in ids:
        try:
            value = int(raw)
        except (TypeError, ValueError, OverflowError):
            continue
        if keep(value):
            out.append(value)
    return out


class Tokenizer(ABC):
    """The interface every tokenizer offers: text <-> ids plus four special ids and serialisation."""

    name: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; skips special and out-of-range ids and replaces invalid UTF-8, never raises."""

    @abstractmethod
    def to_dict(self) -> dict:
        """A JSON-serialisable dict from which :func:`tokenizer_from_dict` rebuilds this tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; subclasses override this when they can do it faster (in parallel)."""
        return [self.encode(text) for text in texts]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.pad_id, self.bos_id, self.eos_id, self.mask_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (ids 0..255) plus pad=256, bos=257, eos=258, mask=259.

    Needs no training and no dependency, and handles any text, which makes it the safe default.
    """

    name = "byte"
    vocab_size = 260
    pad_id = 256
    bos_id = 257
    eos_id = 258
    mask_id = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(_valid_ids(ids, lambda i: 0 <= i < 256)).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size}


def _import_tokenizers() -> ModuleType:
    """Import HF ``tokenizers`` lazily: it is optional and only BPE needs it."""
    try:
        return importlib.import_module("tokenizers")
    except ImportError as exc:
        raise DataError(
            "the 'tokenizers' package is needed for BPE; "
            "pip install 'condformer[bpe]' or use --tokenizer byte"
        ) from exc


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) trained locally with Hugging Face ``tokenizers``.

    The special tokens ``<pad> <bos> <eos> <mask>`` take ids 0..3. Their literal strings inside the text are
    encoded as ordinary text (``encode_special_tokens``), so a corpus that mentions ``<eos>`` still
    round-trips exactly and cannot inject fake document boundaries.
    """

    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # not serialised by tokenizers, so set it on every load
        ids = [hf_tokenizer.token_to_id(token) for token in self.SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise DataError(
                f"BPE tokenizer lacks the special tokens {', '.join(self.SPECIAL_TOKENS)}; "
                "retrain it with condformer (delete the cached tokenizer)"
            )
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = f"bpe-{self.vocab_size}"

    @classmethod
    def from_json(cls, tokenizer_json: str) -> BPETokenizer:
        """Rebuild from the string produced by ``tokenizers.Tokenizer.to_str()``."""
        tokenizers = _import_tokenizers()
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"invalid BPE tokenizer JSON ({reason}); the checkpoint or cache file is corrupt, "
                "retrain the tokenizer"
            ) from exc
        return cls(hf_tokenizer)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE with ``vocab_size`` ids (fewer if the text runs out of pairs to merge).

        The full 256-byte alphabet is seeded so any text, even bytes unseen in training, stays encodable.
        """
        _check_vocab_size(vocab_size)
        tokenizers = _import_tokenizers()
        hf_tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = tokenizers.decoders.ByteLevel()
        hf_tokenizer.encode_special_tokens = True
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.SPECIAL_TOKENS),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        special = self.special_ids
        clean = _valid_ids(ids, lambda i: 0 <= i < self.vocab_size and i not in special)
        return self._tok.decode(clean, skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def to_dict(self) -> dict:
        return {
            "kind": "bpe",
            "vocab_size": self.vocab_size,
            "special_ids": {
                "pad": self.pad_id,
                "bos": self.bos_id,
                "eos": self.eos_id,
                "mask": self.mask_id,
            },
            "tokenizer_json": self.to_json(),
        }


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_dict` output (for example one stored in a checkpoint)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(d.get("tokenizer_json"), str):
        tokenizer = BPETokenizer.from_json(d["tokenizer_json"])
        recorded = d.get("special_ids")
        if recorded is not None and recorded != tokenizer.to_dict()["special_ids"]:
            raise DataError(
                "BPE tokenizer special ids do not match the recorded ones; the checkpoint is corrupt"
            )
        return tokenizer
    # Kinds defined in other modules (HFTokenizer: kind "hf"), found without importing them, since they import
    # this module; importing anything under condformer.data loads them through the package's __init__.
    for subclass in Tokenizer.__subclasses__():
        if kind is not None and getattr(subclass, "KIND", None) == kind:
            return subclass.from_dict(d)  # type: ignore[attr-defined]
    raise DataError(
        f"unrecognised tokenizer description (kind={kind!r}); expected a dict from Tokenizer.to_dict()"
    )


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's serialised form: token caches use it to notice a different tokenizer."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- building


def parse_tokenizer_kind(kind: str) -> int | None:
    """Return None for ``byte`` (and ``run:PATH``, resolved by :func:`build_tokenizer`) or the requested vocab
    size for ``bpe`` / ``bpe:N``."""
    if kind == "byte" or (kind.startswith("run:") and len(kind) > len("run:")):
        return None
    if kind == "bpe":
        return DEFAULT_BPE_VOCAB
    if kind.startswith("bpe:"):
        try:
            vocab_size = int(kind[len("bpe:") :])
        except ValueError:
            raise DataError(
                f"bad tokenizer {kind!r}: N in bpe:N must be an integer; use {_VALID_KINDS}"
            ) from None
        _check_vocab_size(vocab_size)
        return vocab_size
    raise DataError(f"unknown tokenizer {kind!r}; use {_VALID_KINDS}")


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"BPE vocab size must be at least {MIN_BPE_VOCAB}, got {vocab_size}; use bpe:{DEFAULT_BPE_VOCAB}"
        )


def tokenizer_of_run(kind: str) -> Tokenizer:
    """``run:PATH``: the tokenizer stored in the current checkpoint of the run at PATH.

    How a study or a new model tokenises exactly as a pretrained model does (``condformer import`` stores the
    model's own tokenizer in its run), without naming the tokenizer's files.
    """
    from condformer.run_layout import read_state

    path = kind[len("run:"):]
    try:
        saved = read_state(path).get("tokenizer")
    except CheckpointError as e:
        raise DataError(f"--tokenizer {kind}: {e}") from None
    if saved is None:
        raise DataError(f"--tokenizer {kind}: the run's checkpoint stores no tokenizer")
    return tokenizer_from_dict(saved)


def build_tokenizer(kind: str, corpus: Corpus, cache_dir: Path | None = None) -> Tokenizer:
    """Return the tokenizer named by ``kind``, training BPE on ``corpus``'s train split when needed.

    A trained BPE is cached as JSON under ``cache_dir/tokenizers`` keyed by the corpus SHA-256 and the vocab
    size, so a second run (or another DDP rank) loads it instead of spending seconds retraining.
    """
    if kind.startswith("run:"):
        return tokenizer_of_run(kind)
    vocab_size = parse_tokenizer_kind(kind)
    if vocab_size is None:
        return ByteTokenizer()
    _import_tokenizers()  # fail with the install hint before touching the cache
    sha = corpus.fingerprint()["sha256"]
    path = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{vocab_size}-{sha[:16]}.json"
    cached = _load_cached_bpe(path)
    if cached is not None:
        return cached
    tokenizer = BPETokenizer.train((doc.text for doc in corpus.train), vocab_size)
    with atomic_writer(path) as handle:
        handle.write(tokenizer.to_json().encode("utf-8"))
    return tokenizer


def _load_cached_bpe(path: Path) -> BPETokenizer | None:
    """Load a cached tokenizer, or None when absent or unreadable (then it is simply retrained)."""
    try:
        return BPETokenizer.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, DataError):
        return None
