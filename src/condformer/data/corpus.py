"""Load a text corpus and split it into train and validation documents.

A corpus spec is one of:

* ``"stdlib"``: the ``.py`` files of the running Python's standard library. It is on every machine, needs
  no download and is large enough (about 10 MB) to train small models, so it is the default.
* a path: a text file, a directory (all regular files below it) or a glob pattern.
* ``"synthetic:NAME"`` or ``"synthetic:NAME:N_DOCS"``: a corpus generated on the fly (no files, no download),
  such as the routing diagnostic ``synthetic:mixed-difficulty`` (see :mod:`condformer.data.synthetic`).
* ``"hf:NAME"``, ``"hf:NAME:SPLIT:COLUMN"`` or ``"hf:NAME:CONFIG:SPLIT:COLUMN"``: a Hugging Face dataset
  (needs the optional ``datasets`` package).

Documents are split into train and validation by a hash of their path rather than by position, so adding
a file to a corpus never moves an existing file from one split to the other (which would silently leak
validation text into training when a run is repeated on a grown corpus).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import itertools
import math
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from condformer.data.document import Document
from condformer.data.synthetic import synthetic_documents
from condformer.errors import DataError

__all__ = ["Document", "Corpus", "load_corpus", "HF_MAX_DOCS"]

HF_MAX_DOCS = 20_000
"""Default cap on records read from a Hugging Face dataset, so ``hf:`` never streams a whole web crawl."""

_SPLIT_BUCKETS = 10_000
_BINARY_SNIFF_BYTES = 8192
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Corpus:
    """The documents of a corpus, already split into train and validation lists."""

    source: str
    train: list[Document]
    val: list[Document]

    def fingerprint(self) -> dict:
        """Identify the exact text and split, so caches and checkpoints can detect a changed corpus.

        ``sha256`` covers every document's split, path and text (length-prefixed, so no two different
        corpora hash alike by concatenation accidents). It does not cover ``source``: the same files reached
        through ``data/`` or ``./data`` share tokenizer and token caches.
        """
        digest = hashlib.sha256()
        total_bytes = 0
        for split, docs in (("train", self.train), ("val", self.val)):
            for doc in docs:
                encoded = doc.text.encode("utf-8")
                total_bytes += len(encoded)
                for part in (split.encode(), doc.path.encode("utf-8"), encoded):
                    digest.update(len(part).to_bytes(8, "little"))
                    digest.update(part)
        return {
            "source": self.source,
            "files": len(self.train) + len(self.val),
            "bytes": total_bytes,
            "sha256": digest.hexdigest(),
            "train_files": len(self.train),
            "val_files": len(self.val),
        }


def load_corpus(spec: str = "stdlib", val_fraction: float = 0.05, *, max_docs: int | None = None) -> Corpus:
    """Read the corpus named by ``spec`` and split it into train and validation documents.

    ``max_docs`` caps the number of documents read (in corpus order); ``None`` means all local files and the
    first :data:`HF_MAX_DOCS` records of a Hugging Face dataset.
    """
    _check_val_fraction(val_fraction)
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max_docs must be at least 1, got {max_docs}; pass a positive number or None")
    docs = _read_documents(spec, max_docs)
    if sum(len(doc.text) for doc in docs) == 0:
        raise DataError(f"corpus {spec!r} contains no text; pass --data stdlib or a non-empty text corpus")
    train, val = split_documents(docs, val_fraction)
    return Corpus(source=spec, train=train, val=val)


def _check_val_fraction(val_fraction: float) -> None:
    """Reject fractions that leave nothing to train on (or nothing to validate on)."""
    ok = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not ok or not (0.0 < val_fraction <= 0.5):
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}; pass a value such as 0.05")


def _read_documents(spec: str, max_docs: int | None) -> list[Document]:
    """Dispatch on the kind of spec; an existing path wins over glob syntax (``data[1].txt`` is a file)."""
    if spec == "stdlib":
        return _limit(_stdlib_documents(), max_docs)
    if spec.startswith("hf:"):
        return _hf_documents(spec, HF_MAX_DOCS if max_docs is None else max_docs)
    if spec.startswith("synthetic:"):
        return synthetic_documents(spec, max_docs)
    path = Path(spec).expanduser()
    if _GLOB_CHARS & set(spec) and not path.exists():
        return _limit(_glob_documents(spec), max_docs)
    if path.is_dir():
        return _limit(_directory_documents(path, spec), max_docs)
    if path.is_file():
        return [Document(path.name, _read_text_file(path, spec))]
    if path.exists():
        raise DataError(
            f"corpus path {spec!r} is not a regular file or directory; pass a text file or directory"
        )
    raise DataError(
        f"corpus path {spec!r} does not exist; pass --data stdlib or an existing file, directory or glob"
    )


def _limit(docs: Iterable[Document], max_docs: int | None) -> list[Document]:
    return list(itertools.islice(docs, max_docs))


# --------------------------------------------------------------------------------------------- local files


def _decode(data: bytes) -> str | None:
    """Return the text of a file, or None when it looks binary (NUL bytes early on or invalid UTF-8)."""
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text_file(path: Path, spec: str) -> str:
    """Read a file the user named explicitly; binary or empty content is an error there, not a skip."""
    text = _decode(_read_bytes(path))
    if text is None:
        raise DataError(
            f"corpus file '{path}' is binary or not valid UTF-8; pass UTF-8 text files only (spec {spec!r})"
        )
    if not text:
        raise DataError(f"corpus file '{path}' is empty; pass a file that contains text")
    return text


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"cannot read corpus file '{path}': {reason}; check its permissions") from exc


def _relative(path: Path, root: Path) -> str:
    """A POSIX-style relative path, so the split (hashed on it) is the same on every OS."""
    return path.relative_to(root).as_posix()


def _walk_files(root: Path, skip_dir: frozenset[str] = frozenset()) -> Iterator[Path]:
    """All regular, non-hidden files below ``root`` in sorted order (sorted per level for determinism)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dir)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                yield path


