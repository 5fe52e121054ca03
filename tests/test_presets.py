"""Named presets: sizes, freshness, unknown names, and meta-device builds that agree with count_flops."""

from __future__ import annotations

import pytest
import torch

from condformer.config import LayerSpec
from condformer.errors import ConfigError
from condformer.flops import count_flops
from condformer.model import build_model
from condformer.presets import preset, presets

SIZES = {"tiny": (4, 128, 4), "small": (6, 256, 4), "medium": (8, 512, 8), "gpt2-small": (12, 768, 12)}


@pytest.mark.parametrize("name", list(SIZES))
def test_size_presets(name):
    assert name in presets()
    cfg = preset(name)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == SIZES[name]
    assert cfg.name == name
    assert cfg.kind == "decoder"
    assert [s.to_dict() for s in cfg.layer_specs()] == [LayerSpec().to_dict()] * cfg.n_layers


def test_preset_returns_a_fresh_copy():
    a = preset("tiny")
    a.n_layers = 99
    a.d_model = 7
    a.layers.append(LayerSpec(router="other"))
    a.layers[0].options["capacity"] = 0.5
    b = preset("tiny")
    assert (b.n_layers, b.d_model) == SIZES["tiny"][:2]
    assert b.layers == [LayerSpec()]
    assert b.layers[0].options == {}
    assert b is not a and b.layers is not a.layers


def test_unknown_preset_lists_available_names():
    with pytest.raises(ConfigError) as err:
        preset("huge")
    msg = str(err.value)
    assert "\n" not in msg
    assert "huge" in msg
    for name in presets():
        assert name in msg


def _dense_param_count(n_layers: int, d: int, vocab: int) -> int:
    """Independent parameter count of a dense Pre-LN RMSNorm GELU decoder with a tied head."""
    per_layer = 2 * d + 4 * d * d + 2 * d * 4 * d  # two norm gains, qkv + out, up + down
    return vocab * d + n_layers * per_layer + d


@pytest.mark.parametrize("name", presets())
def test_every_preset_builds_on_meta_and_matches_count_flops(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    n = sum(p.numel() for p in params)
    report = count_flops(cfg, 128)
    assert report.params == n
    assert report.non_embedding_params == n - cfg.vocab_size * cfg.embed_dim
    if name in SIZES:
        assert n == _dense_param_count(cfg.n_layers, cfg.d_model, cfg.vocab_size)


@pytest.mark.parametrize("size", list(SIZES))
def test_mod_presets_route_every_other_block_with_a_causal_predictor(size):
    mod, dense = preset(f"{size}-mod"), preset(size)
    assert (mod.n_layers, mod.d_model, mod.n_heads, mod.max_seq_len) == (dense.n_layers, dense.d_model,
                                                                         dense.n_heads, dense.max_seq_len)
    specs = mod.layer_specs()
    assert [s.router for s in specs] == ["dense", "mod"] * (mod.n_layers // 2)
    for s in specs[1::2]:
        assert s.options["capacity"] == 0.125 and s.options["causal_router"] == "predictor"
    # routed layers cost the block on 1/8 of the tokens plus the router and predictor
    T = 1024
    ratio = count_flops(mod, T).forward_flops / count_flops(dense, T).forward_flops
    assert 0.5 < ratio < 0.6


@pytest.mark.parametrize("size", list(SIZES))
def test_moe_presets_follow_the_switch_recipe(size):
    dense = preset(size)
    for name, k in ((f"{size}-moe", 2), (f"{size}-switch", 1), (f"{size}-mode", 2)):
        cfg = preset(name)
        assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.max_seq_len) == (dense.n_layers, dense.d_model,
                                                                             dense.n_heads, dense.max_seq_len)
        specs = cfg.layer_specs()
        assert [s.ffn for s in specs] == ["mlp", "moe"] * (cfg.n_layers // 2)
        assert [s.router for s in specs] == ["dense"] * cfg.n_layers
        o = specs[1].options
        assert o["experts"] == 8 and o["capacity_factor"] == 1.25
        assert o["balance_coef"] == 0.01 and o["z_coef"] == 0.001
        assert o.get("top_k", 1 if o.get("moe_router") == "switch" else None) == k
    assert preset(f"{size}-switch").layer_specs()[1].options["moe_router"] == "switch"
    assert preset(f"{size}-mode").layer_specs()[1].options["null_experts"] == 8
    staged = preset(f"{size}-mode-staged").layer_specs()[1]
    assert (staged.router, staged.ffn, staged.options["capacity"]) == ("mod", "moe", 0.125)
    # active FLOPs: switch ~ dense + router + capacity slack; top-2 about doubles the routed FFNs;
    # integrated MoDE halves top-2's expert work (half the choices go to no-ops)
    T = 512
    f = {n: count_flops(preset(n), T).forward_flops for n in (size, f"{size}-moe", f"{size}-switch", f"{size}-mode")}
    assert f[size] < f[f"{size}-switch"] < f[f"{size}-mode"] < f[f"{size}-moe"]
    assert f[f"{size}-switch"] < 1.15 * f[size]


@pytest.mark.parametrize("size", list(SIZES))
def test_altup_presets_widen_the_state_not_the_layers(size):
    dense, std, rec = preset(size), preset(f"{size}-altup"), preset(f"{size}-raltup")
    for cfg in (std, rec):
        assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.layers) == (dense.n_layers, dense.d_model,
                                                                         dense.n_heads, dense.layers)
        assert (cfg.altup.k, cfg.altup.schedule, cfg.altup.coefficients) == (2, "alternating", "scalar")
    assert (std.altup.variant, std.altup.reduction, std.embed_dim) == ("standard", "concat", 2 * dense.d_model)
    assert (rec.altup.variant, rec.altup.reduction, rec.embed_dim) == ("recycled", "mean", dense.d_model)
    d, L, V, T = dense.d_model, dense.n_layers, dense.vocab_size, 256
    n = {name: count_flops(preset(name), T).params for name in (size, f"{size}-altup", f"{size}-raltup")}
    assert n[f"{size}-raltup"] - n[size] == L * (2 * 2 + 2)  # K^2 + K scalars per layer
    # a wider embedding (its tied head too) and a 2d-wide final norm
    assert n[f"{size}-altup"] - n[size] == L * (2 * 2 + 2) + V * d + d
    f = {name: count_flops(preset(name), T).forward_flops for name in (size, f"{size}-altup", f"{size}-raltup")}
    predict_correct = L * T * (2 * 4 * d + 2 * 2 * d)
    assert f[f"{size}-raltup"] - f[size] == predict_correct
    assert f[f"{size}-altup"] - f[size] == predict_correct + 2 * T * d * V  # the 2d-wide head
