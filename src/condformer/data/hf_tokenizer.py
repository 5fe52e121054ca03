"""A pretrained model's own tokenizer (its ``tokenizer.json``) as a condformer :class:`Tokenizer`.

A run that starts from (or is compared with) a pretrained model must tokenise exactly as that model does:
its embedding rows are indexed by that model's ids, so a byte or locally trained BPE tokenizer would make
every weight meaningless. :class:`HFTokenizer` wraps the Hugging Face fast tokenizer behind a checkpoint
(``tokenizers.Tokenizer``) and, like :class:`~condformer.data.tokenizer.BPETokenizer`, serialises the
whole tokenizer JSON into the checkpoint, so a run never depends on the source directory still existing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from condformer.data.tokenizer import Tokenizer, _import_tokenizers, _valid_ids
from condformer.errors import DataError

__all__ = ["HFTokenizer"]

_SPECIAL_NAMES = ("bos", "eos", "pad", "mask")
_CONFIG_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message: errors from tokenizers/JSON can span many lines."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _parse_tokenizer(tokenizer_json: str, where: str, fix: str) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON string; malformed JSON is a one-line DataError."""
    tokenizers = _import_tokenizers()
    try:
        return tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"invalid tokenizer JSON in {where} ({_first_line(exc)}); {fix}") from exc


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None when absent; unreadable or malformed JSON is a one-line DataError."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read '{path}' ({_first_line(exc)}); fix or delete the file") from exc
    if not isinstance(value, dict):
        raise DataError(f"'{path}' is not a JSON object; fix or delete the file")
    return value


