"""MoD ``routed: ffn``: attention for every token, the FFN only for the router's choice (float64 references).

The reference is written out per row: a = attention over every token; h = x + a; r = w . h; the chosen
tokens (top-k of r, or the causal decision) get h + g(r) * FFN(norm(h)) (a parallel block's FFN reads
norm(x)); every other token leaves the layer as h. Plus: identity at conversion, causality, cached decoding ==
the full forward with every token's keys in the cache, the FLOP count, and the refusal for skipless blocks.
"""

from __future__ import annotations

import pytest
import torch

from condformer.config import LayerSpec, every_other
from condformer.context import Context, Tally
from condformer.flops import layer_forward_flops
from condformer.generation import SamplingConfig, generate
from condformer.model import build_layer, build_model
from condformer.registry import FFNS
from condformer.routing.mod import MoDRouter, capacity_tokens, set_eval_routing
from helpers import decode_with_cache, naive_greedy

D = 32
V = 260


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _cfg(tiny_cfg, block: str = "preln", n_layers: int = 2, **options):
    return tiny_cfg(n_layers=n_layers, init_std=0.3,
                    layers=every_other(LayerSpec(block=block, router="mod", options={"routed": "ffn", **options})))


def _layer(tiny_cfg, block: str = "preln", **options) -> MoDRouter:
    layer = build_layer(_cfg(tiny_cfg, block, **options).validate(), 1).double()
    assert isinstance(layer, MoDRouter) and layer.routed == "ffn"
    return layer


def _reference(layer: MoDRouter, x: torch.Tensor, pos: torch.Tensor, chosen_BT: torch.Tensor, gate) -> torch.Tensor:
    """Row by row, the FFN applied to the chosen tokens only, attention over every token of the row."""
    blk = layer.block
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        ctx = Context(positions_BT=pos[b:b + 1], causal=True, contiguous=False)
        norm_in = blk.pre_attn_norm if hasattr(blk, "pre_attn_norm") else blk.norm
        a = blk.attn(norm_in(x[b:b + 1]), ctx)[0]
        h = x[b] + a
        out[b] = h
        idx = chosen_BT[b].nonzero().flatten()
        if len(idx):
            ffn_in = blk.pre_ffn_norm(h[idx]) if hasattr(blk, "pre_ffn_norm") else blk.norm(x[b, idx])
            sub = Context(positions_BT=pos[b:b + 1, idx], causal=True, contiguous=False)
            out[b, idx] = h[idx] + gate(layer.router_logits(h[None])[0, idx])[:, None] * blk.ffn(ffn_in[None], sub)[0]
    return out


@pytest.mark.parametrize("block", ["preln", "parallel"])
@pytest.mark.parametrize("mode", ["train", "eval_topk"])
def test_topk_layer_matches_reference(tiny_cfg, block, mode):
    layer = _layer(tiny_cfg, block, capacity=0.25, eval_routing="topk")
    layer.train(mode == "train")
    B, T = 3, 16
    k = capacity_tokens(0.25, T)
    x = torch.randn(B, T, D, dtype=torch.float64)
    pos = torch.arange(T)[None] + torch.tensor([[0], [3], [11]])
    ctx = Context(positions_BT=pos, causal=True, contiguous=False, tally=Tally(tracing=True))
    with torch.no_grad():
        y = layer(x, ctx)
        chosen = ctx.tally.traces["layer0/mod_routed"]
        # the chosen tokens are the top-k of the router's logits on the state after attention
        h_ref = _reference(layer, x, pos, torch.zeros(B, T, dtype=torch.bool), torch.sigmoid)
        r = layer.router_logits(h_ref)
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter(1, r.topk(k, dim=1).indices, True))
        expected = _reference(layer, x, pos, chosen, torch.sigmoid)
    assert chosen.sum(1).tolist() == [k] * B and len({tuple(row.tolist()) for row in chosen}) > 1
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # control: the skipped tokens did get attention (their output is not x) and did not get the FFN
    assert (y - x)[~chosen].abs().min() > 0
    whole = _reference(layer, x, pos, torch.ones(B, T, dtype=torch.bool), torch.sigmoid)
    assert (y - whole)[~chosen].abs().max() > 1e-3


def test_conversion_identity_zero_router_2sigmoid_capacity_one(tiny_cfg):
    """Capacity 1, g = 2 sigmoid(0) = 1: exactly the dense block; at capacity 0.5 the skipped FFNs change it."""
    cfg = _cfg(tiny_cfg, capacity=1.0, weighting="2sigmoid", router_input="normed").validate()
    layer = build_layer(cfg, 1).double().train()
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        y = layer(x, Context(positions_BT=pos, causal=True))
        dense = x + layer.block(x, Context(positions_BT=pos, causal=True))
        torch.testing.assert_close(y, dense, rtol=0, atol=1e-12)
        layer.capacity = 0.5
        assert (layer(x, Context(positions_BT=pos, causal=True)) - dense).abs().max() > 1e-3


