"""Mixture-of-Depths router against independent float64 references.

Each test recomputes what the router should do from first principles (r = x . w, top-k per row by plain
sorting, the block run on the chosen tokens alone at their original positions, BCE written out) and
compares; the spec's "Pitfalls" list (scaled or double-counted residual, positions 0..k-1, k-1 / k+1 / 0
tokens, aux targets of the first row only, non-causal decoding, no router gradient) each has a test here.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from condformer.cache import KVCache
from condformer.config import LayerSpec, every_other
from condformer.context import Context, Tally
from condformer.generation import SamplingConfig, generate, left_pad
from condformer.layers.blocks import PreLNBlock
from condformer.model import build_layer, build_model
from condformer.routing.mod import MoDRouter, capacity_tokens, set_eval_routing
from helpers import decode_with_cache, naive_greedy, one_line_error

D = 32
V = 260


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test draws the same random inputs however the suite is ordered or filtered."""
    torch.manual_seed(0)


# -- references ---------------------------------------------------------------------------------
def k_ref(c: float, T: int) -> int:
    """floor(c * T) in exact decimal arithmetic, at least 1 and at most T."""
    return min(T, max(1, math.floor(Fraction(str(c)) * T)))


def topk_ref(r_BT: torch.Tensor, k: int) -> list[list[int]]:
    """Per row: the k positions with the largest r, in increasing order (plain Python sort)."""
    rows = r_BT.tolist()
    return [sorted(sorted(range(len(row)), key=lambda t, row=row: -row[t])[:k]) for row in rows]


def membership(chosen: list[list[int]], T: int) -> torch.Tensor:
    m = torch.zeros(len(chosen), T, dtype=torch.bool)
    for b, c in enumerate(chosen):
        m[b, c] = True
    return m


def gate_ref(r: torch.Tensor, weighting: str) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-r)) if weighting == "sigmoid" else r


def router_logits_ref(layer: MoDRouter, x_BTD: torch.Tensor) -> torch.Tensor:
    return (x_BTD.double() @ layer.router.weight.detach().double().T)[..., 0]


def predictor_logits_ref(layer: MoDRouter, x_BTD: torch.Tensor) -> torch.Tensor:
    """The predictor MLP written out: W2 silu(W1 x + b1) + b2."""
    first, last = layer.predictor[0], layer.predictor[2]
    h = x_BTD.double() @ first.weight.detach().double().T + first.bias.detach().double()
    h = h / (1.0 + torch.exp(-h))
    return (h @ last.weight.detach().double().T + last.bias.detach().double())[..., 0]


def reference_layer(block: torch.nn.Module, r_BT: torch.Tensor, x_BTD: torch.Tensor, chosen: list[list[int]],
                    weighting: str, *, causal: bool = True, positions_BT: torch.Tensor | None = None,
                    compact: bool = False) -> torch.Tensor:
    """x' = x + g(r) * block(x[chosen]) on the chosen tokens only, one row at a time (no batching, no fillers).

    The block sees only the chosen tokens of its row, at their original positions (or, with ``compact``,
    at 0..k-1, the bug to rule out).
    """
    B, T, _ = x_BTD.shape
    pos = torch.arange(T).expand(B, T) if positions_BT is None else positions_BT
    out = x_BTD.clone()
    for b in range(B):
        if not chosen[b]:
            continue
        idx = torch.tensor(chosen[b], dtype=torch.long)
        p = torch.arange(len(idx)) if compact else pos[b, idx]
        delta = block(x_BTD[b:b + 1, idx], Context(positions_BT=p[None], causal=causal, contiguous=False))[0]
        out[b, idx] = x_BTD[b, idx] + gate_ref(r_BT[b, idx], weighting)[:, None] * delta
    return out


# -- builders -----------------------------------------------------------------------------------
def _cfg(tiny_cfg, n_layers: int = 2, kind: str = "decoder", init_std: float = 0.3, **options):
    """[dense, mod] repeated; init_std 0.3 gives peaked attention and well-spread router logits."""
    return tiny_cfg(n_layers=n_layers, kind=kind, init_std=init_std,
                    layers=every_other(LayerSpec(router="mod", options=options)))


