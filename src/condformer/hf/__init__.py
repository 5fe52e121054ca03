"""Hugging Face interop: import, export, transformers wrapper.

- :func:`import_model` (``condformer import``): a local model directory or GGUF file as a condformer run.
- :func:`export_model` (``condformer export``): a run as transformers' native architecture (dense models) or
  as condformer's own transformers type (any model).
- :mod:`condformer.hf.wrapper`: that type, ``CondformerForCausalLM``; importing the module registers it with
  transformers' Auto classes. Names load lazily, so the CLI does not import transformers until it needs it.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"import_model": "importer", "export_model": "exporter", "CondformerConfig": "wrapper",
         "CondformerForCausalLM": "wrapper", "from_condformer": "wrapper", "save_as_transformers": "wrapper"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"condformer.hf.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
