"""Shared fixtures: a tiny model config factory and deterministic seeding."""

from __future__ import annotations

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