def _mod_layer(tiny_cfg, kind: str = "decoder", **options) -> tuple[MoDRouter, PreLNBlock]:
    """A float64 MoD layer and an independent dense block holding the same weights."""
    cfg = _cfg(tiny_cfg, kind=kind, **options).validate()
    layer = build_layer(cfg, 1).double()
    assert isinstance(layer, MoDRouter)
    ref = PreLNBlock(cfg, cfg.layer_specs()[1], 1).double()
    ref.load_state_dict(layer.block.state_dict())
    return layer, ref


def _mod_layers(model) -> list[tuple[int, MoDRouter]]:
    return [(i, m) for i, m in enumerate(model.layers) if isinstance(m, MoDRouter)]


def _mixed_model(tiny_cfg, causal_router: str, n_layers: int = 4, **options):
    """A float64 eval model whose causal decisions are mixed: some tokens routed, some not.

    Router ("aux", "threshold") or predictor output weights get std 1; each predictor's bias is then set to minus
    the median of its logits on a calibration batch (layer by layer; "threshold": its threshold to the median
    router logit), so about half the tokens are routed.
    """
    model = build_model(_cfg(tiny_cfg, n_layers=n_layers, causal_router=causal_router, **options)).double().eval()
    calibration = _tokens(4, 24)
    with torch.no_grad():
        for _, m in _mod_layers(model):
            if m.predictor is None:
                m.router.weight.normal_(std=1.0)
                if m.causal_router == "threshold":  # the running boundary at the median router logit
                    seen = {}
                    hook = m.register_forward_pre_hook(lambda mod, args, seen=seen: seen.__setitem__("x", args[0]))
                    model(calibration)
                    hook.remove()
                    m.threshold.fill_(router_logits_ref(m, seen["x"]).median())
                continue
            m.predictor[-1].weight.normal_(std=1.0)
            seen: dict[str, torch.Tensor] = {}
            hook = m.register_forward_pre_hook(lambda mod, args, seen=seen: seen.__setitem__("x", args[0]))
            model(calibration)
            hook.remove()
            m.predictor[-1].bias.sub_(predictor_logits_ref(m, seen["x"]).median())
    return model


def _assert_mixed(out, model) -> None:
    for i, _ in _mod_layers(model):
        routed = out.traces[f"layer{i}/mod_routed"]
        assert routed.any() and not routed.all(), f"layer {i}: decisions not mixed, the test would prove nothing"


def _capture_inputs(model, layers) -> dict[int, torch.Tensor]:
    """Record each listed layer's input hidden states on every forward."""
    seen: dict[int, torch.Tensor] = {}
    for i in layers:
        model.layers[i].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
    return seen


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


# -- 1. capacity: exactly k tokens per sequence ------------------------------------------------
def test_capacity_tokens_matches_exact_decimal_floor():
    for i in range(1, 1001):
        c = i / 1000
        for T in range(1, 129):
            assert capacity_tokens(c, T) == k_ref(c, T), (c, T)


def test_capacity_tokens_edge_cases():
    assert [capacity_tokens(0.125, T) for T in (1, 2, 3, 7, 8, 15, 16, 17, 32)] == [1, 1, 1, 1, 1, 1, 2, 2, 4]
    assert capacity_tokens(0.3, 10) == 3
    # c * T lands just below an integer in binary floating point: floor must still give the decimal answer
    for c, T, k in ((0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.58, 100, 58), (0.7, 90, 63)):
        assert c * T < k
        assert capacity_tokens(c, T) == k
    assert capacity_tokens(1.0, 13) == 13
    assert capacity_tokens(1e-6, 5) == 1