def _mixed_model(tiny_cfg, causal_router: str, n_layers: int = 4):
    """Eval model whose causal decisions route about half the tokens (threshold or predictor bias at the median)."""
    model = build_model(_cfg(tiny_cfg, n_layers=n_layers, causal_router=causal_router)).double().eval()
    seen: dict[int, torch.Tensor] = {}
    mods = [m for m in model.layers if isinstance(m, MoDRouter)]
    with torch.no_grad():
        for m in mods:
            m.router.weight.normal_(std=1.0)
            if m.predictor is None:
                m.threshold.fill_(0.0)  # causal logit = the router's own, until its median is subtracted
            else:
                m.predictor[-1].weight.normal_(std=1.0)
        original = MoDRouter.causal_logits

        def record(self, x, r):
            out = original(self, x, r)
            seen[self.layer_index] = out
            return out

        for m in mods:  # layer by layer, so each median is taken on the inputs the calibrated layers below give
            MoDRouter.causal_logits = record
            try:
                model(torch.randint(0, V, (4, 24)))
            finally:
                MoDRouter.causal_logits = original
            med = seen[m.layer_index].median()
            if m.predictor is not None:
                m.predictor[-1].bias.sub_(med)
            else:
                m.threshold.add_(med)
    return model


def _assert_mixed(out, model) -> None:
    for i, m in enumerate(model.layers):
        if isinstance(m, MoDRouter):
            routed = out.traces[f"layer{i}/mod_routed"]
            assert routed.any() and not routed.all(), f"layer {i}: decisions not mixed, the test would prove nothing"


@pytest.mark.parametrize("causal_router", ["threshold", "predictor"])
@torch.no_grad()
def test_eval_routing_is_causal(tiny_cfg, causal_router):
    model = _mixed_model(tiny_cfg, causal_router)
    B, T = 2, 24
    tokens = torch.randint(0, V, (B, T))
    base = model(tokens, trace=True)
    _assert_mixed(base, model)
    for t in (0, 6, 13, 22):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, V, (B, T - t - 1))
        out = model(changed, trace=True)
        torch.testing.assert_close(out.logits[:, :t + 1], base.logits[:, :t + 1], rtol=0, atol=1e-12)
        assert (out.logits[:, t + 1:] - base.logits[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("causal_router", ["threshold", "predictor"])
@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
def test_cached_decoding_matches_full_forward_and_caches_every_token(tiny_cfg, causal_router, B):
    model = _mixed_model(tiny_cfg, causal_router)
    T, P = 20, 6
    tokens = torch.randint(0, V, (B, T))
    full = model(tokens, trace=True)
    _assert_mixed(full, model)
    cache = decode_with_cache(model, tokens, P, full.logits, atol=1e-10)
    for kv in cache.layers:  # every token is a key of every layer, routed or not
        assert kv.length == T and bool(kv.valid[:, :T].all())


def test_greedy_generate_matches_naive_loop(tiny_cfg):
    model = _mixed_model(tiny_cfg, "threshold")
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (4, 9)]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True))
    for p, row in zip(prompts, got, strict=True):
        assert row == naive_greedy(model, p, 8)


def test_topk_eval_is_not_causal_control(tiny_cfg):
    """Control for the causality test: top-k over the sequence does see later tokens."""
    model = _mixed_model(tiny_cfg, "threshold")
    set_eval_routing(model, "topk")
    tokens = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        base = model(tokens).logits
        changed = tokens.clone()
        changed[:, 12:] = torch.randint(0, V, (2, 12))
        assert (model(changed).logits[:, :12] - base[:, :12]).abs().max() > 1e-6


def test_flops_count_the_ffn_on_the_chosen_tokens_only(tiny_cfg):
    T = 32
    dense_cfg = tiny_cfg(n_layers=2).validate()
    routed_cfg = _cfg(tiny_cfg, capacity=0.25, causal_router="threshold").validate()
    spec = routed_cfg.layer_specs()[1]
    ffn = FFNS.get(spec.ffn)
    k = capacity_tokens(0.25, T)
    expected = layer_forward_flops(dense_cfg, 1, T) - ffn.flops(routed_cfg, spec, T) + ffn.flops(routed_cfg, spec, k) \
        + 2 * T * D
    assert layer_forward_flops(routed_cfg, 1, T) == expected
    assert layer_forward_flops(routed_cfg, 1, T) < layer_forward_flops(dense_cfg, 1, T)
