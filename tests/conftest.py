"""Shared fixtures: a tiny model config factory, a small code corpus, deterministic seeding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from condformer.config import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(**overrides)`` -> a fresh, small ModelConfig (d=32, 2 layers, 2 heads)."""

    def make(**overrides) -> ModelConfig:
        fields = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=260)
        fields.update(overrides)
        return ModelConfig(**fields)

    return make


def write_code_corpus(root: Path, n_files: int = 40) -> Path:
    """A small deterministic code-like corpus: enough text for 64-token windows in both splits."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def func_{i}_{j}(x, y={j}):\n    return x * {i} + y - {j % 7}\n\n" for j in range(40)]
        (root / f"mod_{i:03d}.py").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a 40-file corpus written once per test session (tests must not modify it)."""
    return write_code_corpus(tmp_path_factory.mktemp("code_corpus"))