@pytest.mark.parametrize("c", [0.125, 0.3, 0.5])
@pytest.mark.parametrize("T", [1, 2, 3, 7, 10, 17, 32])
def test_train_forward_routes_exactly_the_top_k_of_each_row(tiny_cfg, c, T):
    model = build_model(_cfg(tiny_cfg, capacity=c)).double().train()
    inputs = _capture_inputs(model, [1])
    block_inputs = []
    model.layers[1].block.register_forward_pre_hook(lambda mod, args: block_inputs.append(args[0].shape))
    B, k = 3, k_ref(c, T)
    with torch.no_grad():
        out = model(_tokens(B, T), trace=True)
    routed = out.traces["layer1/mod_routed"]
    assert routed.sum(dim=1).tolist() == [k] * B
    expected = membership(topk_ref(router_logits_ref(model.layers[1], inputs[1]), k), T)
    assert torch.equal(routed, expected)
    assert block_inputs == [(B, k, D)]  # gathered, not masked: the block computes on k tokens only
    assert float(out.stats["layer1/mod_routed_frac"]) == pytest.approx(k / T)


@pytest.mark.parametrize("mode", ["train", "eval_topk"])
@torch.no_grad()
def test_topk_never_routes_padding(tiny_cfg, mode):
    """With a validity mask, top-k picks among the real tokens of each row (k from the padded length)."""
    model = build_model(_cfg(tiny_cfg, capacity=0.25, eval_routing="topk")).double().train(mode == "train")
    model.layers[1].router.weight.normal_(std=1.0)
    inputs = _capture_inputs(model, [1])
    prompts = [_tokens(1, n)[0].tolist() for n in (16, 10, 5, 4)]
    tokens, positions, valid = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    out = model(tokens, positions_BT=positions, valid_BT=valid, trace=True)
    routed = out.traces["layer1/mod_routed"]
    r = router_logits_ref(model.layers[1], inputs[1]).masked_fill(~valid, -math.inf)
    assert torch.equal(routed, membership(topk_ref(r, 4), 16))
    assert not routed[~valid].any()


@pytest.mark.parametrize("mode", ["train", "eval_topk"])
@torch.no_grad()
def test_rows_shorter_than_k_route_no_padding_and_count_none(tiny_cfg, mode):
    """k = 8 slots, rows of 16, 3 and 1 real tokens: the short rows' spare slots hold padding, which gets no
    update (its state passes unchanged), is not traced as routed, and counts in no statistic."""
    layer, _ = _mod_layer(tiny_cfg, capacity=0.5, eval_routing="topk")
    layer.train(mode == "train")
    layer.router.weight.normal_(std=1.0)
    B, T = 3, 16
    valid = torch.stack([torch.arange(T) >= T - n for n in (16, 3, 1)])
    x = torch.randn(B, T, D, dtype=torch.float64)
    ctx = Context(positions_BT=(valid.cumsum(1) - 1).clamp(min=0), causal=True, valid_BT=valid,
                  tally=Tally(tracing=True), contiguous=False, layer=1)
    y = layer(x, ctx)
    routed = ctx.tally.traces["layer1/mod_routed"]
    assert not routed[~valid].any()
    assert routed.sum(dim=1).tolist() == [8, 3, 1]  # every real token of a short row is routed
    assert torch.equal(y[~valid], x[~valid])
    assert (y[valid] - x[valid]).abs().amax(dim=-1).gt(1e-6).sum() == 12  # the routed real tokens did change
    assert float(ctx.tally.stats["layer1/mod_routed_frac"]) == pytest.approx(12 / 20)
    if mode == "train":  # the causal decision's statistics are over the 20 real tokens
        pred = (layer.causal_logits(x, layer.router_logits(x)) > 0) & valid
        assert float(ctx.tally.stats["layer1/mod_causal_frac"]) == pytest.approx(int(pred.sum()) / 20)
        acc = int(((pred == routed) & valid).sum()) / 20
        assert float(ctx.tally.stats["layer1/mod_causal_acc"]) == pytest.approx(acc)
        assert float(ctx.tally.stats["layer1/mod_causal_recall"]) == pytest.approx(int((pred & routed).sum()) / 12)


