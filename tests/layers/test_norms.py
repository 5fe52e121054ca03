"""RMSNorm and LayerNorm against their formulas in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condformer.layers.norms import LayerNorm, RMSNorm, make_norm
from condformer.model import build_model


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rmsnorm_matches_formula_float64(eps):
    norm = RMSNorm(32, eps).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, dtype=torch.float64))
    x = torch.randn(3, 5, 32, dtype=torch.float64) * torch.rand(3, 5, 1, dtype=torch.float64)  # varied scales
    ref = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


def test_rmsnorm_does_not_centre():
    norm = RMSNorm(8, 1e-12).double()
    x = torch.full((1, 8), 3.0, dtype=torch.float64)
    torch.testing.assert_close(norm(x), torch.ones(1, 8, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_layernorm_matches_formula_float64(eps):
    norm = LayerNorm(32, eps=eps).double()
    assert isinstance(norm, nn.LayerNorm)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, dtype=torch.float64))
        norm.bias.copy_(torch.randn(32, dtype=torch.float64))
    x = torch.randn(3, 5, 32, dtype=torch.float64) * 4 + 1
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance
    ref = (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


def test_make_norm():
    r = make_norm("rmsnorm", 16, 1e-3)
    assert type(r) is RMSNorm and r.eps == 1e-3 and r.weight.shape == (16,)
    ln = make_norm("layernorm", 16, 1e-4)
    assert type(ln) is LayerNorm and ln.eps == 1e-4 and ln.bias.shape == (16,)
    with pytest.raises(ValueError):
        make_norm("batchnorm", 16, 1e-5)


def test_norm_gains_are_tagged_no_weight_decay():
    assert set(RMSNorm.no_weight_decay) == {"weight"}
    assert set(LayerNorm.no_weight_decay) == {"weight", "bias"}


@pytest.mark.parametrize(("norm", "cls"), [("rmsnorm", RMSNorm), ("layernorm", LayerNorm)])
def test_model_uses_configured_norm_and_eps(tiny_cfg, norm, cls):
    model = build_model(tiny_cfg(norm=norm, norm_eps=1e-3, kind="encoder"))
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))]
    # 2 per layer, the final norm, the MLM head's norm
    assert len(norms) == 2 * 2 + 1 + 1
    assert all(type(m) is cls and m.eps == 1e-3 for m in norms)
