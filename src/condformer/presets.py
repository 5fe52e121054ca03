"""Named model configurations.

Sizes: ``tiny`` (4 x 128), ``small`` (6 x 256), ``medium`` (8 x 512), ``gpt2-small`` (12 x 768). Each
technique adds ``<size>-<technique>`` variants whose dense twin is ``<size>`` (same d, layers, heads), so
every comparison is against a baseline of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig, every_other
from condformer.errors import ConfigError

SIZES: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=1024),
    "small": dict(d_model=256, n_layers=6, n_heads=4, max_seq_len=1024),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, max_seq_len=2048),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=2048),
}

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str, make: Callable[[], ModelConfig]) -> None:
    if name in _PRESETS:
        raise ValueError(f"preset '{name}' is registered twice")
    _PRESETS[name] = make


def presets() -> list[str]:
    """All preset names."""
    return list(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A fresh, validated :class:`ModelConfig` for the preset ``name``."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(_PRESETS)} (see `condformer presets`)")
    cfg = _PRESETS[name]()
    cfg.name = name
    return cfg.validate()



def _mod(dims: dict) -> ModelConfig:
    """Mixture-of-Depths (Raposo et al. 2024): c = 0.125 on every other block, causal predictor on."""
    routed = LayerSpec(router="mod", options={"capacity": 0.125, "causal_router": "predictor"})
    return ModelConfig(**dims, layers=every_other(routed))


# Switch Transformer's recipe (Fedus et al. 2021): experts on every other FFN, capacity 1.25 in training,
# Switch balance loss 1e-2 and ST-MoE's z-loss 1e-3; evaluation and generation are dropless.
_MOE = {"experts": 8, "capacity_factor": 1.25, "balance_coef": 0.01, "z_coef": 0.001}


def _moe(dims: dict, **options) -> ModelConfig:
    """Mixture-of-Experts FFN on every other layer (Switch, GShard); the attention stays dense."""
    return ModelConfig(**dims, layers=every_other(LayerSpec(ffn="moe", options={**_MOE, **options})))


def _mode_staged(dims: dict) -> ModelConfig:
    """Staged MoDE: a MoD router (c = 0.125, causal predictor) before a block whose FFN is top-2 of 8 experts."""
    routed = LayerSpec(router="mod", ffn="moe", options={"capacity": 0.125, "causal_router": "predictor",
                                                         **_MOE, "top_k": 2})
    return ModelConfig(**dims, layers=every_other(routed))


def _altup(dims: dict, variant: str) -> ModelConfig:
    """AltUp (Baykal et al. 2023) with K = 2 blocks, alternating schedule, the paper's scalar coefficients.

    ``standard``: a 2d-wide embedding tied to a 2d-wide head over the concatenated blocks.
    ``recycled``: the d-wide embedding replicated, blocks averaged back to d for the tied d-wide head.
    """
    return ModelConfig(**dims, altup=AltUpConfig(k=2, variant=variant))


def _exit(dims: dict) -> ModelConfig:
    """Depth-adaptive (Elbayad et al. 2020; LayerSkip's shared head): an exit after every layer, one shared
    LM head with a norm per exit, aligned training with uniform weights, softmax-confidence exits whose
    thresholds ``condformer calibrate`` sets (until then: full depth)."""
    return ModelConfig(**dims, exits=ExitConfig())


def _blocks(dims: dict, block: str, kind: str = "decoder") -> ModelConfig:
    """Every layer the same block type (He & Hofmann 2024): parallel, sas or sasp; encoders for BERT-style MLM.

    Shaped blocks keep a trainable value matrix (W_V = I + W, W zero at init) in layer 0 only, as the
    official SAS/SAS-P configuration does: with identity values everywhere, the first layer's attention
    could only mix each head's own slice of the embeddings (measured on tiny: 2.436 vs 2.482 validation
    loss after 200 steps)."""
    if block not in ("sas", "sasp"):
        return ModelConfig(**dims, kind=kind, layers=[LayerSpec(block=block)])
    rest = [LayerSpec(block=block)] * (dims["n_layers"] - 1)
    return ModelConfig(**dims, kind=kind, layers=[LayerSpec(block=block, options={"value_matrix": True}), *rest])


for _size, _dims in SIZES.items():
    register_preset(_size, lambda d=_dims: ModelConfig(**d))
    for _block in ("parallel", "sas", "sasp"):
        register_preset(f"{_size}-{_block}", lambda d=_dims, b=_block: _blocks(d, b))
    register_preset(f"{_size}-bert", lambda d=_dims: _blocks(d, "preln", "encoder"))
    register_preset(f"{_size}-bert-sasp", lambda d=_dims: _blocks(d, "sasp", "encoder"))
    register_preset(f"{_size}-mod", lambda d=_dims: _mod(d))
    register_preset(f"{_size}-moe", lambda d=_dims: _moe(d, top_k=2))
    register_preset(f"{_size}-switch", lambda d=_dims: _moe(d, moe_router="switch"))
    # integrated MoDE (Raposo et al. 2024): 8 no-op experts beside the 8 real ones in one top-2 router;
    # balanced routing sends half the choices to no-ops, which skip the FFN at zero FLOPs
    register_preset(f"{_size}-mode", lambda d=_dims: _moe(d, top_k=2, null_experts=8))
    register_preset(f"{_size}-mode-staged", lambda d=_dims: _mode_staged(d))
    register_preset(f"{_size}-altup", lambda d=_dims: _altup(d, "standard"))
    register_preset(f"{_size}-raltup", lambda d=_dims: _altup(d, "recycled"))
    register_preset(f"{_size}-exit", lambda d=_dims: _exit(d))


def technique_presets(size: str) -> dict[str, str]:
    """{technique: preset name} of the decoder variants of ``size``, ``dense`` (the size itself) first.

    A technique is what follows ``<size>-`` in a preset name (``small-mod`` -> ``mod``), in registration order.
    Encoders (``-bert``, ``-bert-sasp``) are left out: their dense twin is not the decoder ``<size>``, so they are
    no technique to measure against it. Derived from the registry so that ``condformer compare`` never keeps a
    second list of techniques that could drift from the presets that exist.
    """
    if size not in SIZES:
        raise ConfigError(f"unknown size '{size}'; choose one of: {', '.join(SIZES)}")
    # a longer size that extends this one ("gpt2" vs a hypothetical "gpt2-small") owns its own names
    longer = [s for s in SIZES if s.startswith(f"{size}-")]
    out = {"dense": size}
    for name in _PRESETS:
        if not name.startswith(f"{size}-") or any(name == s or name.startswith(f"{s}-") for s in longer):
            continue
        if preset(name).causal:
            out[name[len(size) + 1:]] = name
    return out