def _token_content(value: Any) -> str | None:
    """A special token as written by transformers: a string, an AddedToken dict with "content", or null."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


class HFTokenizer(Tokenizer):
    """The fast tokenizer of a pretrained checkpoint, with its own special ids.

    ``encode`` equals the source tokenizer's ``encode(text, add_special_tokens=False)`` exactly (special-token
    strings inside the text are treated as the source treats them, since a pretrained model saw its text
    that way), and ``decode`` equals its ``decode(ids, skip_special_tokens=True)`` on the valid ids.
    Missing specials fall back as decoders need them: pad to eos, mask to pad, bos to eos; eos itself is
    required because documents are joined by it.
    """

    KIND = "hf"
    """The ``kind`` of :meth:`to_dict`, by which :func:`~condformer.data.tokenizer.tokenizer_from_dict` finds it."""

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        mask_id: int | None = None,
        source: str = "",
    ) -> None:
        # A private copy, with truncation and padding off: transformers disables them per call too, and the
        # caller's tokenizer (for example a transformers backend) must not change under it.
        self._tok = _parse_tokenizer(hf_tokenizer.to_str(), "the tokenizer", "pass a valid tokenizers.Tokenizer")
        self._tok.no_truncation()
        self._tok.no_padding()
        self._json = self._tok.to_str()
        # Ids are normally contiguous; the max guards against an added token placed past the count.
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        self.name = "hf-" + hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:12]
        self.source = str(source)
        if eos_id is None:
            raise DataError(
                f"tokenizer {self.source or self.name} has no end-of-sequence token; "
                "set eos_token in tokenizer_config.json (or eos_token_id in config.json)"
            )
        pad_id = eos_id if pad_id is None else pad_id
        mask_id = pad_id if mask_id is None else mask_id
        bos_id = eos_id if bos_id is None else bos_id
        for label, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), ("mask", mask_id)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise DataError(
                    f"{label} token id {value!r} is outside the tokenizer's vocabulary of {self.vocab_size}; "
                    "fix the special tokens in the tokenizer's config files"
                )
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos_id, eos_id, pad_id, mask_id

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load the tokenizer of a ``save_pretrained`` directory (or a downloaded checkpoint).

        Special tokens come, per token, from the first of ``tokenizer_config.json``, ``special_tokens_map.json``
        (both name token strings) and ``config.json`` (ids) that defines them: the order in which
        transformers itself lets them override one another.
        """
        root = Path(path).expanduser()
        file = root / "tokenizer.json"
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(
                f"cannot read '{file}' ({getattr(exc, 'strerror', None) or _first_line(exc)}); pass a directory "
                "written by save_pretrained (it holds tokenizer.json)"
            ) from exc
        hf_tokenizer = _parse_tokenizer(text, f"'{file}'", "the file is corrupt, re-save it with save_pretrained")
        found: dict[str, int] = {}
        for filename in ("tokenizer_config.json", "special_tokens_map.json"):
            config = _read_json(root / filename) or {}
            for name in _SPECIAL_NAMES:
                token = _token_content(config.get(f"{name}_token"))
                if name in found or token is None:
                    continue
                token_id = hf_tokenizer.token_to_id(token)
                if token_id is None:
                    raise DataError(
                        f"{name}_token {token!r} in '{root / filename}' is not in the vocabulary of '{file}'; "
                        "fix the config file or the tokenizer"
                    )
                found[name] = token_id
        model_config = _read_json(root / "config.json") or {}
        for name, key in _CONFIG_ID_KEYS.items():
            value = model_config.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if name not in found and isinstance(value, int) and not isinstance(value, bool):
                found[name] = value
        return cls(
            hf_tokenizer,
            bos_id=found.get("bos"),
            eos_id=found.get("eos"),
            pad_id=found.get("pad"),
            mask_id=found.get("mask"),
            source=str(root),
        )

    @classmethod
    def from_transformers(cls, tok: Any) -> HFTokenizer:
        """Wrap a transformers fast tokenizer (``AutoTokenizer.from_pretrained(...)``, also with ``gguf_file``)."""
        backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        if backend is None:
            raise DataError(
                f"{type(tok).__name__} is a slow (Python) tokenizer without a tokenizer.json; "
                "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        return cls(
            backend,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            mask_id=tok.mask_token_id,
            source=str(getattr(tok, "name_or_path", "") or ""),
        )

    @classmethod
    def from_dict(cls, d: dict) -> HFTokenizer:
        """Rebuild from :meth:`to_dict`; ids or a vocab size that disagree with the JSON mean a corrupt file."""
        tokenizer_json = d.get("tokenizer_json") if isinstance(d, dict) else None
        recorded = d.get("special_ids") if isinstance(d, dict) else None
        if not isinstance(tokenizer_json, str) or not isinstance(recorded, dict):
            raise DataError("HF tokenizer description lacks tokenizer_json or special_ids; the checkpoint is corrupt")
        ids = {name: recorded.get(name) for name in _SPECIAL_NAMES}
        hf_tokenizer = _parse_tokenizer(tokenizer_json, "the checkpoint", "the checkpoint is corrupt")
        try:
            tokenizer = cls(
                hf_tokenizer,
                bos_id=ids["bos"],
                eos_id=ids["eos"],
                pad_id=ids["pad"],
                mask_id=ids["mask"],
                source=str(d.get("source", "")),
            )
        except DataError as exc:
            raise DataError(f"{exc} (the checkpoint is corrupt)") from exc
        tokens = d.get("special_tokens")
        if (
            tokenizer.to_dict()["special_ids"] != recorded
            or tokenizer.vocab_size != d.get("vocab_size")
            or (tokens is not None and tokens != tokenizer._special_tokens())
        ):
            raise DataError(
                "HF tokenizer special ids, their tokens or the vocab size do not match the recorded ones; "
                "the checkpoint is corrupt"
            )
        return tokenizer

    # ------------------------------------------------------------------------------------------- using

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        special = self.special_ids
        clean = _valid_ids(ids, lambda i: 0 <= i < self.vocab_size and i not in special)
        return self._tok.decode(clean, skip_special_tokens=True)

    def to_json(self) -> str:
        """The wrapped tokenizer's JSON (``tokenizers.Tokenizer.to_str()``), as ``tokenizer.json`` holds it."""
        return self._json

    def _special_tokens(self) -> dict[str, str | None]:
        """The token strings at the special ids: stored beside the ids so a changed id is detected on load."""
        ids = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "mask": self.mask_id}
        return {name: self._tok.id_to_token(token_id) for name, token_id in ids.items()}

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "vocab_size": self.vocab_size,
            "name": self.name,
            "special_ids": {
                "pad": self.pad_id,
                "bos": self.bos_id,
                "eos": self.eos_id,
                "mask": self.mask_id,
            },
            "special_tokens": self._special_tokens(),
            "source": self.source,
            "tokenizer_json": self._json,
        }