def _sorted_by_relative(paths: Iterable[Path], root: Path) -> list[tuple[str, Path]]:
    """Sort by the relative path string: os.walk order depends on directory nesting, this does not."""
    return sorted((_relative(path, root), path) for path in paths)


def _directory_documents(root: Path, spec: str) -> Iterator[Document]:
    """Every text file below ``root``; binary and empty files are skipped (directories hold stray blobs)."""
    found = False
    for rel, path in _sorted_by_relative(_walk_files(root), root):
        text = _decode(_read_bytes(path))
        if text:
            found = True
            yield Document(rel, text)
    if not found:
        raise DataError(
            f"corpus directory {spec!r} contains no non-empty UTF-8 text files; "
            "add text files or pick another --data"
        )


def _glob_root(pattern: str) -> Path:
    """The directory made of the pattern's leading non-glob components; matches are named relative to it."""
    parts = Path(pattern).expanduser().parts
    fixed = list(itertools.takewhile(lambda part: not (_GLOB_CHARS & set(part)), parts[:-1]))
    return Path(*fixed) if fixed else Path(".")


def _glob_documents(pattern: str) -> Iterator[Document]:
    """Files matched by a glob (``**`` recurses); every match must be text since the user picked them."""
    matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
    files = [p for p in matches if p.is_file()]
    if not files:
        raise DataError(f"glob {pattern!r} matches no files; check the pattern or pass a directory instead")
    root = _glob_root(pattern)
    for rel, path in _sorted_by_relative(files, root):
        text = _read_text_file(path, pattern) if path.stat().st_size else ""
        if text:
            yield Document(rel, text)


