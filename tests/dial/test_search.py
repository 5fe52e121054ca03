"""The compute dial's search (condformer.dial.search) on a small random MoE + MoD model, float64.

The grid is the product of the model's knobs with full compute first; FLOPs per token fall as each knob turns
down (they count what ran); losses are in [0, 1] and zero for full compute against itself; the chosen setting of
each tolerance is certified by Learn-then-Test (its own tests: test_ltt.py) and the model's settings are left as
they were. ``read_tolerance`` is the one way other commands take a calibrated setting, with one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.dial.search import knob_grid, read_tolerance, run_dial, score, sequence_losses, tolerance_key
from condformer.errors import CondformerError
from condformer.model import build_model
from helpers import one_line_error, perturb_

V, T = 64, 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    layers = [LayerSpec(router="mod", options={"capacity": 0.5}),
              LayerSpec(ffn="moe", options={"experts": 4, "top_k": 2, "capacity_factor": None})]
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=V, layers=layers)
    torch.manual_seed(0)
    return perturb_(build_model(cfg).double(), 0.2).eval()


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(12):
        tokens = torch.randint(0, V, (8, T + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def test_the_grid_is_every_joint_setting_with_full_compute_first(model: torch.nn.Module) -> None:
    grid = knob_grid(model)
    assert len(grid) == 2 * 5 and grid[0] == {"moe_top_k": 2, "mod_threshold": 0.0}
    assert {g["moe_top_k"] for g in grid} == {1, 2} and len({tuple(g.items()) for g in grid}) == 10
    assert knob_grid(model, ["moe_top_k"]) == [{"moe_top_k": 2}, {"moe_top_k": 1}]


def test_unknown_or_absent_knobs_are_one_line_errors(model: torch.nn.Module) -> None:
    assert "unknown dial knob 'depth'" in one_line_error(lambda: knob_grid(model, ["depth"]), CondformerError)
    dense = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32, vocab_size=V))
    assert "no knob the dial turns" in one_line_error(lambda: knob_grid(dense), CondformerError)
    assert "no 'moe_top_k' knob" in one_line_error(lambda: knob_grid(dense, ["moe_top_k"]), CondformerError)


def test_flops_count_what_ran_and_losses_are_bounded(model, batches) -> None:
    full = score(model, batches, {"moe_top_k": 2, "mod_threshold": 0.0})
    one = score(model, batches, {"moe_top_k": 1, "mod_threshold": 0.0})
    sparse = score(model, batches, {"moe_top_k": 2, "mod_threshold": 4.0})
    assert one.flops_per_token < full.flops_per_token and sparse.flops_per_token < full.flops_per_token
    for metric in ("loss", "agreement"):
        assert np.array_equal(sequence_losses(full, full, batches, metric), np.zeros(12 * 8))
        for other in (one, sparse):
            losses = sequence_losses(other, full, batches, metric)
            assert losses.shape == (96,) and (losses >= 0).all() and (losses <= 1).all() and losses.max() > 0
    model.set_inference(moe_top_k=None, mod_threshold=0.0)


def test_agreement_loss_is_the_share_of_changed_argmaxes(model, batches) -> None:
    full = score(model, batches[:1], {"moe_top_k": 2, "mod_threshold": 0.0})
    one = score(model, batches[:1], {"moe_top_k": 1, "mod_threshold": 0.0})
    expected = (one.top1_tokens[0] != full.top1_tokens[0]).double().mean(1).numpy()
    assert np.array_equal(sequence_losses(one, full, batches[:1], "agreement"), expected)
    model.set_inference(moe_top_k=None, mod_threshold=0.0)


@pytest.mark.parametrize("metric", ["loss", "agreement"])
def test_run_dial_certifies_and_reports_and_restores_the_model(model, batches, metric: str) -> None:
    model.set_inference(mod_threshold=0.25)
    before = model.inference_settings()
    result = run_dial(model, batches, [0.02, 0.3, 0.9], 0.1, metric=metric)
    assert model.inference_settings() == before and not model.training
    assert result.n_calibration + result.n_holdout == 96 and result.n_holdout == 32
    assert result.grid[0]["flops_ratio"] == 1.0 and result.grid[0]["holdout_risk"] == 0.0
    loose = result.tolerances[tolerance_key(0.9)]
    assert loose["settings"] is not None and loose["flops_ratio"] < 1  # everything passes 90%: a cheaper one
    assert loose["p_value"] <= 0.1
    for t in result.tolerances.values():  # the chosen one is the cheapest certified
        if t["settings"] is not None:
            cheapest = min(t["certified"], key=lambda s: (result.grid[s]["flops_per_token"], s))
            assert result.grid[cheapest]["settings"] == t["settings"]
    json.dumps(result.to_dict())
    model.set_inference(mod_threshold=0.0)


def test_bad_dial_arguments_are_one_line_errors(model, batches) -> None:
    assert "metric" in one_line_error(lambda: run_dial(model, batches, [0.1], 0.1, metric="bleu"), CondformerError)
    assert "(0, 1)" in one_line_error(lambda: run_dial(model, batches, [1.5], 0.1), CondformerError)
    assert "too few" in one_line_error(lambda: run_dial(model, batches[:1][:1], [0.1], 0.1, holdout_fraction=0.99),
                                       CondformerError)


def test_read_tolerance_takes_only_what_was_calibrated(tmp_path: Path) -> None:
    assert "no dial.json" in one_line_error(lambda: read_tolerance(tmp_path, 0.01), CondformerError)
    dial = {"delta": 0.1, "tolerances": {
        tolerance_key(0.01): {"tolerance": 0.01, "settings": None},
        tolerance_key(0.05): {"tolerance": 0.05, "settings": {"moe_top_k": 1, "mod_threshold": 0.5}}}}
    (tmp_path / "dial.json").write_text(json.dumps(dial))
    assert read_tolerance(tmp_path, 0.05) == {"moe_top_k": 1, "mod_threshold": 0.5}
    msg = one_line_error(lambda: read_tolerance(tmp_path, 0.02), CondformerError)
    assert "0.02 was not calibrated" in msg and "0.01, 0.05" in msg
    assert "no setting met tolerance 0.01" in one_line_error(lambda: read_tolerance(tmp_path, 0.01), CondformerError)
    (tmp_path / "dial.json").write_text("{")
    assert "not a dial file" in one_line_error(lambda: read_tolerance(tmp_path, 0.05), CondformerError)
