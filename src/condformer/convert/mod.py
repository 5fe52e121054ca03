"""``--to mod``: router tuning, Mixture-of-Depths routers added to chosen layers of a pretrained model.

Each chosen layer gets a router whose weight starts at zero under the ``2sigmoid`` weighting (g = 2 sigmoid(r)
= 1 at r = 0), reading the RMS-normalised state (a pretrained residual stream's own scale would otherwise set
the router's effective learning rate), so a routed token's update is exactly the pretrained layer's; training
capacity is annealed from 1 (every token: the pretrained model) to the target, so the router learns which
tokens matter before any is skipped. Inference's per-token decision is by default the ``threshold`` causal
router (the router's logit against a running top-k boundary, -inf until the capacity falls below 1): it
routes every token at conversion and follows the router from the first step. A ``predictor`` starts by
routing every token too (its output layer zero, its bias positive) but must learn its way down to the
capacity (measured on SmolLM2: still routing every token after 30 steps). At conversion the model's function
is unchanged in training and in evaluation, at any target capacity. ``--routed ffn`` routes only the FFN
(attention runs for every token): a pretrained model loses far less from a skipped FFN than from a skipped
block (measured per layer on SmolLM2, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import ConfigError

DEFAULT_LAYERS = "odd"
OPTIONS: dict[str, Any] = {"capacity": 0.5, "anneal_steps": 100, "causal_router": "threshold", "routed": "block"}
PREDICTOR_START_LOGIT = 3.0
"""The predictor's initial logit: every token routed (sigmoid 0.95: at capacity 1 every token is in the top-k)."""


def configure(cfg: ModelConfig, layers: list[int], o: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
    c = o["capacity"]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
        raise ConfigError(f"--capacity must be in (0, 1] (the share of each sequence's tokens a routed layer "
                          f"computes), got {c}")
    if o["causal_router"] not in ("threshold", "predictor", "aux"):
        raise ConfigError(f"--causal-router must be 'threshold', 'predictor' or 'aux', got {o['causal_router']!r}")
    if o["routed"] not in ("block", "ffn"):
        raise ConfigError(f"--routed must be 'block' (attention and FFN) or 'ffn' (the FFN only), got {o['routed']!r}")
    specs = cfg.layer_specs()
    for i in layers:
        if specs[i].router != "dense":
            raise ConfigError(f"layer {i} already has the router '{specs[i].router}'; choose --layers without it")
        specs[i] = LayerSpec(block=specs[i].block, router="mod", ffn=specs[i].ffn,
                             options={**specs[i].options, "capacity": float(c), "weighting": "2sigmoid",
                                      "causal_router": o["causal_router"], "anneal_steps": int(o["anneal_steps"]),
                                      "router_input": "normed", "routed": o["routed"]})
    notes = []
    if o["causal_router"] == "aux":
        notes.append("causal_router 'aux': inference routes a token when its router logit is > 0, and the "
                     "zero-initialised router routes none until trained, so evaluation differs from the source model "
                     "at conversion")
    return dataclasses.replace(cfg, layers=specs), notes


@torch.no_grad()
def initialise(model: torch.nn.Module, source: dict[str, torch.Tensor], cfg: ModelConfig, layers: list[int],
               o: dict[str, Any]) -> None:
    for i in layers:
        layer = model.layers[i]
        layer.router.weight.zero_()
        if layer.predictor is not None:
            out = layer.predictor[-1]
            out.weight.zero_()
            out.bias.fill_(PREDICTOR_START_LOGIT)