def _stdlib_documents() -> Iterator[Document]:
    """The standard library's own ``.py`` files, without tests or installed third-party packages.

    Tests are excluded because some are deliberately mis-encoded and many are huge generated tables;
    site-packages would make the corpus depend on what happens to be installed.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"Python standard library not found at '{root}'; pass --data with a file or directory"
        )
    files = (
        path
        for path in _walk_files(root, skip_dir=_STDLIB_SKIP_DIRS)
        if path.suffix == ".py" and not path.name.startswith("test_")
    )
    for rel, path in _sorted_by_relative(files, root):
        try:
            text = _decode(path.read_bytes())
        except OSError:
            continue
        if text:
            yield Document(rel, text)


# ------------------------------------------------------------------------------------------ Hugging Face


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str, str]:
    """Split ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` into (name, config, split, column)."""
    parts = spec[len("hf:") :].split(":")
    if any(not part for part in parts) or len(parts) not in (1, 3, 4):
        raise DataError(
            f"bad Hugging Face corpus spec {spec!r}; "
            "use hf:NAME, hf:NAME:SPLIT:COLUMN or hf:NAME:CONFIG:SPLIT:COLUMN"
        )
    if len(parts) == 1:
        return parts[0], None, "train", "text"
    if len(parts) == 3:
        return parts[0], None, parts[1], parts[2]
    return parts[0], parts[1], parts[2], parts[3]


def _import_datasets() -> ModuleType:
    """Import ``datasets`` lazily: it is an optional, heavy dependency only ``hf:`` corpora need."""
    try:
        return importlib.import_module("datasets")
    except ImportError as exc:
        raise DataError(
            "the 'datasets' package is needed for hf: corpora; "
            "pip install 'condformer[hf]' or use a local corpus"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _hf_documents(spec: str, max_docs: int) -> list[Document]:
    """Stream up to ``max_docs`` records of a dataset column (streaming avoids downloading everything)."""
    name, config, split, column = _parse_hf_spec(spec)
    datasets = _import_datasets()
    try:
        records = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for i, record in enumerate(itertools.islice(records, max_docs)):
            if column not in record:
                raise DataError(
                    f"dataset {name!r} has no column {column!r} (columns: {', '.join(sorted(record))}); "
                    f"use hf:{name}:{split}:COLUMN"
                )
            value = record[column]
            if isinstance(value, str) and value:
                docs.append(Document(f"hf:{name}#{i}", value))
    except DataError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for network, auth and naming problems
        raise DataError(
            f"could not load Hugging Face dataset {name!r} split {split!r} ({_first_line(exc)}); "
            "check the name, split, config and network access"
        ) from exc
    return docs


# ------------------------------------------------------------------------------------------------- split


def _path_hash(path: str) -> int:
    return int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "big")


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split documents by a hash of their path, stable under adding or removing other documents.

    A document goes to validation when ``hash(path) % 10000 < val_fraction * 10000``. Small corpora could
    end up with an empty split; then (and only then) the train document whose hash bucket is smallest moves
    to validation (or the validation document with the largest bucket moves to train). That fallback can
    move a document when the corpus grows, but only for corpora with a handful of files.

    A single document is split inside its text: its last ``val_fraction`` of bytes (cut at a character
    boundary) becomes the validation document, so one-file corpora still train and validate.
    """
    if len(docs) == 1:
        return _split_single(docs[0], val_fraction)
    threshold = round(val_fraction * _SPLIT_BUCKETS)
    keyed = [((_path_hash(doc.path) % _SPLIT_BUCKETS, doc.path), doc) for doc in docs]
    val_keys = {key for key, _ in keyed if key[0] < threshold}
    if not val_keys:
        val_keys = {min(key for key, _ in keyed)}
    elif len(val_keys) == len(keyed):
        val_keys.discard(max(val_keys))
    train = [doc for key, doc in keyed if key not in val_keys]
    val = [doc for key, doc in keyed if key in val_keys]
    return train, val


def _split_single(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Cut one document's UTF-8 bytes so the tail (about ``val_fraction`` of it) is validation text."""
    data = doc.text.encode("utf-8")
    cut = len(data) - max(1, math.ceil(len(data) * val_fraction))
    while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:  # do not cut inside a multi-byte character
        cut += 1
    if cut <= 0 or cut >= len(data):
        raise DataError(
            f"corpus {doc.path!r} is too short ({len(data)} bytes) to split into train and validation text; "
            "pass a larger corpus"
        )
    train_text, val_text = data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
    return [Document(doc.path, train_text)], [Document(f"{doc.path}#val", val_text)]
