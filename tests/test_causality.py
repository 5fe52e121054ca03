"""A decoder never sees the future: in eval mode, logits before t do not change when tokens from t on change.

One grid over every decoder setting that decides something per token (blocks, MoD routers and their causal
eval decisions, every MoE router, MoDE, AltUp streams, confidence exits, every halting kind), each with its
parameters perturbed away from the identity initialisations (zero-init queries, identity AltUp coefficients,
small routers) so that routers make sharp, input-dependent decisions. Controls: settings that are known to
be non-causal (MoD's top-k at evaluation, expert choice, evaluation capacity, sequence halting pooled over
the whole sequence) fail the same check, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig
from condformer.exits import halting
from condformer.exits.halting import confidence
from condformer.exits.heads import set_exit_thresholds
from condformer.model import build_model

V, D, L, B, T = 64, 32, 4, 3, 20
CUTS = (1, 7, 14)  # tokens from t on are redrawn; logits before t must stay

MOD = {"capacity": 0.25}
MOE = {"experts": 4, "top_k": 2, "capacity_factor": 1.0}  # training capacity; evaluation is dropless
ROUTED = LayerSpec(router="mod", options=MOD)


def _layers(*specs: LayerSpec) -> list[LayerSpec]:
    return list(specs)


# name -> (ModelConfig kwargs, confidence thresholds wanted)
CASES: dict[str, tuple[dict, bool]] = {
    "preln": ({}, False),
    "parallel": (dict(layers=_layers(LayerSpec(block="parallel"))), False),
    "sas": (dict(layers=_layers(LayerSpec(block="sas", options={"value_matrix": True}), LayerSpec(block="sas"))),
            False),
    "sasp": (dict(layers=_layers(LayerSpec(block="sasp"))), False),
    "mod_predictor": (dict(layers=_layers(LayerSpec(), ROUTED)), False),
    "mod_aux": (dict(layers=_layers(LayerSpec(), LayerSpec(router="mod", options={**MOD, "causal_router": "aux"}))),
                False),
    "mod_converted": (dict(layers=_layers(LayerSpec(), LayerSpec(router="mod", options={
        **MOD, "weighting": "2sigmoid", "router_input": "normed", "anneal_steps": 10}))), False),
    "mod_ffn": (dict(layers=_layers(LayerSpec(), LayerSpec(router="mod", options={
        **MOD, "routed": "ffn", "causal_router": "threshold"}))), False),
    "mod_ffn_parallel": (dict(layers=_layers(LayerSpec(block="parallel", router="mod", options={
        **MOD, "routed": "ffn"}))), False),
    "mod_sasp": (dict(layers=_layers(LayerSpec(block="sasp", router="mod", options=MOD))), False),
    **{f"moe_{name}": (dict(layers=_layers(LayerSpec(), LayerSpec(ffn="moe", options={**MOE, **opts}))), False)
       for name, opts in {
           "topk": {}, "switch": {"moe_router": "switch", "top_k": 1}, "noisy_topk": {"moe_router": "noisy_topk"},
           "hash": {"moe_router": "hash", "top_k": 1}, "lsh": {"moe_router": "lsh", "top_k": 1},
           "soft": {"moe_router": "soft"}, "null_experts": {"null_experts": 2}, "shared": {"shared_experts": 1},
           "dropless_train": {"capacity_factor": None}}.items()},
    "mode_staged": (dict(layers=_layers(LayerSpec(router="mod", ffn="moe", options={**MOD, **MOE}))), False),
    "altup": (dict(altup=AltUpConfig(k=2), tie_embeddings=True), False),
    "raltup": (dict(altup=AltUpConfig(k=2, variant="recycled")), False),
    "altup_gemma_mod_moe": (dict(altup=AltUpConfig(k=2, coefficients="gemma", layer_input="prediction"),
                                 layers=_layers(ROUTED, LayerSpec(ffn="moe", options=MOE))),
                            False),
    "exit_softmax": (dict(exits=ExitConfig()), True),
    "exit_gap_mod": (dict(exits=ExitConfig(confidence="gap"), layers=_layers(LayerSpec(), ROUTED)), True),
    "exit_cosine_moe": (dict(exits=ExitConfig(confidence="cosine", head="separate"),
                             layers=_layers(LayerSpec(ffn="moe", options=MOE))), True),
    "halting_sequence": (dict(exits=ExitConfig(halting="sequence")), False),
    "halting_token": (dict(exits=ExitConfig(halting="token", layers=[0, 2])), False),
    "halting_geometric": (dict(exits=ExitConfig(halting="geometric")), False),
}

CONTROLS: dict[str, dict] = {
    "mod_topk_eval": dict(layers=_layers(LayerSpec(), LayerSpec(router="mod",
                                                                options={**MOD, "eval_routing": "topk"}))),
    "moe_expert_choice": dict(layers=_layers(LayerSpec(ffn="moe", options={
        **MOE, "moe_router": "expert_choice", "allow_noncausal": True}))),
    "moe_eval_capacity": dict(layers=_layers(LayerSpec(ffn="moe", options={
        **MOE, "eval_capacity_factor": 0.5, "allow_noncausal": True}))),
    "moe_sequence_granularity": dict(layers=_layers(LayerSpec(ffn="moe", options={
        **MOE, "granularity": "sequence", "allow_noncausal": True}))),
}


@torch.no_grad()
def _model(seed: int, **kw) -> torch.nn.Module:
    """A float64 eval-mode model with every parameter moved well away from its initialisation."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=D, n_layers=L, n_heads=2, max_seq_len=64, vocab_size=V, d_ff=64, **kw)
    model = build_model(cfg).double().eval()
    for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p))
    if model.exits is not None and model.exits.halting is not None:
        model.exits.halting.weight.normal_(0.0, 2.0)  # spread-out halting logits: depths differ by token
    return model