# -- 2. capacity 1.0 is the dense block with a gated update -----------------------------------
@pytest.mark.parametrize("weighting", ["sigmoid", "raw"])
@pytest.mark.parametrize("mode", ["train", "eval_topk"])
def test_full_capacity_equals_gated_dense_block(tiny_cfg, weighting, mode):
    layer, ref = _mod_layer(tiny_cfg, capacity=1.0, weighting=weighting, eval_routing="topk")
    layer.train(mode == "train")
    B, T = 2, 13
    x = torch.randn(B, T, D, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        y = layer(x, Context(positions_BT=pos, causal=True))
        g = gate_ref(x @ layer.router.weight.T, weighting)  # (B, T, 1)
        delta = ref(x, Context(positions_BT=pos, causal=True))
    torch.testing.assert_close(y, x + g * delta, rtol=0, atol=1e-12)
    # the pitfalls give measurably different answers, so the comparison above can tell them apart
    assert (y - g * (x + delta)).abs().max() > 1e-3  # residual scaled by the router weight
    assert (y - (x + g * (x + delta))).abs().max() > 1e-3  # block output with x in it, added to x again


@pytest.mark.parametrize("capacity", [1.0, 0.5])
def test_raw_weighting_zero_router_leaves_every_token_unchanged(tiny_cfg, capacity):
    """x' = x + r * delta: with r == 0 the output is x exactly (a scaled residual would give 0)."""
    layer, _ = _mod_layer(tiny_cfg, capacity=capacity, weighting="raw")
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y = layer(x, Context(positions_BT=torch.arange(9).expand(2, 9), causal=True))
    assert torch.equal(y, x)


# -- 3 + 4. residual, gathered update, original positions --------------------------------------
def _positions(kind: str, B: int, T: int) -> tuple[torch.Tensor, bool]:
    if kind == "default":
        return torch.arange(T).expand(B, T), True
    return torch.arange(T)[None] + torch.tensor([[0], [5], [37]])[:B], False  # per-row offsets


@pytest.mark.parametrize("weighting", ["sigmoid", "raw"])
@pytest.mark.parametrize("positions", ["default", "offset"])
def test_topk_layer_matches_gather_reference(tiny_cfg, weighting, positions):
    layer, ref = _mod_layer(tiny_cfg, capacity=0.25, weighting=weighting)
    layer.train()
    B, T, k = 3, 16, 4
    x = torch.randn(B, T, D, dtype=torch.float64)
    pos, contiguous = _positions(positions, B, T)
    ctx = Context(positions_BT=pos, causal=True, contiguous=contiguous, tally=Tally(tracing=True))
    with torch.no_grad():
        y = layer(x, ctx)
        r = router_logits_ref(layer, x)
        chosen = topk_ref(r, k)
        expected = reference_layer(ref, r, x, chosen, weighting, positions_BT=pos)
    assert len({tuple(c) for c in chosen}) > 1  # rows choose differently
    assert torch.equal(ctx.tally.traces["layer0/mod_routed"], membership(chosen, T))
    unrouted = ~membership(chosen, T)
    assert torch.equal(y[unrouted], x[unrouted])  # not scaled, not touched: bit-identical
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_gathered_tokens_keep_their_original_positions(tiny_cfg):
    layer, ref = _mod_layer(tiny_cfg, capacity=0.25)
    layer.train()
    B, T = 3, 16
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x, Context(positions_BT=torch.arange(T).expand(B, T), causal=True))
        r = router_logits_ref(layer, x)
        chosen = topk_ref(r, 4)
        original = reference_layer(ref, r, x, chosen, "sigmoid")
        compact = reference_layer(ref, r, x, chosen, "sigmoid", compact=True)
    assert any(c != list(range(4)) for c in chosen)  # otherwise both position sets coincide
    torch.testing.assert_close(y, original, rtol=0, atol=1e-12)
    assert (y - compact).abs().max() > 1e-4  # positions 0..k-1 would give this instead


