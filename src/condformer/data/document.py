"""The unit every corpus source yields (files, the standard library, ``hf:`` datasets, synthetic tasks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One unit of text.

    ``path`` is a stable identifier (a path relative to the corpus root, or ``hf:NAME#i``); it decides the
    train/validation split, so it must not depend on where the corpus happens to live on disk.
    """

    path: str
    text: str
