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
