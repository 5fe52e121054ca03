"""Weight-decay parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from condformer.config import TrainConfig
from condformer.model import build_model
from condformer.optim import lr_at, make_optimizer, param_groups


class _HeadGain(nn.Module):
    """A per-head gain stored as (1, H, 1, 1): 4-D, yet not to be decayed."""

    no_weight_decay = ("gain",)

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, n_heads, 1, 1))
        self.proj = nn.Linear(4, 4)  # weight decayed, bias not


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra = _HeadGain(2)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize(("norm", "tie"), [("rmsnorm", True), ("layernorm", False)])
def test_param_groups(tiny_cfg, norm, tie):
    net = _Wrapped(build_model(tiny_cfg(norm=norm, tie_embeddings=tie, kind="encoder")))
    decay, no_decay = param_groups(net, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    all_params = list(net.parameters())  # unique: a tied weight appears once
    listed = decay["params"] + no_decay["params"]
    assert len(listed) == len(set(map(id, listed))), "a parameter is listed twice"
    assert _ids(listed) == _ids(all_params)
    # expected split, from names: 2-D weights decay; norm gains/biases, Linear biases, the head gain do not
    names = {id(p): n for n, p in net.named_parameters()}
    expected_no_decay = {id(p) for n, p in net.named_parameters()
                         if n.endswith(".bias") or n.endswith("extra.gain") or "norm." in n}
    assert _ids(no_decay["params"]) == expected_no_decay, sorted(names[i] for i in _ids(no_decay["params"]))
    assert all(p.dim() == 2 for p in decay["params"])
    assert _ids(decay["params"]) == {id(p) for p in all_params if p.dim() == 2}
    assert id(net.extra.gain) in _ids(no_decay["params"])
    assert id(net.extra.proj.weight) in _ids(decay["params"])
    assert id(net.model.embed.weight) in _ids(decay["params"])
    assert (id(net.model.head.weight) == id(net.model.embed.weight)) == tie
    assert id(net.model.head.weight) in _ids(decay["params"])
    if norm == "layernorm":
        assert id(net.model.final_norm.bias) in _ids(no_decay["params"])


def test_frozen_parameters_are_left_out(tiny_cfg):
    model = build_model(tiny_cfg())
    model.layers[0].block.attn.qkv.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    listed = _ids(groups[0]["params"] + groups[1]["params"])
    assert id(model.layers[0].block.attn.qkv.weight) not in listed
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}


def test_make_optimizer(tiny_cfg):
    model = build_model(tiny_cfg())
    cfg = TrainConfig(max_steps=10, lr=3e-4, beta1=0.8, beta2=0.9, weight_decay=0.05)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)


# -- schedule ------------------------------------------------------------------------------------
def _cosine_progress(v: float, lr: float, floor: float) -> float:
    """Invert floor + (lr - floor) * (1 + cos(pi * u)) / 2 for u in [0, 1]."""
    c = 2 * (v - floor) / (lr - floor) - 1
    return math.acos(max(-1.0, min(1.0, c))) / math.pi


@pytest.mark.parametrize(("warmup", "total", "ratio"), [(10, 100, 0.1), (1, 30, 0.0), (7, 8, 0.5), (25, 1000, 0.1)])
def test_lr_schedule(warmup, total, ratio):
    lr = 2e-3
    floor = lr * ratio
    cfg = TrainConfig(max_steps=total, lr=lr, warmup_steps=warmup, min_lr_ratio=ratio)
    values = [lr_at(s, cfg, total) for s in range(total)]  # the trainer runs steps 0 .. total - 1
    # linear warmup: step s (0-based) gets lr * (s + 1) / warmup, so step 0 = lr / warmup
    for s in range(warmup):
        assert values[s] == pytest.approx(lr * (s + 1) / warmup, rel=1e-12)
    assert values[0] == pytest.approx(lr / warmup, rel=1e-12)
    # the peak is reached at the end of warmup and never exceeded
    assert values[warmup - 1] == pytest.approx(lr, rel=1e-12)
    assert max(values) == pytest.approx(lr, rel=1e-12)
    # monotone non-increasing after warmup, down to lr * min_lr_ratio at the last step
    after = values[warmup - 1:]
    assert all(a >= b for a, b in pairwise(after))
    assert values[-1] == pytest.approx(floor, rel=1e-9, abs=1e-15)
    assert min(values[warmup:]) >= floor * (1 - 1e-12)
    # and the decay is a cosine: its phase advances by the same amount every step
    u = [_cosine_progress(v, lr, floor) for v in values[warmup:]]
    assert u[-1] == pytest.approx(1.0, abs=1e-6)
    steps = [b - a for a, b in pairwise(u)]
    if steps:
        assert max(steps) - min(steps) < 1e-5
        assert steps[0] > 0


def test_lr_without_warmup_starts_at_peak():
    cfg = TrainConfig(max_steps=50, lr=1e-3, warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 50) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(49, cfg, 50) == pytest.approx(1e-4, rel=1e-9)
    assert lr_at(60, cfg, 50) == pytest.approx(1e-4, rel=1e-9)  # past the end: stays at the floor


def test_lr_warmup_longer_than_training_is_clamped():
    cfg = TrainConfig(max_steps=5, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    values = [lr_at(s, cfg, 5) for s in range(5)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)  # reaches the peak...
    assert values[4] == pytest.approx(1e-4, rel=1e-9)  # ...and still ends at the floor
    assert lr_at(0, cfg, 1) == pytest.approx(1e-3, rel=1e-12)  # a single step runs at the peak