def _rows_with_counts(logit_fn, counts: list[int], T: int) -> torch.Tensor:
    """Random token vectors arranged so that row b has exactly counts[b] tokens with logit > 0."""
    pool = torch.randn(1, 8 * len(counts) * T, D, dtype=torch.float64)
    logit = logit_fn(pool)[0]
    pos, neg = pool[0, logit > 0], pool[0, logit <= 0]
    rows = []
    for n in counts:
        mask = torch.zeros(T, dtype=torch.bool)
        mask[torch.randperm(T)[:n]] = True
        row = torch.empty(T, D, dtype=torch.float64)
        row[mask], row[~mask] = pos[:n], neg[:T - n]
        pos, neg = pos[n:], neg[T - n:]
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("causal_router", ["predictor", "aux"])
@pytest.mark.parametrize("counts", [[5], [4, 9, 0]])
def test_causal_decision_layer_matches_per_row_reference(tiny_cfg, causal_router, counts):
    """Eval mode: tokens with causal logit > 0 get the block, among themselves only; rows of different
    counts (fillers, and a row that routes nothing) in a batch."""
    layer, ref = _mod_layer(tiny_cfg, causal_router=causal_router)
    layer.eval()
    with torch.no_grad():
        if layer.predictor is not None:  # centre the predictor so that both decisions are common
            layer.predictor[-1].bias.sub_(predictor_logits_ref(layer, torch.randn(1, 256, D)).median())

    def causal_logit(x: torch.Tensor) -> torch.Tensor:
        return predictor_logits_ref(layer, x) if causal_router == "predictor" else router_logits_ref(layer, x)

    B, T = len(counts), 12
    x = _rows_with_counts(causal_logit, counts, T)
    ctx = Context(positions_BT=torch.arange(T).expand(B, T), causal=True, tally=Tally(tracing=True))
    with torch.no_grad():
        y = layer(x, ctx)
        decide = causal_logit(x) > 0
        chosen = [row.nonzero().flatten().tolist() for row in decide]
        expected = reference_layer(ref, router_logits_ref(layer, x), x, chosen, "sigmoid")
    assert decide.sum(dim=1).tolist() == counts
    assert torch.equal(ctx.tally.traces["layer0/mod_routed"], decide)
    assert torch.equal(y[~decide], x[~decide])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


# -- 5. gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["sigmoid", "raw"])
def test_router_gets_the_lm_gradient_and_predictor_does_not(tiny_cfg, weighting):
    model = build_model(_cfg(tiny_cfg, n_layers=4, capacity=0.25, weighting=weighting)).double().train()
    tokens, targets = _tokens(2, 16), _tokens(2, 16)

    def lm_loss() -> torch.Tensor:  # float64 cross-entropy (Output.loss is float32: too coarse for differences)
        return F.cross_entropy(model(tokens).logits.flatten(0, 1), targets.flatten())

    lm_loss().backward()
    (_, a), (_, b) = _mod_layers(model)
    assert a.router.weight is not b.router.weight  # one router per routed layer
    for m in (a, b):
        g = m.router.weight.grad
        assert g is not None and g.abs().max() > 0
        assert all(p.grad is None for p in m.predictor.parameters())  # the LM loss never reaches the predictor
        # the gradient is the true derivative of the LM loss (central difference along a random direction)
        d, eps = torch.randn_like(g), 1e-6
        w0 = m.router.weight.detach().clone()
        with torch.no_grad():
            m.router.weight.copy_(w0 + eps * d)
            up = lm_loss()
            m.router.weight.copy_(w0 - eps * d)
            down = lm_loss()
            m.router.weight.copy_(w0)
        assert float((up - down) / (2 * eps)) == pytest.approx(float((g * d).sum()), rel=1e-5, abs=1e-9)
    assert not torch.allclose(a.router.weight.grad, b.router.weight.grad)


def test_predictor_bce_trains_only_the_predictor(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, n_layers=4, capacity=0.25, causal_router="predictor")).double().train()
    out = model(_tokens(2, 16), _tokens(2, 16))
    assert set(out.aux_losses) == {"mod_predictor_bce"}
    out.aux_losses["mod_predictor_bce"].backward()
    assert model.embed.weight.grad is None
    for name, p in model.named_parameters():
        if ".predictor." in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name  # stop-gradient: nothing reaches the backbone


