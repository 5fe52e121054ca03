"""Threshold calibration for confidence exits: the estimate, the cost model, the exact check, the errors."""

from __future__ import annotations

import pytest
import torch

from condformer.calibrate import _estimate, calibrate, decode_cost, exact_quality, exit_check_cost
from condformer.config import ExitConfig, ModelConfig
from condformer.errors import CondformerError
from condformer.flops import layer_forward_flops
from condformer.model import build_model
from helpers import one_line_error

L = 4


def make_model(seed: int = 0, **exit_kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=64, exits=ExitConfig(**exit_kw))
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 260, (2, 24), generator=g)
        y = torch.randint(0, 260, (2, 24), generator=g)
        y[0, :3] = -100  # ignored targets count nowhere
        out.append((x, y))
    return out


def test_decode_cost_counts_layers_and_the_checks_that_did_not_fire() -> None:
    # exits after layers 0, 1, 2 (+ the last); exit 1 off. depth 1: exited at the first check (no failed check);
    # depth 2 impossible; depth 3: exit 0 failed; depth 4: exits 0 and 2 failed
    hist = [2, 0, 3, 5]
    got = decode_cost(hist, [0, 1, 2, 3], [0.5, None, 0.7], check_cost=0.25)
    want = (2 * 1 + 3 * (3 + 0.25) + 5 * (4 + 0.5)) / 10
    assert got == pytest.approx(want)
    assert decode_cost(hist, [0, 1, 2, 3], None, 0.25) == pytest.approx((2 + 9 + 20) / 10)  # full depth: no checks


def test_estimate_equals_a_per_token_loop() -> None:
    g = torch.Generator().manual_seed(0)
    n_exits, n_tok = 4, 50
    a = {"conf": torch.rand(n_exits - 1, n_tok, generator=g, dtype=torch.float64),
         "ll": -torch.rand(n_exits, n_tok, generator=g, dtype=torch.float64) * 3,
         "pred": torch.randint(0, 3, (n_exits, n_tok), generator=g)}
    depths = torch.tensor([1, 2, 3, 4])
    thr = torch.tensor([0.8, float("inf"), 0.3], dtype=torch.float64)
    loss = agree = depth = cost = 0.0
    for t in range(n_tok):
        k = next((j for j in range(n_exits - 1) if a["conf"][j, t] > thr[j]), n_exits - 1)
        loss -= float(a["ll"][k, t])
        agree += float(a["pred"][k, t] == a["pred"][-1, t])
        depth += int(depths[k])
        cost += int(depths[k]) + 0.3 * sum(1 for j in range(k) if torch.isfinite(thr[j]))
    got = _estimate(thr, a, depths, 0.3)
    assert got == pytest.approx((loss / n_tok, agree / n_tok, depth / n_tok, cost / n_tok))


def test_check_cost_default_is_the_head_to_layer_flop_ratio() -> None:
    cfg = ModelConfig(d_model=32, n_layers=L, n_heads=2, exits=ExitConfig())
    layer = sum(layer_forward_flops(cfg, i, 1) for i in range(L)) / L
    assert exit_check_cost(cfg) == pytest.approx(2 * 32 * 260 / layer)
    cfg.exits.confidence = "cosine"  # decides without a head
    assert exit_check_cost(cfg) == 0.0


@pytest.mark.parametrize("metric,tolerance", [("loss", 0.02), ("loss", 0.0), ("agreement", 0.2)])
def test_calibrated_thresholds_meet_the_tolerance_exactly(metric: str, tolerance: float) -> None:
    model = make_model()
    data = batches()
    r = calibrate(model, data, tolerance, metric, grid=16)
    assert model.exits.thresholds is None  # the model's own policy is left as it was
    # calibration must have found exits that fire: otherwise every check below holds trivially
    assert r.thresholds is not None and r.mean_depth < L
    exact = exact_quality(model, data, r.thresholds)
    assert (r.loss, r.agreement, r.full_loss) == pytest.approx((exact["loss"], exact["agreement"], exact["full_loss"]))
    assert r.histogram == exact["histogram"]
    if metric == "loss":
        assert r.loss <= r.full_loss * (1 + tolerance) + 1e-12
    else:
        assert r.agreement >= 1 - tolerance
    assert r.tokens == sum(int((y != -100).sum()) for _, y in data)
    assert r.cost == pytest.approx(decode_cost(r.histogram, model.exits.exit_layers, r.thresholds, r.check_cost))


def test_a_looser_tolerance_never_costs_more_and_expensive_checks_switch_exits_off() -> None:
    model = make_model()
    data = batches()
    tight = calibrate(model, data, 0.002, grid=16, check_cost=0.0)
    loose = calibrate(model, data, 0.2, grid=16, check_cost=0.0)
    assert loose.thresholds is not None and loose.mean_depth < L
    assert loose.cost <= tight.cost + 1e-9
    costly = calibrate(model, data, 0.2, grid=16, check_cost=5.0)
    enabled = sum(t is not None for t in costly.thresholds or [])
    assert enabled <= sum(t is not None for t in loose.thresholds)
    assert costly.cost <= decode_cost(loose.histogram, model.exits.exit_layers, loose.thresholds, 5.0) + 1e-9


@torch.no_grad()
def test_exact_quality_follows_the_model_forward() -> None:
    model = make_model()
    data = batches(2)
    thr = [0.02, None, 0.05]
    q = exact_quality(model, data, thr)
    model.exits.thresholds = thr
    total, n = 0.0, 0
    hist = [0] * L
    for x, y in data:
        out = model(x, y, trace=True)
        m = int((y != -100).sum())
        total += float(out.loss) * m
        n += m
        for d in out.traces["exit_depth"][y != -100].tolist():
            hist[d - 1] += 1
    assert q["loss"] == pytest.approx(total / n) and q["histogram"] == hist
    assert hist[1] == 0  # the exit after layer 1 is off


def test_user_errors_are_one_line() -> None:
    model = make_model()
    data = batches(1)
    for kw, needle in [(dict(tolerance=1.5), "--tolerance"), (dict(tolerance=0.01, metric="bleu"), "metric"),
                       (dict(tolerance=0.01, check_cost=-1.0), "--check-cost")]:
        assert needle in one_line_error(lambda kw=kw: calibrate(model, data, **kw), CondformerError)
    assert "batch" in one_line_error(lambda: calibrate(model, [], 0.01), CondformerError)
    halting = make_model(halting="token")
    assert "halting" in one_line_error(lambda: calibrate(halting, data, 0.01), CondformerError)
    plain = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    assert "no early exits" in one_line_error(lambda: calibrate(plain, data, 0.01), CondformerError)


def test_raising_thresholds_steps_up_one_candidate_and_switches_off_past_the_top() -> None:
    from condformer.calibrate import _raise

    values = [0.1, 0.5, 0.7, 0.9, float("inf")]
    assert _raise([0.5, None, 0.9], values) == [0.7, None, None]
    assert _raise([0.9, None], values) is None  # every exit off: full depth
