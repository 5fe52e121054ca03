"""Tuning self-speculative decoding by measured speed (condformer.dial.speculation): every (draft exit, draft
length, adaptive confidence) candidate is timed against full depth on the same prompts, its output checked against
full-depth decoding, and the fastest kept; ``read_speculation`` gives it to ``generate --speculative auto``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from condformer.config import ExitConfig, ModelConfig
from condformer.dial.speculation import draft_depths, read_speculation, tune_speculation
from condformer.errors import CondformerError
from condformer.model import build_model
from helpers import one_line_error


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=64, vocab_size=64, exits=ExitConfig())
    m = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_every_candidate_is_timed_and_the_fastest_kept(model: torch.nn.Module) -> None:
    choice = tune_speculation(model, [[1, 2, 3], [9, 8]], new_tokens=6, draft_tokens=(1, 3),
                              confidences=(None, 0.5), repeats=1)
    assert draft_depths(model) == [1, 2]
    assert len(choice.candidates) == 2 * 2 * 2 and choice.full_s > 0
    keys = {(c["draft_layers"], c["draft_tokens"], c["draft_confidence"]) for c in choice.candidates}
    assert keys == {(E, K, c) for E in (1, 2) for K in (1, 3) for c in (None, 0.5)}
    for c in choice.candidates:
        assert c["median_s"] > 0 and c["speedup"] > 0 and 0 <= c["acceptance_rate"] <= 1
        assert 0 < c["drafts_per_round"] <= c["draft_tokens"]
    assert choice.best == max(choice.candidates, key=lambda c: c["speedup"])
    json.dumps(choice.to_dict())


def test_bad_tuning_requests_are_one_line_errors(model: torch.nn.Module) -> None:
    assert "non-empty" in one_line_error(lambda: tune_speculation(model, [[]]), CondformerError)
    plain = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=64))
    assert "drafts with an exit head" in one_line_error(lambda: draft_depths(plain), CondformerError)


def test_read_speculation(tmp_path: Path) -> None:
    assert "--speculation first" in one_line_error(lambda: read_speculation(tmp_path), CondformerError)
    (tmp_path / "dial.json").write_text(json.dumps({"tolerances": {}}))
    assert "no tuned self-speculation" in one_line_error(lambda: read_speculation(tmp_path), CondformerError)
    best = {"draft_layers": 2, "draft_tokens": 4, "draft_confidence": 0.4}
    (tmp_path / "dial.json").write_text(json.dumps({"speculation": {"best": best}}))
    assert read_speculation(tmp_path) == best