def test_aux_bce_trains_router_and_backbone_below(tiny_cfg):
    """causal_router='aux': the BCE on the router's own logits reaches the router and the layers below it."""
    model = build_model(_cfg(tiny_cfg, n_layers=2, capacity=0.25, causal_router="aux")).double().train()
    out = model(_tokens(2, 16))
    assert set(out.aux_losses) == {"mod_aux_bce"}
    out.aux_losses["mod_aux_bce"].backward()
    mod = model.layers[1]
    assert mod.predictor is None
    assert mod.router.weight.grad.abs().max() > 0
    assert model.embed.weight.grad.abs().max() > 0
    assert all(p.grad.abs().max() > 0 for p in model.layers[0].parameters())
    assert all(p.grad is None for p in mod.block.parameters())  # r is computed before the block


# -- 6. aux targets and statistics, per row --------------------------------------------------------
@pytest.mark.parametrize("causal_router", ["aux", "predictor"])
def test_bce_targets_and_stats_are_built_per_row(tiny_cfg, causal_router):
    model = _mixed_model(tiny_cfg, causal_router, capacity=0.25, aux_coef=0.3, predictor_coef=0.7).train()
    inputs = _capture_inputs(model, [1, 3])
    B, T, k = 3, 16, 4
    with torch.no_grad():
        out = model(_tokens(B, T), trace=True)
    total = torch.zeros((), dtype=torch.float64)
    for i, m in _mod_layers(model):
        x = inputs[i]
        r = router_logits_ref(m, x)
        chosen = topk_ref(r, k)
        assert len({tuple(c) for c in chosen}) == B  # every row has its own top-k
        target = membership(chosen, T)
        assert torch.equal(out.traces[f"layer{i}/mod_routed"], target)
        logit = r if causal_router == "aux" else predictor_logits_ref(m, x)
        y = target.double()
        bce = (torch.clamp(logit, min=0) - logit * y + torch.log1p(torch.exp(-logit.abs()))).mean()
        torch.testing.assert_close(out.stats[f"layer{i}/mod_bce"].double(), bce, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(logit, y), rtol=1e-12, atol=0)
        total = total + bce
        pred = (logit > 0).flatten().tolist()
        true = target.flatten().tolist()
        assert 0 < sum(pred) < B * T  # mixed predictions: precision and recall are informative
        tp = sum(p and t for p, t in zip(pred, true, strict=True))
        stats = {
            "mod_causal_acc": sum(p == t for p, t in zip(pred, true, strict=True)) / (B * T),
            "mod_causal_precision": tp / sum(pred),
            "mod_causal_recall": tp / sum(true),
            "mod_causal_frac": sum(pred) / (B * T),
        }
        for name, value in stats.items():
            assert float(out.stats[f"layer{i}/{name}"]) == pytest.approx(value, rel=1e-6, abs=1e-7), name
    coef = 0.3 if causal_router == "aux" else 0.7
    name = f"mod_{causal_router}_bce"
    assert set(out.aux_losses) == {name}
    torch.testing.assert_close(out.aux_losses[name].double(), coef * total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss.double(), coef * total, rtol=1e-6, atol=1e-9)


def test_causal_router_none_adds_no_loss(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, causal_router="none", eval_routing="topk")).train()
    out = model(_tokens(2, 16), trace=True)
    assert out.aux_losses == {} and float(out.aux_loss) == 0.0
    assert "layer1/mod_bce" not in out.stats
    assert out.traces["layer1/mod_routed"].sum(1).tolist() == [2, 2]


