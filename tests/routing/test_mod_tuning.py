"""What router tuning adds to MoD: the 2sigmoid weighting, normalised router input, and capacity annealing."""

from __future__ import annotations

import pytest
import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.model import build_model
from condformer.optim import before_optimizer_step
from condformer.routing.mod import capacity_tokens
from condformer.step_counter import StepCounter, linear_ramp


def _model(**mod):
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64,
                      layers=[LayerSpec(), LayerSpec(router="mod", options={"capacity": 0.25, **mod})])
    return build_model(cfg)


def test_2sigmoid_is_one_at_zero_and_twice_the_sigmoid():
    layer = _model(weighting="2sigmoid").layers[1]
    r = torch.tensor([-3.0, 0.0, 0.5, 4.0])
    assert layer.gate(torch.zeros(1)).item() == 1.0
    torch.testing.assert_close(layer.gate(r), 2 * torch.sigmoid(r))


def test_normed_router_input_ignores_the_state_scale():
    torch.manual_seed(0)
    layer = _model(router_input="normed").layers[1]
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    layer.double()
    # (eps inside the RMS is negligible for states of scale >> 1e-5)
    torch.testing.assert_close(layer.router_logits(1000 * x), layer.router_logits(30 * x), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.causal_logits(1000 * x, None), layer.causal_logits(30 * x, None), rtol=1e-6,
                               atol=1e-9)
    raw = _model().layers[1].double()
    assert not torch.allclose(raw.router_logits(1000 * x), raw.router_logits(x))  # control


def test_capacity_anneals_from_one_to_the_target_per_applied_step():
    model = _model(anneal_steps=4).train()
    layer = model.layers[1]
    seen = []
    for skip in (False, False, True, False, False, False):
        seen.append(layer.training_capacity())
        before_optimizer_step(model, skip=skip)
    assert seen == [1.0, 0.8125, 0.625, 0.625, 0.4375, 0.25]  # the skipped step did not advance the ramp
    assert layer.training_capacity() == 0.25 and int(layer.anneal.step) == 5
    # the routed share follows: top-k at the ramp's capacity
    x = torch.randint(0, 64, (2, 40))
    out = model(x, x)
    assert out.stats["layer1/mod_routed_frac"] == pytest.approx(capacity_tokens(0.25, 40) / 40)


def test_the_clock_is_saved_and_restored_with_the_weights():
    a = _model(anneal_steps=10)
    for _ in range(3):
        before_optimizer_step(a)
    b = _model(anneal_steps=10)
    b.load_state_dict(a.state_dict())
    assert int(b.layers[1].anneal) == 3 and b.layers[1].training_capacity() == a.layers[1].training_capacity()
    # a model without annealing has no clock: its checkpoints keep the key set they always had
    assert not any("anneal" in k for k in _model().state_dict())


def test_step_counter_and_ramp():
    c = StepCounter()
    c.before_optimizer_step()
    c.before_optimizer_step(skip=True)
    assert int(c) == 1 and int(c.step) == 1
    assert linear_ramp(1.0, 0.5, 0, 10) == 1.0 and linear_ramp(1.0, 0.5, 5, 10) == 0.75
    assert linear_ramp(1.0, 0.5, 50, 10) == 0.5 and linear_ramp(1.0, 0.5, 0, 0) == 0.5


def _threshold_model(seed=0, **mod):
    torch.manual_seed(seed)
    model = _model(causal_router="threshold", weighting="2sigmoid", router_input="normed", **mod).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_threshold_router_routes_everything_until_it_has_seen_a_boundary():
    model = _threshold_model(capacity=1.0).eval()
    layer = model.layers[1]
    assert layer.threshold.item() == float("-inf") and "layers.1.threshold" in model.state_dict()
    x = torch.randint(0, 64, (2, 24))
    assert model(x).stats["layer1/mod_routed_frac"] == 1.0
    model.train()
    model(x, x)  # capacity 1: every token chosen, no boundary, the threshold stays -inf
    assert layer.threshold.item() == float("-inf")


def test_threshold_tracks_the_top_k_boundary():
    model = _threshold_model(capacity=0.25, threshold_momentum=1.0).train()
    layer = model.layers[1]
    x = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    model(x, x)
    # the boundary of each row, by hand: midway between the 10th and the 11th largest router logit
    with torch.no_grad():
        h = model.embed(x)
        ctx = model.context(x)
        h = model.layers[0](h, ctx.for_layer(0))
        r = layer.router_logits(h).sort(dim=1, descending=True).values
    want = ((r[:, 9] + r[:, 10]) / 2).mean()
    torch.testing.assert_close(layer.threshold, want)
    # on the same text the causal decision routes about the capacity (exactly: each row's top 10 when rows agree)
    model.eval()
    frac = model(x).stats["layer1/mod_routed_frac"]
    assert 0.1 < float(frac) < 0.4
    # a smaller momentum moves it part of the way
    slow = _threshold_model(capacity=0.25, threshold_momentum=0.5).train()
    slow.load_state_dict({**model.state_dict(), "layers.1.threshold": torch.tensor(0.0, dtype=torch.float64)})
    slow(x, x)
    torch.testing.assert_close(slow.layers[1].threshold, want / 2)


@torch.no_grad()
def test_threshold_decisions_never_see_later_tokens():
    model = _threshold_model(capacity=0.5, threshold_momentum=1.0).train()
    g = torch.Generator().manual_seed(3)
    model(torch.randint(0, 64, (4, 32), generator=g), None)
    model.eval()
    x = torch.randint(0, 64, (2, 32), generator=g)
    base = model(x).logits
    changed = x.clone()
    changed[:, 12:] = torch.randint(0, 64, (2, 20), generator=g)
    out = model(changed).logits
    assert (out[:, :12] - base[:, :12]).abs().max() < 1e-12
    assert (out[:, 12:] - base[:, 12:]).abs().max() > 1e-6
    routed = model(x, trace=True).traces["layer1/mod_routed"]
    assert 0 < routed.float().mean() < 1  # the decisions really differ between tokens
