"""LayerSkip's exit curricula: which exits aligned training computes at each step, and the loss over them."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import one_line_error

from condformer.config import ExitConfig, ModelConfig
from condformer.losses import lm_loss
from condformer.model import build_model
from condformer.optim import before_optimizer_step


def _model(**exits):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=6, d_model=32, n_heads=2, vocab_size=64,
                      exits=ExitConfig(layers=[0, 1, 2, 3, 4], **exits))
    return build_model(cfg)


def _schedule(model, steps):
    out = []
    for _ in range(steps):
        out.append(model.exits.training_exits())
        before_optimizer_step(model)
    return out


def test_rotating_exits():
    assert _schedule(_model(curriculum="rotating", curriculum_period=2), 3) == [[0, 2, 4, 5], [1, 3, 5], [0, 2, 4, 5]]
    assert _schedule(_model(), 2) == [[0, 1, 2, 3, 4, 5]] * 2  # no curriculum: every exit, every step


def test_gradual_exits_enable_from_the_deepest():
    got = _schedule(_model(curriculum="gradual", curriculum_steps=5), 7)
    assert got == [[4, 5], [3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5],
                   [0, 1, 2, 3, 4, 5]]


@torch.no_grad()
def test_the_objective_is_the_weighted_mean_over_the_active_exits():
    model = _model(curriculum="rotating", curriculum_period=2, weights="increasing").double().train()
    before_optimizer_step(model)  # step 1: exits 1, 3 and the last
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    out = model(x, y)
    model.eval()
    h = model.embed(x)
    ctx = model._context(x, None, None, None)
    losses = {}
    for i, layer in enumerate(model.layers):
        h = layer(h, ctx.for_layer(i))
        k = model.exits.exit_of_layer.get(i)
        if k in (1, 3, 5):
            losses[k] = lm_loss(model.exit_heads().logits(k, h), y)
    w = {1: 2.0, 3: 4.0, 5: 6.0}  # increasing: the exit's depth
    want = sum(w[k] * losses[k] for k in losses) / sum(w.values())
    torch.testing.assert_close(out.train_loss, want)


def test_curriculum_settings_are_checked():
    assert "curriculum_steps" in one_line_error(lambda: _model(curriculum="gradual"))
    assert "aligned" in one_line_error(lambda: _model(curriculum="rotating", training="mixed"))
    assert "unknown exits.curriculum" in one_line_error(lambda: _model(curriculum="sometimes"))
    assert "curriculum_period" in one_line_error(lambda: _model(curriculum="rotating", curriculum_period=0))
    assert not any("clock" in k for k in _model().state_dict())  # no curriculum: the old key set


@pytest.mark.parametrize("curriculum", ["rotating", "gradual"])
def test_curriculum_clock_resumes(curriculum):
    a = _model(curriculum=curriculum, curriculum_steps=4)
    _schedule(a, 3)
    b = _model(curriculum=curriculum, curriculum_steps=4)
    b.load_state_dict(a.state_dict())
    assert b.exits.training_exits() == a.exits.training_exits()