# -- 7. eval-mode causality --------------------------------------------------------------------
@pytest.mark.parametrize("causal_router", ["predictor", "aux", "threshold"])
@torch.no_grad()
def test_eval_routing_is_causal(tiny_cfg, causal_router):
    model = _mixed_model(tiny_cfg, causal_router)
    B, T = 2, 24
    tokens = _tokens(B, T)
    base = model(tokens, trace=True)
    _assert_mixed(base, model)
    for t in (0, 5, 11, 17, 22):
        changed = tokens.clone()
        changed[:, t + 1:] = _tokens(B, T - t - 1)
        out = model(changed, trace=True)
        torch.testing.assert_close(out.logits[:, :t + 1], base.logits[:, :t + 1], rtol=0, atol=1e-12)
        for key, routed in base.traces.items():
            assert torch.equal(out.traces[key][:, :t + 1], routed[:, :t + 1]), key
        assert (out.logits[:, t + 1:] - base.logits[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["train", "eval_topk"])
@torch.no_grad()
def test_topk_routing_is_not_causal(tiny_cfg, mode):
    """Control: the check above detects a non-causal model (top-k depends on later tokens)."""
    model = _mixed_model(tiny_cfg, "predictor")
    if mode == "train":
        model.train()
    else:
        set_eval_routing(model, "topk")
    B, T, t = 2, 24, 11
    tokens = _tokens(B, T)
    base = model(tokens).logits
    leaks = []
    for _ in range(4):
        changed = tokens.clone()
        changed[:, t + 1:] = _tokens(B, T - t - 1)
        leaks.append(float((model(changed).logits[:, :t + 1] - base[:, :t + 1]).abs().max()))
    assert max(leaks) > 1e-6


# -- 8. cached generation ------------------------------------------------------------------------
@pytest.mark.parametrize("causal_router", ["predictor", "aux", "threshold"])
@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
def test_cached_decoding_matches_full_forward(tiny_cfg, causal_router, B):
    model = _mixed_model(tiny_cfg, causal_router)
    T, P = 20, 7
    tokens = _tokens(B, T)
    full = model(tokens, trace=True)
    _assert_mixed(full, model)
    cache = decode_with_cache(model, tokens, P, full.logits, atol=1e-10)
    assert cache.layers[0].length == T
    # a routed layer caches (as valid entries) exactly the tokens it routed, at their original positions
    for i, _ in _mod_layers(model):
        kv, routed = cache.layers[i], full.traces[f"layer{i}/mod_routed"]
        for b in range(B):
            stored = kv.pos[b, :kv.length][kv.valid[b, :kv.length]]
            assert sorted(stored.tolist()) == routed[b].nonzero().flatten().tolist()
        if B == 1:  # no fillers: a skipped token runs nothing and caches nothing
            assert kv.length == int(routed.sum()) < T


@pytest.mark.parametrize("causal_router", ["predictor", "aux", "threshold"])
@torch.no_grad()
def test_left_padded_batch_matches_each_prompt_alone(tiny_cfg, causal_router):
    model = _mixed_model(tiny_cfg, causal_router)
    prompts = [_tokens(1, n)[0].tolist() for n in (5, 9, 1, 6)]
    tokens, positions, valid = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    out = model(tokens, positions_BT=positions, valid_BT=valid, trace=True)
    _assert_mixed(out, model)
    for key, routed in out.traces.items():
        assert not routed[~valid].any(), key  # padding never gets the block
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p]), trace=True)
        torch.testing.assert_close(out.logits[b, -len(p):], alone.logits[0], rtol=0, atol=1e-10)
        for key, routed in alone.traces.items():
            assert torch.equal(out.traces[key][b, -len(p):], routed[0]), key


@pytest.mark.parametrize("causal_router", ["predictor", "aux", "threshold"])
def test_greedy_generate_matches_naive_loop(tiny_cfg, causal_router):
    model = _mixed_model(tiny_cfg, causal_router)
    prompts = [_tokens(1, n)[0].tolist() for n in (4, 11, 2)]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=10, greedy=True))
    assert not model.training
    for p, row in zip(prompts, got, strict=True):
        assert row == naive_greedy(model, p, 10)
    assert len({t for row in got for t in row}) > 3  # not degenerate


# -- 9. errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "train"), [
    ({"eval_routing": "topk"}, False),
    ({"eval_routing": "topk", "causal_router": "none"}, False),
    ({}, True),  # training always routes by top-k
])
def test_topk_routing_with_a_cache_raises(tiny_cfg, options, train):
    model = build_model(_cfg(tiny_cfg, **options)).train(train)
    cache = KVCache.for_model(model, 1, 8)
    msg = one_line_error(lambda: model(_tokens(1, 4), cache=cache))
    assert "top-k" in msg and "cache" in msg


