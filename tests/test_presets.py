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
    assert report.non_embedding_params == n - cfg.vocab_size * cfg.d_model
    if name in SIZES:
        assert n == _dense_param_count(cfg.n_layers, cfg.d_model, cfg.vocab_size)
