"""GELU MLP and SwiGLU against their formulas in float64; FFN sizes; GPT-2 scaled initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.layers.mlp import MLP
from condformer.model import build_model


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def test_gelu_mlp_matches_formula_float64(tiny_cfg):
    cfg = tiny_cfg(mlp="gelu")
    mlp = MLP(cfg, LayerSpec(), 0).double()
    f = 4 * 32
    assert mlp.up.weight.shape == (f, 32) and mlp.down.weight.shape == (32, f)
    with torch.no_grad():
        mlp.up.weight.mul_(10)  # larger pre-activations, so that GELU is far from linear
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ref = _gelu(x @ mlp.up.weight.T) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-14)


def test_swiglu_matches_formula_float64(tiny_cfg):
    cfg = tiny_cfg(mlp="swiglu")
    mlp = MLP(cfg, LayerSpec(), 0).double()
    f = cfg.ffn_dim
    assert mlp.up.weight.shape == (2 * f, 32) and mlp.down.weight.shape == (32, f)
    with torch.no_grad():
        mlp.up.weight.mul_(10)
    w_gate, w_up = mlp.up.weight[:f], mlp.up.weight[f:]
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ref = (_silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("d", [32, 48, 96, 128, 256, 512, 768, 1000])
def test_ffn_dim(d):
    swiglu = ModelConfig(d_model=d, n_heads=1 if d == 1000 else 4, mlp="swiglu")
    assert swiglu.ffn_dim == 64 * -(-8 * d // (3 * 64))  # integer ceil(8d/3/64)
    assert swiglu.ffn_dim % 64 == 0 and swiglu.ffn_dim >= 8 * d / 3
    assert ModelConfig(d_model=d, mlp="gelu").ffn_dim == 4 * d
    assert ModelConfig(d_model=d, mlp="swiglu", d_ff=123).ffn_dim == 123
    assert ModelConfig(d_model=d, mlp="gelu", d_ff=77).ffn_dim == 77


def test_ffn_dim_known_values():
    # worked by hand: 8*768/3 = 2048 exactly; 8*256/3 = 682.67 -> 704; 8*32/3 = 85.3 -> 128
    assert ModelConfig(d_model=768, mlp="swiglu").ffn_dim == 2048
    assert ModelConfig(d_model=256, mlp="swiglu").ffn_dim == 704
    assert ModelConfig(d_model=32, mlp="swiglu").ffn_dim == 128


def test_d_ff_is_used_by_the_module(tiny_cfg):
    mlp = MLP(tiny_cfg(d_ff=40, mlp="swiglu"), LayerSpec(), 0)
    assert mlp.up.weight.shape == (80, 32) and mlp.down.weight.shape == (32, 40)


@pytest.mark.parametrize(("n_layers", "init_std", "mlp"), [(8, 0.02, "gelu"), (2, 0.05, "swiglu")])
def test_gpt2_scaled_init(n_layers, init_std, mlp):
    cfg = ModelConfig(d_model=256, n_layers=n_layers, n_heads=4, max_seq_len=64, init_std=init_std, mlp=mlp)
    model = build_model(cfg)
    scaled = init_std / math.sqrt(2 * n_layers)

    def close(t: torch.Tensor, std: float) -> bool:
        return abs(t.std().item() - std) < 0.1 * std and abs(t.mean().item()) < 0.1 * std

    for layer in model.layers:
        block = layer.block
        assert close(block.attn.out.weight, scaled), block.attn.out.weight.std()
        assert close(block.ffn.down.weight, scaled), block.ffn.down.weight.std()
        assert close(block.attn.qkv.weight, init_std), block.attn.qkv.weight.std()
        assert close(block.ffn.up.weight, init_std), block.ffn.up.weight.std()
    assert close(model.embed.weight, init_std)