@torch.no_grad()
def _median_thresholds(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """Confidence thresholds at each exit's median full-depth confidence, so that about half the tokens stop."""
    ex = model.exits
    ctx = model._context(tokens, None, None, None)
    h = model.embed(tokens)
    thresholds = []
    for i, layer in enumerate(model.layers):
        h_prev, h = h, layer(h, ctx.for_layer(i))
        k = ex.exit_of_layer.get(i)
        if k is not None and k < ex.n_exits - 1:
            logits = model.exit_heads().logits(k, h)
            thresholds.append(float(confidence(ex.spec.confidence, logits, h, h_prev).median()))
    set_exit_thresholds(model, thresholds)


@torch.no_grad()
def _max_leak(model: torch.nn.Module, seed: int) -> tuple[float, float]:
    """(the largest change of logits before t, the smallest largest change from t on) over the cuts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    base = model(tokens).logits
    leak, moved = 0.0, float("inf")
    for t in CUTS:
        for _ in range(2):
            changed = tokens.clone()
            changed[:, t:] = torch.randint(0, V, (B, T - t), generator=g)
            out = model(changed).logits
            leak = max(leak, float((out[:, :t] - base[:, :t]).abs().max()))
            moved = min(moved, float((out[:, t:] - base[:, t:]).abs().max()))
    return leak, moved


@pytest.mark.parametrize("case", list(CASES))
def test_eval_logits_never_depend_on_later_tokens(case: str) -> None:
    kw, thresholds = CASES[case]
    model = _model(0, **kw)
    if thresholds:
        _median_thresholds(model, torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5)))
    if model.exits is not None:  # the exits really decide: depths differ between tokens
        depths = model(torch.randint(0, V, (B, T)), trace=True).traces["exit_depth"]
        assert len(set(depths.flatten().tolist())) >= 2, depths
    leak, moved = _max_leak(model, 1)
    assert leak <= 1e-10, f"{case}: logits before t moved by {leak:.3g}"
    assert moved > 1e-6  # the later tokens did reach the later logits


@pytest.mark.parametrize("case", list(CONTROLS))
def test_noncausal_controls_fail_the_check(case: str) -> None:
    leak, _ = _max_leak(_model(0, **CONTROLS[case]), 1)
    assert leak > 1e-6, f"{case} should leak the future"


def test_sequence_halting_pooled_over_the_whole_sequence_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the halting kind that used to leak: pool over all T tokens (the old code) and it shows."""
    model = _model(0, exits=ExitConfig(halting="sequence"))
    assert _max_leak(model, 1)[0] <= 1e-10

    def whole_sequence_mean(x_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
        return x_BTD.mean(dim=1, keepdim=True).expand_as(x_BTD)

    monkeypatch.setattr(halting, "prefix_mean", whole_sequence_mean)
    assert _max_leak(model, 1)[0] > 1e-6
