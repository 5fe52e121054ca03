"""``--to moe``: sparse upcycling (Komatsuzaki et al. 2023), each chosen FFN copied into E experts.

Every expert starts as the pretrained MLP and a new router (random, small) picks top-k of them; with the
gates renormalised over the k chosen (Mixtral's rule, k >= 2) the output is sum_k g_k MLP(x) = MLP(x), the
dense model's, whatever the router chose. Training then lets the copies specialise.

**Finer experts** (``split`` G > 1): each copy of the MLP is cut into G slices of d_ff / G hidden units
(slice g of every projection); an expert is one slice with its down projection scaled by G. The router
starts with *virtual groups* (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"):
the G slices of one copy share one router row, so they tie, and top-k with k = m G picks whole copies; the
renormalised gates are then p_j / (G sum p) per slice, and sum_j sum_g (p_j / (G sum p)) G slice_g(x) =
MLP(x) exactly. Routing is dropless (no capacity), as the exactness and honest evaluation need.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import ConfigError

DEFAULT_LAYERS = "all"
OPTIONS: dict[str, Any] = {"experts": 8, "top_k": 2, "split": 1, "capacity_factor": None, "balance_coef": 0.01}


def configure(cfg: ModelConfig, layers: list[int], o: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
    E, k, G = o["experts"], o["top_k"], o["split"]
    for name, v in (("--experts", E), ("--top-k", k), ("--split", G)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if cfg.mlp_bias:
        raise ConfigError("this model's MLPs have biases and condformer's experts have none; upcycling it would "
                          "change its function (GPT-2-style models cannot be upcycled)")
    if E % G or k % G:
        raise ConfigError(f"--experts ({E}) and --top-k ({k}) must be multiples of --split ({G}): an expert is "
                          f"1/{G} of the FFN, and a token needs whole copies of it")
    if cfg.ffn_dim % G:
        raise ConfigError(f"--split {G} must divide the FFN width ({cfg.ffn_dim})")
    if k > E:
        raise ConfigError(f"--top-k ({k}) exceeds --experts ({E})")
    specs = cfg.layer_specs()
    for i in layers:
        if specs[i].ffn != "mlp":
            raise ConfigError(f"layer {i}'s FFN is '{specs[i].ffn}', not an MLP; choose --layers without it")
        specs[i] = LayerSpec(block=specs[i].block, router=specs[i].router, ffn="moe",
                             options={**specs[i].options, "experts": E, "top_k": k, "moe_router": "topk",
                                      "renormalize": True, "capacity_factor": o["capacity_factor"],
                                      "expert_dim": None if G == 1 else cfg.ffn_dim // G,
                                      "balance_coef": float(o["balance_coef"])})
    notes = []
    if k == 1:
        notes.append("top-1 gates are not renormalised (that would cut the router off from the loss), so the upcycled "
                     "layer outputs p x MLP(x) at conversion, not MLP(x); use --top-k >= 2 to keep the function")
    if o["capacity_factor"] is not None:
        notes.append(f"capacity factor {o['capacity_factor']} in training: tokens over capacity lose their expert "
                     f"(evaluation stays dropless)")
    return dataclasses.replace(cfg, layers=specs), notes


@torch.no_grad()
def initialise(model: torch.nn.Module, source: dict[str, torch.Tensor], cfg: ModelConfig, layers: list[int],
               o: dict[str, Any]) -> None:
    G = o["split"]
    f, swiglu = cfg.ffn_dim, cfg.mlp == "swiglu"
    fe = f // G
    for i in layers:
        prefix = f"layers.{i}.block.ffn."
        up, down = source[prefix + "up.weight"], source[prefix + "down.weight"]  # (2f or f, d), (d, f)
        ffn = model.get_submodule(prefix[:-1])
        E = ffn.n_experts
        for e in range(E):
            g = e % G  # expert e = copy e // G, slice e % G
            rows = slice(g * fe, (g + 1) * fe)
            w_up = torch.cat([up[rows], up[f:][rows]]) if swiglu else up[rows]
            ffn.bank.w_up[e].copy_(w_up.T)
            ffn.bank.w_down[e].copy_(down[:, rows].T * G)
        if G > 1:  # virtual groups: the slices of one copy share a router row, so top-k picks whole copies
            w = ffn.router.weight
            w.copy_(w[::G].repeat_interleave(G, dim=0))