@pytest.mark.parametrize("options", [
    {"capacity": 0}, {"capacity": 0.0}, {"capacity": -0.25}, {"capacity": 1.5}, {"capacity": "x"},
    {"capacity": None}, {"capacity": True}, {"weighting": "softmax"}, {"causal_router": "mlp"},
    {"eval_routing": "greedy"}, {"causal_router": "none"}, {"causal_router": "none", "eval_routing": "causal"},
    {"capacity_ratio": 0.5}, {"aux_coef": -1.0}, {"predictor_coef": "1"}, {"predictor_hidden": 0},
    {"predictor_hidden": 2.5},
])
def test_bad_options_raise_config_error_at_build(tiny_cfg, options):
    one_line_error(lambda: build_model(_cfg(tiny_cfg, **options)))


@pytest.mark.parametrize("options", [
    {"capacity": 1}, {"capacity": 1.0}, {"capacity": 1e-3}, {"weighting": "raw", "causal_router": "aux"},
    {"causal_router": "none", "eval_routing": "topk"}, {"predictor_hidden": 3, "aux_coef": 0},
])
def test_good_options_build(tiny_cfg, options):
    model = build_model(_cfg(tiny_cfg, **options))
    assert isinstance(model.layers[1], MoDRouter)
    if "predictor_hidden" in options:
        assert model.layers[1].predictor[0].out_features == 3


def test_set_eval_routing(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, n_layers=4, causal_router="none", eval_routing="topk"))
    one_line_error(lambda: set_eval_routing(model, "causal"))
    one_line_error(lambda: set_eval_routing(model, "random"))
    model = build_model(_cfg(tiny_cfg, n_layers=4))
    set_eval_routing(model, "topk")
    assert [m.eval_routing for _, m in _mod_layers(model)] == ["topk", "topk"]


# -- 10. static shapes ---------------------------------------------------------------------------
@pytest.mark.compile
def test_training_path_compiles_fullgraph_and_matches_eager(tiny_cfg):
    torch._dynamo.reset()
    model = build_model(_cfg(tiny_cfg, init_std=0.02, capacity=0.25))
    eager = copy.deepcopy(model)
    tokens, targets = _tokens(2, 16), _tokens(2, 16)
    out = torch.compile(model, fullgraph=True)(tokens, targets)
    (out.loss + out.aux_loss).backward()
    ref = eager(tokens, targets)
    (ref.loss + ref.aux_loss).backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


# -- 11. encoder ---------------------------------------------------------------------------------
def test_encoder_topk_layer_is_bidirectional(tiny_cfg):
    layer, ref = _mod_layer(tiny_cfg, kind="encoder", capacity=0.5, eval_routing="topk", causal_router="none")
    layer.eval()
    B, T = 2, 10
    x = torch.randn(B, T, D, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x, Context(positions_BT=torch.arange(T).expand(B, T), causal=False))
        r = router_logits_ref(layer, x)
        chosen = topk_ref(r, 5)
        bidirectional = reference_layer(ref, r, x, chosen, "sigmoid", causal=False)
        causal = reference_layer(ref, r, x, chosen, "sigmoid", causal=True)
    torch.testing.assert_close(y, bidirectional, rtol=0, atol=1e-12)
    assert (y - causal).abs().max() > 1e-4


@torch.no_grad()
def test_encoder_topk_model_routes_k_and_eval_equals_train(tiny_cfg):
    model = build_model(_cfg(tiny_cfg, kind="encoder", n_layers=4, capacity=0.25, eval_routing="topk")).double()
    tokens = _tokens(3, 16)
    evaluated = model.eval()(tokens, trace=True)
    for i, _ in _mod_layers(model):
        assert evaluated.traces[f"layer{i}/mod_routed"].sum(1).tolist() == [4, 4, 4]
    trained = model.train()(tokens)
    torch.testing.assert_close(evaluated.logits, trained.logits, rtol=0, atol=1e-12)
    set_eval_routing(model, "causal")
    assert (model.eval()(tokens).logits - evaluated.logits).abs().max() > 1e-6
