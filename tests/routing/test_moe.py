"""Mixture-of-Experts FFN against a naive per-token float64 reference (``moe_reference.py``).

The reference routes each token on its own from the raw router weights (softmax, top-k, renormalisation,
hash table, LSH sign bits), runs each chosen expert as plain matmuls of ``w_up`` / ``w_down``, and
implements the capacity drop policies as Python loops over pairs. Every router x dispatch path is
compared with it; then capacity and padding, integrated MoDE (no-op experts), the balance / z /
importance / load losses (against transformers' Mixtral loss and brute-force formulas), router gradients,
hash and LSH balance, the aux-loss-free bias, sequence granularity, causality, cached generation,
validation, torch.compile and determinism.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condformer.cache import KVCache
from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context, Tally
from condformer.generation import SamplingConfig, generate, left_pad
from condformer.model import build_model
from condformer.optim import before_optimizer_step
from condformer.routing.moe import dispatch, losses
from condformer.routing.moe.ffn import MoEFFN
from condformer.routing.moe.routers import HashRouter, LSHRouter
from helpers import naive_greedy, one_line_error

from . import moe_reference as R

D = 32
V = 260
F64 = torch.float64
# a float64 layer accumulates in float64 (test_float64_layer_keeps_float64_precision), so float64 runs
# are compared to the float64 reference at 1e-10
TOL64 = {"rtol": 0, "atol": 1e-10}
TOL32 = {"rtol": 2e-5, "atol": 2e-5}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes run fastest on one thread, which also keeps the module fast when other jobs share the cores
    (two OpenMP threads on an oversubscribed 2-core machine made it ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- builders -----------------------------------------------------------------------------------
def _cfg(options: dict | None = None, *, layers: list[LayerSpec] | None = None, kind: str = "decoder",
         mlp: str = "gelu", init_std: float = 0.3, n_layers: int = 2) -> ModelConfig:
    """d=32, d_ff=64; init_std 0.3 spreads router logits (std ~1.7) so routing differs between tokens."""
    layers = layers if layers is not None else [LayerSpec(ffn="moe", options=dict(options or {}))]
    return ModelConfig(d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=64, vocab_size=V, kind=kind, mlp=mlp,
                       d_ff=64, init_std=init_std, layers=layers)


def _ffn(*, kind: str = "decoder", mlp: str = "gelu", dtype: torch.dtype = F64, layer_index: int = 0,
         **options) -> MoEFFN:
    cfg = _cfg(options, kind=kind, mlp=mlp).validate()
    return MoEFFN(cfg, cfg.layer_specs()[layer_index], layer_index).to(dtype)


def _ctx(B: int, T: int, *, valid: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
         causal: bool = True, tracing: bool = False) -> Context:
    return Context(positions_BT=torch.arange(T).expand(B, T), causal=causal, tally=Tally(tracing=tracing),
                   valid_BT=valid, tokens_BT=tokens)


def _stat(ctx: Context, name: str) -> float:
    return float(ctx.tally.stats[f"layer0/{name}"])


def _unit(dtype: torch.dtype = F64) -> torch.Tensor:
    u = torch.randn(D, dtype=dtype)
    return u / u.norm()


def _skew(ffn: MoEFFN, B: int, T: int, rows=(0,), strength: float = 2.5, shift: float = 1.0) -> torch.Tensor:
    """Push the router towards the experts in ``rows`` and return inputs that lean that way."""
    u = _unit(ffn.bank.w_up.dtype)
    with torch.no_grad():
        for e in rows:
            ffn.router.weight[e] += strength * u
    return torch.randn(B, T, D, dtype=ffn.bank.w_up.dtype) + shift * u


# router options (always with experts=4 unless overridden) and dispatch paths
ROUTERS = {
    "topk": {"top_k": 2},
    "topk_plain": {"top_k": 2, "renormalize": False},
    "topk3": {"top_k": 3, "experts": 5},
    "topk1": {"top_k": 1},
    "switch": {"moe_router": "switch"},
    "noisy_topk": {"moe_router": "noisy_topk", "top_k": 2},
    "hash": {"moe_router": "hash"},
    "lsh": {"moe_router": "lsh"},
    "lsh6": {"moe_router": "lsh", "experts": 6},
    "shared_fine": {"top_k": 2, "shared_experts": 2, "expert_dim": 16},
    "null": {"top_k": 2, "null_experts": 2},
}
PATHS = {
    "grouped": {"dispatch": "grouped", "capacity_factor": None},  # on CPU: the fused expert kernel
    "sorted": {"dispatch": "sorted", "capacity_factor": None},
    "loop": {"dispatch": "loop", "capacity_factor": None},
    # C = N: nothing can drop (eval capacity is refused in decoders unless allowed: it can see the future)
    "capacity": {"capacity_factor": 64.0, "eval_capacity_factor": 64.0, "allow_noncausal": True},
}
# GELU in training mode and SwiGLU in eval mode (noisy top-k is deterministic only in eval)
CASES = [(r, p, mlp, "eval" if r == "noisy_topk" or mlp == "swiglu" else "train")
         for r in ROUTERS for p in PATHS for mlp in ("gelu", "swiglu")]


def _run(ffn: MoEFFN, x: torch.Tensor, tokens: torch.Tensor | None = None, valid: torch.Tensor | None = None,
         tracing: bool = True, causal: bool = True) -> tuple[torch.Tensor, Context]:
    B, T, _ = x.shape
    ctx = _ctx(B, T, valid=valid, tokens=tokens, tracing=tracing, causal=causal)
    with torch.no_grad():
        y = ffn(x, ctx)
    return y, ctx


# -- 1. every router x every dispatch path equals the reference ---------------------------------
@pytest.mark.parametrize(("router", "path", "mlp", "mode"), CASES)
def test_token_choice_layer_matches_reference(router, path, mlp, mode):
    ffn = _ffn(mlp=mlp, **{"experts": 4, **ROUTERS[router], **PATHS[path]}).train(mode == "train")
    B, T = 3, 8
    x = torch.randn(B, T, D, dtype=F64)
    tokens = torch.randint(0, V, (B, T))
    y, ctx = _run(ffn, x, tokens)
    ref = R.moe(R.weights_of(ffn), x, tokens_BT=tokens)
    torch.testing.assert_close(y, ref.y, **TOL64)
    assert ctx.tally.traces["layer0/moe_expert"].reshape(B * T, -1).tolist() == ref.visited(ffn.n_experts)
    assert len({tuple(e) for e in ref.experts()}) >= 3  # tokens route differently: the check means something
    assert _stat(ctx, "moe_dropped_frac") == 0.0
    n_total = ffn.n_total
    hits = [e for row in ref.experts() for e in row]
    for e in range(ffn.n_experts):
        assert _stat(ctx, f"moe_load_e{e}") == pytest.approx(hits.count(e) / len(hits))
    assert _stat(ctx, "moe_load_max") == pytest.approx(max(hits.count(e) for e in range(n_total)) / len(hits) * n_total)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_soft_mixture_matches_reference(mlp, mode):
    ffn = _ffn(mlp=mlp, moe_router="soft", experts=4).train(mode == "train")
    x = torch.randn(2, 8, D, dtype=F64)
    y, ctx = _run(ffn, x)
    ref = R.moe(R.weights_of(ffn), x)
    torch.testing.assert_close(y, ref.y, **TOL64)
    p = torch.stack([R.router_probs(R.weights_of(ffn), row) for row in x.reshape(-1, D)])
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert _stat(ctx, "moe_entropy") == pytest.approx(entropy, rel=1e-5)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("where", ["decoder_allow_noncausal", "encoder"])
@pytest.mark.parametrize(("top_k", "T"), [(2, 8), (1, 6), (3, 7)])
def test_expert_choice_matches_reference(where, mlp, top_k, T):
    encoder = where == "encoder"
    ffn = _ffn(mlp=mlp, kind="encoder" if encoder else "decoder", allow_noncausal=not encoder,
               moe_router="expert_choice", experts=4, top_k=top_k).eval()
    B = 3
    x = torch.randn(B, T, D, dtype=F64)
    y, ctx = _run(ffn, x, causal=not encoder)
    expected, picks = R.expert_choice(R.weights_of(ffn), x, top_k)
    torch.testing.assert_close(y, expected, **TOL64)
    assert ctx.tally.traces["layer0/moe_picks"].tolist() == picks
    flat = [p for row in picks for p in row]
    assert _stat(ctx, "moe_dropped_frac") == pytest.approx(flat.count(0) / len(flat))
    assert _stat(ctx, "moe_experts_per_token") == pytest.approx(sum(flat) / len(flat))
    assert sum(flat) == B * 4 * math.ceil(top_k * T / 4)  # each expert took exactly C tokens per sequence


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("router", ["topk", "topk_plain", "switch", "hash", "lsh", "shared_fine", "null", "topk3"])
def test_grouped_float32_matches_reference(router, mlp):
    ffn = _ffn(mlp=mlp, dtype=torch.float32, **{"experts": 4, **ROUTERS[router], "dispatch": "grouped",
                                               "capacity_factor": None}).eval()
    B, T = 3, 8
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    y, ctx = _run(ffn, x, tokens)
    assert y.dtype == torch.float32
    ref = R.moe(R.weights_of(ffn), x.double(), tokens_BT=tokens)
    assert ctx.tally.traces["layer0/moe_expert"].reshape(B * T, -1).tolist() == ref.visited(ffn.n_experts)
    torch.testing.assert_close(y.double(), ref.y, **TOL32)
    ffn.dispatch = "auto"  # float32 on CPU: auto runs the grouped matmul
    assert ffn.bank.grouped_supported(x)
    assert torch.equal(_run(ffn, x, tokens)[0], y)


@pytest.mark.parametrize("path", ["sorted", "loop", "capacity", "soft", "expert_choice"])
def test_float64_layer_keeps_float64_precision(path):
    if path == "soft":
        ffn = _ffn(moe_router="soft", experts=4).eval()
    elif path == "expert_choice":
        ffn = _ffn(moe_router="expert_choice", experts=4, kind="encoder").eval()
    else:
        ffn = _ffn(experts=4, top_k=2, **PATHS[path]).eval()
    x = torch.randn(2, 8, D, dtype=F64)
    y, _ = _run(ffn, x, causal=path != "expert_choice")
    W = R.weights_of(ffn)
    expected = R.expert_choice(W, x, 2)[0] if path == "expert_choice" else R.moe(W, x).y
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)


def test_auto_dispatch_runs_a_float64_layer():
    ffn = _ffn(experts=4, top_k=2, capacity_factor=None).eval()  # dispatch: auto (the default)
    x = torch.randn(2, 8, D, dtype=F64)
    y, _ = _run(ffn, x)
    torch.testing.assert_close(y, R.moe(R.weights_of(ffn), x).y, **TOL64)


def test_topk1_with_renormalize_keeps_the_probability_as_gate():
    """k = 1 and renormalize=True: the gate is p (renormalising would make it 1 and cut the router off)."""
    ffn = _ffn(experts=4, top_k=1, renormalize=True).eval()
    x = torch.randn(16, D, dtype=F64)
    with torch.no_grad():
        r = ffn.router(x)
    p = torch.softmax(x @ ffn.router.weight.detach().T, dim=-1)
    torch.testing.assert_close(r.gate_NK[:, 0], p.max(dim=-1).values, rtol=0, atol=1e-12)
    assert float(r.gate_NK.max()) < 0.999


def test_hash_routing_without_token_ids_raises():
    ffn = _ffn(moe_router="hash", experts=4)
    msg = one_line_error(lambda: ffn(torch.randn(1, 4, D, dtype=F64), _ctx(1, 4)))
    assert "token ids" in msg


# -- 2. capacity drops exactly the pairs the policy says ----------------------------------------
@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("router", ["topk", "topk_plain", "switch", "null"])
@pytest.mark.parametrize("factor", [0.5, 0.25])
def test_capacity_drops_exactly_the_policy_pairs(router, policy, factor):
    ffn = _ffn(**{"experts": 4, **ROUTERS[router], "capacity_factor": factor, "drop_policy": policy,
                  "dispatch": "sorted"}).train()
    B, T = 2, 12
    x = _skew(ffn, B, T)
    y, ctx = _run(ffn, x)
    W = R.weights_of(ffn)
    ref = R.moe(W, x, capacity_factor=factor, policy=policy)
    dropped = ref.dropped_frac(ffn.n_experts)
    assert dropped > 0.2
    torch.testing.assert_close(y, ref.y, **TOL64)
    assert _stat(ctx, "moe_dropped_frac") == pytest.approx(dropped, rel=1e-6)
    assert ctx.tally.traces["layer0/moe_expert"].reshape(B * T, -1).tolist() == ref.visited(ffn.n_experts)
    fully = [n for n, kept in enumerate(ref.kept) if not any(kept)]
    assert fully  # some tokens lost every pair: they get exactly nothing (the residual passes unchanged)
    assert torch.equal(y.reshape(B * T, D)[fully], torch.zeros(len(fully), D, dtype=F64))
    # the dispatch function itself: same slot count, same kept set
    C = R.capacity(factor, B * T, ffn.k, ffn.n_total)
    assert dispatch.capacity_slots(factor, B * T, ffn.k, ffn.n_total) == C
    r = ffn.router(x.reshape(-1, D))
    out, kept = dispatch.with_capacity(x.reshape(-1, D), r.expert_NK, r.gate_NK, ffn.bank, C, policy)
    assert kept.tolist() == ref.kept
    torch.testing.assert_close(out, ref.y.reshape(B * T, D), **TOL64)
    # the comparison can tell the policies (and, for k > 1, choice-major from token-major order) apart
    other = "score" if policy == "position" else "position"
    assert R.keep_pairs(ref.choices, ffn.n_experts, C, other) != ref.kept
    assert R.keep_pairs(ref.choices, ffn.n_experts, C + 1, policy) != ref.kept
    if ffn.k > 1 and policy == "position":
        assert R.keep_pairs(ref.choices, ffn.n_experts, C, policy, order="token") != ref.kept


@pytest.mark.parametrize(("n_tokens", "k", "n_total", "factor"), [
    (24, 2, 4, 0.5), (24, 1, 4, 0.25), (7, 2, 3, 1.25), (10, 2, 8, 1.0), (3, 1, 8, 0.1), (5, 3, 4, 100.0),
    (16, 2, 6, 1.5), (100, 1, 3, 0.03), (30, 2, 10, 1.5),
])
def test_capacity_slots_formula(n_tokens, k, n_total, factor):
    assert dispatch.capacity_slots(factor, n_tokens, k, n_total) == R.capacity(factor, n_tokens, k, n_total)


@pytest.mark.parametrize("path", ["sorted", "loop", "grouped"])
def test_dropless_training_drops_nothing(path):
    dtype = torch.float32 if path == "grouped" else F64
    ffn = _ffn(dtype=dtype, experts=4, top_k=2, capacity_factor=None, dispatch=path).train()
    x = _skew(ffn, 2, 12)
    y, ctx = _run(ffn, x)
    assert _stat(ctx, "moe_dropped_frac") == 0.0
    ref = R.moe(R.weights_of(ffn), x.double())
    assert [e[0] for e in ref.experts()].count(0) > 12  # expert 0 is overloaded: capacity 1.25 would drop
    torch.testing.assert_close(y.double(), ref.y, **(TOL32 if dtype == torch.float32 else TOL64))


def test_eval_uses_the_eval_capacity_factor():
    """Training capacity 0.5 drops; eval (default eval_capacity_factor None) is dropless; a set eval factor drops."""
    ffn = _ffn(experts=4, top_k=2, capacity_factor=0.5, dispatch="sorted")
    x = _skew(ffn, 2, 12)
    W = R.weights_of(ffn)
    y_eval, ctx = _run(ffn.eval(), x)
    torch.testing.assert_close(y_eval, R.moe(W, x).y, **TOL64)
    assert _stat(ctx, "moe_dropped_frac") == 0.0
    y_train, ctx = _run(ffn.train(), x)
    torch.testing.assert_close(y_train, R.moe(W, x, capacity_factor=0.5).y, **TOL64)
    assert _stat(ctx, "moe_dropped_frac") > 0.2
    strict = _ffn(experts=4, top_k=2, capacity_factor=None, eval_capacity_factor=0.5, dispatch="sorted",
                  allow_noncausal=True)
    strict.load_state_dict(ffn.state_dict())
    torch.testing.assert_close(_run(strict.eval(), x)[0], y_train, rtol=0, atol=0)
    torch.testing.assert_close(_run(strict.train(), x)[0], y_eval, rtol=0, atol=0)


# -- 3. padding ---------------------------------------------------------------------------------
def _left_valid(lengths: list[int], T: int) -> torch.Tensor:
    return torch.stack([torch.arange(T) >= T - n for n in lengths])


@pytest.mark.parametrize("path", ["sorted", "loop", "capacity", "grouped"])
@pytest.mark.parametrize("router", ["topk", "switch", "hash", "lsh", "null"])
def test_padding_gets_zero_output(router, path):
    dtype = torch.float32 if path == "grouped" else F64
    opts = PATHS.get(path, {"dispatch": "grouped", "capacity_factor": None})
    ffn = _ffn(dtype=dtype, **{"experts": 4, **ROUTERS[router], **opts}).train()
    B, T = 3, 8
    valid = _left_valid([8, 5, 1], T)
    x = torch.randn(B, T, D, dtype=dtype)
    tokens = torch.randint(0, V, (B, T))
    y, ctx = _run(ffn, x, tokens, valid)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))
    ref = R.moe(R.weights_of(ffn), x.double(), tokens_BT=tokens, valid_BT=valid)
    torch.testing.assert_close(y.double(), ref.y, **(TOL32 if dtype == torch.float32 else TOL64))
    assert ctx.tally.traces["layer0/moe_expert"].reshape(B * T, -1).tolist() == ref.visited(ffn.n_experts)
    assert (ctx.tally.traces["layer0/moe_expert"][~valid] == -1).all()  # padding visits no expert
    hits = [e for row in ref.experts() if row is not None for e in row]
    for e in range(ffn.n_experts):  # load shares count real tokens only
        assert _stat(ctx, f"moe_load_e{e}") == pytest.approx(hits.count(e) / len(hits))


@pytest.mark.parametrize("options", [{"moe_router": "soft"}, {"top_k": 2, "shared_experts": 1}])
def test_padding_gets_zero_output_from_soft_and_shared_experts(options):
    ffn = _ffn(experts=4, dispatch="sorted", capacity_factor=None, **options).eval()
    valid = _left_valid([8, 3], 8)
    y, _ = _run(ffn, torch.randn(2, 8, D, dtype=F64), valid=valid)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))


@pytest.mark.parametrize("router", ["soft", "expert_choice"])
def test_entropy_stat_excludes_padding(router):
    ffn = _ffn(moe_router=router, experts=4, kind="encoder").eval()
    valid = _left_valid([8, 3], 8)
    x = torch.randn(2, 8, D, dtype=F64)
    _, ctx = _run(ffn, x, valid=valid, causal=False)
    W = R.weights_of(ffn)
    p = torch.stack([R.router_probs(W, row) for row in x[valid]])
    assert _stat(ctx, "moe_entropy") == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_padding_does_not_consume_capacity(policy):
    ffn = _ffn(experts=4, top_k=2, capacity_factor=0.5, drop_policy=policy, dispatch="sorted").train()
    B, T = 2, 12
    x = _skew(ffn, B, T, shift=0.5)
    u = ffn.router.weight[0].detach() - ffn.router.weight[1:].detach().mean(0)
    valid = _left_valid([12, 6], T)
    with torch.no_grad():  # padding that, were it routed, would crowd expert 0 first (left padding comes first)
        x[~valid] = 3.0 * u / u.norm() + 0.1 * torch.randn(int((~valid).sum()), D, dtype=F64)
    y, ctx = _run(ffn, x, valid=valid)
    W = R.weights_of(ffn)
    ref = R.moe(W, x, valid_BT=valid, capacity_factor=0.5, policy=policy)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))
    torch.testing.assert_close(y, ref.y, **TOL64)
    assert _stat(ctx, "moe_dropped_frac") == pytest.approx(ref.dropped_frac(4), rel=1e-6)
    # control: had padding taken slots, the real tokens would have kept a different set
    counted = R.moe(W, x, capacity_factor=0.5, policy=policy)
    real = valid.reshape(-1).tolist()
    assert [kp for kp, v in zip(counted.kept, real, strict=True) if v] != \
        [kp for kp, v in zip(ref.kept, real, strict=True) if v]


@pytest.mark.parametrize("lengths", [[8, 5, 2], [8, 8, 3]])
def test_expert_choice_skips_padding(lengths):
    """Padding never takes a slot from a real token, gets zero output, and is left out of the dropped share."""
    ffn = _ffn(kind="encoder", moe_router="expert_choice", experts=4, top_k=2).eval()
    B, T = 3, 8
    valid = _left_valid(lengths, T)
    x = torch.randn(B, T, D, dtype=F64)
    with torch.no_grad():
        x[~valid] = 5.0 * ffn.router.weight[0].detach()  # padding that expert 0 would love
    y, ctx = _run(ffn, x, valid=valid, causal=False)
    expected, picks = R.expert_choice(R.weights_of(ffn), x, 2, valid)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))
    torch.testing.assert_close(y, expected, **TOL64)
    real = [p for row, v in zip(picks, valid.tolist(), strict=True) for p, ok in zip(row, v, strict=True) if ok]
    assert _stat(ctx, "moe_dropped_frac") == pytest.approx(real.count(0) / len(real))


# -- 4. integrated MoDE: no-op experts ------------------------------------------------------------
def _null_inputs(ffn: MoEFFN, B: int, T: int) -> torch.Tensor:
    """Router and inputs such that about half the tokens send both choices to no-op experts."""
    u = _unit(ffn.bank.w_up.dtype)
    with torch.no_grad():
        ffn.router.weight[ffn.n_experts:] += 3.0 * u
    sign = torch.where(torch.rand(B, T, 1) < 0.5, 1.0, -1.0).to(u.dtype)
    return torch.randn(B, T, D, dtype=u.dtype) + 1.5 * sign * u


@pytest.mark.parametrize("path", ["sorted", "loop", "capacity", "grouped"])
def test_null_expert_tokens_get_exactly_zero(path):
    dtype = torch.float32 if path == "grouped" else F64
    opts = PATHS.get(path, {"dispatch": "grouped", "capacity_factor": None})
    ffn = _ffn(dtype=dtype, experts=4, null_experts=2, top_k=2, **opts).eval()
    B, T = 3, 8
    x = _null_inputs(ffn, B, T)
    y, ctx = _run(ffn, x)
    ref = R.moe(R.weights_of(ffn), x.double())
    experts = ref.experts()
    all_null = [n for n, row in enumerate(experts) if all(e >= 4 for e in row)]
    some_null = [n for n, row in enumerate(experts) if any(e >= 4 for e in row) and any(e < 4 for e in row)]
    assert all_null and some_null and len(all_null) < B * T
    assert torch.equal(y.reshape(B * T, D)[all_null], torch.zeros(len(all_null), D, dtype=dtype))
    torch.testing.assert_close(y.double(), ref.y, **(TOL32 if dtype == torch.float32 else TOL64))
    visited = ref.visited(4)
    assert ctx.tally.traces["layer0/moe_expert"].reshape(B * T, -1).tolist() == visited
    assert ctx.tally.traces["layer0/moe_routed"].reshape(-1).tolist() == [max(v) >= 0 for v in visited]
    hits = [e for row in experts for e in row]
    assert _stat(ctx, "moe_null_frac") == pytest.approx(sum(e >= 4 for e in hits) / len(hits))


def _grad_check(ffn: MoEFFN, x: torch.Tensor, tol: dict) -> None:
    """Backward through the layer equals autograd through the float64 reference (weights, router and input)."""
    B, T, _ = x.shape
    w = torch.randn(B, T, D, dtype=x.dtype)
    x = x.detach().clone().requires_grad_(True)
    (ffn(x, _ctx(B, T)) * w).sum().backward()
    W = R.weights_of(ffn, leaves=True)
    xr = x.detach().double().requires_grad_(True)
    (R.moe(W, xr).y * w.double()).sum().backward()
    pairs = [(x.grad, xr.grad), (ffn.bank.w_up.grad, W.w_up.grad), (ffn.bank.w_down.grad, W.w_down.grad),
             (ffn.router.weight.grad, W.router.grad)]
    for name, (got, want) in zip(("x", "w_up", "w_down", "router"), pairs, strict=True):
        assert got is not None and torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, **tol, msg=name)
    assert ffn.router.weight.grad.abs().max() > 1e-3


@pytest.mark.parametrize("path", ["grouped", "sorted", "capacity"])
def test_null_expert_gradients_are_finite_and_match_reference(path):
    dtype = torch.float32 if path == "grouped" else F64
    opts = PATHS.get(path, {"dispatch": "grouped", "capacity_factor": None})
    ffn = _ffn(dtype=dtype, experts=4, null_experts=4, top_k=2, **opts).train()
    x = _null_inputs(ffn, 3, 8)
    ref = R.moe(R.weights_of(ffn), x.double())
    assert sum(e >= 4 for row in ref.experts() for e in row) >= 16  # many no-op pairs: garbage rows exist
    _grad_check(ffn, x, TOL32 if dtype == torch.float32 else {"rtol": 1e-5, "atol": 1e-6})


def test_dropless_masks_garbage_rows_of_the_grouped_matmul():
    """Rows past the last group offset may hold anything (NaN): the layer must select them away, not multiply."""
    ffn = _ffn(dtype=torch.float32, experts=4, null_experts=2, top_k=2, dispatch="grouped",
               capacity_factor=None).train()
    grouped = ffn.bank.grouped
    seen = []

    def poisoned(x_PD: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        out = grouped(x_PD, offs)
        past = torch.arange(out.shape[0])[:, None] >= offs[-1]
        seen.append(int(past.sum()))
        return torch.where(past, torch.tensor(float("nan")), out)

    ffn.bank.grouped = poisoned
    x = _null_inputs(ffn, 3, 8)
    y, _ = _run(ffn, x)
    assert seen and seen[0] > 0
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), R.moe(R.weights_of(ffn), x.double()).y, **TOL32)
    _grad_check(ffn, x, TOL32)


# -- 5. losses ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("E", "k"), [(4, 1), (4, 2), (8, 2), (6, 3)])
def test_balance_loss_matches_transformers_mixtral(E, k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = 2.0 * torch.randn(40, E)
    probs = logits.softmax(dim=-1)
    expert = probs.topk(k, dim=-1).indices
    hf = losses.switch_balance_loss(probs, expert, "hf")
    unit = losses.switch_balance_loss(probs, expert, "unit")
    theirs = load_balancing_loss_func((logits,), num_experts=E, top_k=k)
    assert load_balancing_loss_func(logits, num_experts=E, top_k=k) == 0  # HF needs a tuple: not a real check
    torch.testing.assert_close(hf, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(unit, theirs / k, rtol=1e-6, atol=1e-7)
    rows = expert.tolist()
    assert float(hf) == pytest.approx(R.balance(probs.double(), rows, "hf"), rel=1e-6)
    assert float(unit) == pytest.approx(R.balance(probs.double(), rows, "unit"), rel=1e-6)
    assert abs(float(unit) - 1.0) > 1e-3  # not balanced: the perfect-balance value would not tell


@pytest.mark.parametrize(("E", "k"), [(4, 1), (4, 2), (8, 2), (5, 3)])
def test_balance_loss_at_perfect_balance(E, k):
    """Token n prefers experts n, n+1, ... (mod E) with a cyclically shifted probability vector: f = P = 1/E."""
    base = torch.linspace(3.0, 0.0, E, dtype=F64).softmax(dim=0)
    probs = torch.stack([base.roll(n) for n in range(3 * E)])
    expert = probs.topk(k, dim=-1).indices
    assert sorted(expert.flatten().tolist()) == sorted(list(range(E)) * 3 * k)
    assert float(losses.switch_balance_loss(probs, expert, "unit")) == pytest.approx(1.0, rel=1e-6)
    assert float(losses.switch_balance_loss(probs, expert, "hf")) == pytest.approx(float(k), rel=1e-6)
    skewed = probs.clone()
    skewed[:, 0] += 1.0
    skewed = skewed / skewed.sum(-1, keepdim=True)
    assert float(losses.switch_balance_loss(skewed, skewed.topk(k, dim=-1).indices, "unit")) > 1.05


def test_balance_loss_gradient_flows_through_mean_probability_only():
    E, k, N = 4, 2, 20
    probs = torch.rand(N, E, dtype=F64).softmax(-1).requires_grad_(True)
    expert = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    losses.switch_balance_loss(probs, expert, "unit").backward()
    f = torch.zeros(E, dtype=F64).scatter_add_(0, expert.flatten(), torch.ones(N * k, dtype=F64)) / (N * k)
    torch.testing.assert_close(probs.grad, (E * f / N).expand(N, E), rtol=1e-6, atol=1e-9)


def test_z_loss_is_mean_squared_logsumexp():
    logits = 3.0 * torch.randn(24, 6, dtype=F64)
    m = logits.max(dim=-1, keepdim=True).values
    lse = (m + (logits - m).exp().sum(-1, keepdim=True).log())[:, 0]
    expected = float((lse ** 2).mean())
    assert float(losses.z_loss(logits)) == pytest.approx(expected, rel=1e-6)
    assert abs(expected - float(lse.mean()) ** 2) > 1e-2  # mean of squares, not square of the mean


def test_importance_loss_is_cv_squared_with_population_variance():
    gates = torch.zeros(12, 5, dtype=F64)
    idx = torch.randint(0, 5, (12, 2))
    gates.scatter_(1, idx, torch.rand(12, 2, dtype=F64))
    importance = gates.sum(0).tolist()
    assert float(losses.importance_loss(gates)) == pytest.approx(R.cv2(importance), rel=1e-6)
    m = sum(importance) / 5
    unbiased = sum((v - m) ** 2 for v in importance) / 4 / m ** 2
    assert abs(R.cv2(importance) - unbiased) > 1e-3
    assert float(losses.cv_squared(torch.full((6,), 2.5))) == 0.0


@pytest.mark.parametrize(("E", "k"), [(5, 1), (5, 2), (4, 3)])
def test_smooth_load_matches_brute_force(E, k):
    N = 12
    clean = torch.randn(N, E, dtype=F64)
    std = F.softplus(torch.randn(N, E, dtype=F64)) + 0.01
    noisy = clean + torch.randn(N, E, dtype=F64) * std
    got = losses.smooth_load(clean, noisy, std, k)
    want = R.smooth_load(clean, noisy, std, k)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)
    assert float(losses.load_loss(clean, noisy, std, k)) == pytest.approx(R.cv2(want), rel=1e-5)


def test_noisy_router_training_noise_gates_and_load_loss():
    """Training: H = clean + N(0,1) softplus(x W_noise) (+1e-2), top-k of H, gates softmax(H[top-k])."""
    ffn = _ffn(moe_router="noisy_topk", experts=5, top_k=2, load_coef=0.5, importance_coef=0.3,
               dispatch="sorted", capacity_factor=None).train()
    with torch.no_grad():
        ffn.router.noise_weight.normal_(std=0.3)
    B, T = 2, 8
    x = torch.randn(B, T, D, dtype=F64)
    x_ND = x.reshape(-1, D)
    torch.manual_seed(5)
    y, ctx = _run(ffn, x)
    torch.manual_seed(5)
    eps = torch.randn(B * T, 5, dtype=F64)
    Wg, Wn = ffn.router.weight.detach(), ffn.router.noise_weight.detach()
    clean = x_ND @ Wg.T
    std = torch.log1p(torch.exp(x_ND @ Wn.T)) + 1e-2
    noisy = clean + eps * std
    experts = [R.top(row, 2) for row in noisy.tolist()]
    gates = [torch.softmax(noisy[n, e], dim=0) for n, e in enumerate(experts)]
    expected = torch.stack([sum(g[j] * R.expert(R.weights_of(ffn), e, x_ND[n]) for j, e in enumerate(row))
                            for n, (row, g) in enumerate(zip(experts, gates, strict=True))]).view(B, T, D)
    torch.testing.assert_close(y, expected, **TOL64)
    load = R.cv2(R.smooth_load(clean, noisy, std, 2))
    assert _stat(ctx, "moe_load") == pytest.approx(load, rel=1e-5)
    assert float(ctx.tally.losses["moe_load"]) == pytest.approx(0.5 * load, rel=1e-5)
    importance = torch.zeros(B * T, 5, dtype=F64)
    for n, (row, g) in enumerate(zip(experts, gates, strict=True)):
        importance[n, row] = g
    assert _stat(ctx, "moe_importance") == pytest.approx(R.cv2(importance.sum(0).tolist()), rel=1e-5)


def _ffn_inputs(model) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        ffn = layer.block.ffn
        if isinstance(ffn, MoEFFN):
            ffn.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
    return seen


@pytest.mark.parametrize("convention", ["unit", "hf"])
@pytest.mark.parametrize("padded", [False, True])
def test_model_aux_losses_sum_coef_times_layer_losses(convention, padded):
    options = {"experts": 4, "top_k": 2, "dispatch": "sorted", "capacity_factor": None, "balance_coef": 0.03,
               "balance_convention": convention, "z_coef": 0.002, "importance_coef": 0.05}
    model = build_model(_cfg(options)).double().train()
    seen = _ffn_inputs(model)
    B, T = 3, 10
    tokens = torch.randint(0, V, (B, T))
    valid = _left_valid([10, 7, 3], T) if padded else None
    positions = (valid.long().cumsum(1) - 1).clamp(min=0) if padded else None
    out = model(tokens, positions_BT=positions, valid_BT=valid)
    assert set(seen) == {0, 1}
    totals = {"moe_balance": 0.0, "moe_z": 0.0, "moe_importance": 0.0}
    for i, x in seen.items():
        W = R.weights_of(model.layers[i].block.ffn)
        rows = x.reshape(-1, D) if valid is None else x[valid]
        probs = torch.stack([R.router_probs(W, r) for r in rows])
        routes = [R.route(W, r) for r in rows]
        experts = [[e for e, _ in c] for c in routes]
        values = {
            "moe_balance": R.balance(probs, experts, convention),
            "moe_z": float((torch.logsumexp(rows @ W.router.T, dim=-1) ** 2).mean()),
            "moe_importance": R.cv2([sum(float(g) for c in routes for e, g in c if e == j) for j in range(4)]),
        }
        for name, v in values.items():
            assert float(out.stats[f"layer{i}/{name}"]) == pytest.approx(v, rel=1e-5), (i, name)
            totals[name] += v
    coefs = {"moe_balance": 0.03, "moe_z": 0.002, "moe_importance": 0.05}
    assert set(out.aux_losses) == set(totals)
    for name, total in totals.items():
        assert float(out.aux_losses[name].detach()) == pytest.approx(coefs[name] * total, rel=1e-5), name
    assert float(out.aux_loss.detach()) == pytest.approx(sum(coefs[n] * totals[n] for n in totals), rel=1e-5)


def test_zero_coefficients_add_no_losses_and_eval_adds_none():
    options = {"experts": 4, "dispatch": "sorted", "balance_coef": 0.0, "z_coef": 0.0}
    model = build_model(_cfg(options)).double().train()
    assert model(torch.randint(0, V, (2, 6))).aux_losses == {}
    model = build_model(_cfg({"experts": 4, "dispatch": "sorted"})).double().eval()
    out = model(torch.randint(0, V, (2, 6)))
    assert out.aux_losses == {} and float(out.aux_loss) == 0.0


# -- 6. router gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "topk_plain", "topk1", "switch", "topk3"])
def test_router_gradient_matches_reference(router):
    ffn = _ffn(**{"experts": 4, **ROUTERS[router], "dispatch": "sorted", "capacity_factor": None,
                  "balance_coef": 0.0, "z_coef": 0.0}).train()
    _grad_check(ffn, torch.randn(2, 8, D, dtype=F64), {"rtol": 1e-5, "atol": 1e-6})


def test_reference_router_gradient_matches_finite_difference():
    """The reference's autograd (which the layer is compared with above) is the true derivative."""
    ffn = _ffn(experts=4, top_k=2).train()
    W = R.weights_of(ffn, leaves=True)
    x, w = torch.randn(2, 6, D, dtype=F64), torch.randn(2, 6, D, dtype=F64)
    (R.moe(W, x).y * w).sum().backward()
    d, eps = torch.randn_like(W.router), 1e-6
    with torch.no_grad():
        base = W.router.clone()
        W.router.copy_(base + eps * d)
        up = float((R.moe(W, x).y * w).sum())
        W.router.copy_(base - eps * d)
        down = float((R.moe(W, x).y * w).sum())
    assert (up - down) / (2 * eps) == pytest.approx(float((W.router.grad * d).sum()), rel=1e-6)


@pytest.mark.parametrize("router", ["topk", "switch", "topk1"])
def test_lm_loss_gradient_reaches_router_and_matches_finite_difference(router):
    options = {"experts": 4, **ROUTERS[router], "dispatch": "sorted", "capacity_factor": None,
               "balance_coef": 0.0, "z_coef": 0.0}
    model = build_model(_cfg(options)).double().train()
    tokens, targets = torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 12))

    def lm_loss() -> torch.Tensor:
        return F.cross_entropy(model(tokens).logits.flatten(0, 1), targets.flatten())

    lm_loss().backward()
    for layer in model.layers:
        weight = layer.block.ffn.router.weight
        g = weight.grad
        assert g is not None and g.abs().max() > 1e-6
        d = torch.randn_like(g)
        d = d / d.norm()
        eps = 1e-5
        w0 = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(w0 + eps * d)
            up = float(lm_loss())
            weight.copy_(w0 - eps * d)
            down = float(lm_loss())
            weight.copy_(w0)
        assert (up - down) / (2 * eps) == pytest.approx(float((g * d).sum()), rel=1e-6, abs=1e-9)


# -- 7. hash and LSH ----------------------------------------------------------------------------
@pytest.mark.parametrize("E", [4, 6, 8])
def test_hash_table_is_balanced_and_deterministic(E):
    a, b = _ffn(moe_router="hash", experts=E), _ffn(moe_router="hash", experts=E)
    table = a.router.table
    assert torch.equal(table, b.router.table)  # two builds route identically
    counts = torch.bincount(table, minlength=E).tolist()
    assert len(counts) == E and max(counts) - min(counts) <= 1 and sum(counts) == V
    assert not torch.equal(table, _ffn(moe_router="hash", experts=E, layer_index=1).router.table)  # per layer
    assert len({tuple(table[i:i + 8].tolist()) for i in range(0, 64, 8)}) > 1  # not the identity pattern
    ids = torch.randint(0, V, (4000,))
    share = torch.bincount(table[ids], minlength=E).double() / 4000
    assert (share - 1 / E).abs().max() < 0.03
    hr = HashRouter(V, E, seed=1234)
    assert torch.equal(hr(ids).expert_NK[:, 0], HashRouter(V, E, seed=1234).table[ids])


@pytest.mark.parametrize("E", [2, 4, 5, 6, 8])
def test_lsh_routing_is_deterministic_and_balanced(E):
    a, b = _ffn(moe_router="lsh", experts=E), _ffn(moe_router="lsh", experts=E)
    x = torch.randn(4096, D, dtype=F64)
    ea = a.router(x).expert_NK[:, 0]
    assert torch.equal(ea, b.router(x).expert_NK[:, 0])
    assert torch.equal(ea, a.router(x).expert_NK[:, 0])
    W = R.weights_of(a)
    assert ea[:256].tolist() == [R.lsh_expert(W, row) for row in x[:256]]
    share = torch.bincount(ea, minlength=E).double() / len(ea)
    assert (share - 1 / E).abs().max() < 0.05, share
    near = x[:256] + 1e-3 * torch.randn(256, D, dtype=F64)  # nearby states share buckets
    assert float((a.router(near).expert_NK[:, 0] == ea[:256]).double().mean()) > 0.95


def test_lsh_bit_count():
    assert [LSHRouter.n_bits(E) for E in (2, 4, 8, 16)] == [1, 2, 3, 4]
    assert [LSHRouter.n_bits(E) for E in (3, 5, 6, 7)] == [5, 6, 6, 6]


# -- 8. aux-loss-free bias ------------------------------------------------------------------------
def _loads(experts: list[list[int]], n: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([e for row in experts for e in row]), minlength=n).double()


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
def test_aux_free_bias_steers_selection_not_gates(router):
    ffn = _ffn(moe_router=router, experts=4, top_k=2, aux_free_rate=0.01, dispatch="sorted",
               capacity_factor=None).eval()
    with torch.no_grad():
        ffn.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.1, -0.2]) * (1.0 if router == "topk" else 5.0))
    x = torch.randn(3, 8, D, dtype=F64)
    y, _ = _run(ffn, x)
    W = R.weights_of(ffn)
    ref = R.moe(W, x)  # selection on p + b (noisy: logits + b); gates from p alone, renormalised
    torch.testing.assert_close(y, ref.y, **TOL64)
    W.bias = None
    assert R.moe(W, x).experts() != ref.experts()  # the bias changed some selections


def test_aux_free_bias_update_rule_and_balancing():
    rate = 0.05
    ffn = _ffn(experts=4, top_k=1, aux_free_rate=rate, dispatch="sorted", capacity_factor=None,
               balance_coef=0.0, z_coef=0.0)
    holder = nn.ModuleList([ffn])
    x = _skew(ffn, 8, 32)
    max_share = []
    for _ in range(10):
        W = R.weights_of(ffn)
        load = _loads([[e for e, _ in R.route(W, row)] for row in x.reshape(-1, D)], 4)
        max_share.append(float(load.max() / load.sum()))
        bias = ffn.expert_bias.clone()
        _run(ffn.train(), x)
        before_optimizer_step(holder)
        expected = bias + rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(ffn.expert_bias, expected - expected.mean(), rtol=0, atol=1e-7)
        assert abs(float(ffn.expert_bias.sum())) < 1e-7
    assert max_share[0] > 0.6
    assert max(max_share[5:]) < max_share[0] and min(max_share[5:]) < max_share[0] - 0.15


def test_aux_free_accumulates_micro_batches_skip_and_eval():
    rate = 0.1
    ffn = _ffn(experts=4, top_k=2, aux_free_rate=rate, dispatch="sorted", capacity_factor=None)
    holder = nn.ModuleList([ffn])
    x1, x2 = _skew(ffn, 2, 8), torch.randn(2, 8, D, dtype=F64)
    W = R.weights_of(ffn)
    load = _loads(R.moe(W, x1).experts(), 4) + _loads(R.moe(W, x2).experts(), 4)
    _run(ffn.train(), x1)
    _run(ffn.train(), x2)
    before_optimizer_step(holder)
    expected = rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(ffn.expert_bias, expected - expected.mean(), rtol=0, atol=1e-7)
    b = ffn.expert_bias.clone()
    _run(ffn.train(), x1)
    before_optimizer_step(holder, skip=True)
    assert torch.equal(ffn.expert_bias, b)
    before_optimizer_step(holder)  # the skipped step's load was discarded, not carried over
    assert torch.equal(ffn.expert_bias, b)
    _run(ffn.eval(), x1)
    before_optimizer_step(holder)  # evaluation does not count load
    assert torch.equal(ffn.expert_bias, b)
    _run(ffn.train(), x1, valid=_left_valid([8, 1], 8))  # padding does not count either
    W = R.weights_of(ffn)
    load = _loads([row for row in R.moe(W, x1, valid_BT=_left_valid([8, 1], 8)).experts() if row], 4)
    before_optimizer_step(holder)
    expected = b + rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(ffn.expert_bias, expected - expected.mean(), rtol=0, atol=1e-7)


# -- 9. sequence granularity ----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "switch", "lsh", "null"])
@pytest.mark.parametrize("where", ["encoder", "decoder_allow_noncausal"])
def test_sequence_granularity_routes_each_sequence_by_its_mean_state(router, where):
    encoder = where == "encoder"
    ffn = _ffn(**{"experts": 4, **ROUTERS[router], "granularity": "sequence", "dispatch": "sorted",
                  "capacity_factor": None}, kind="encoder" if encoder else "decoder",
               allow_noncausal=not encoder).eval()
    B, T = 3, 8
    valid = _left_valid([8, 5, 3], T)
    W = R.weights_of(ffn)
    x = torch.randn(B, T, D, dtype=F64)
    for _ in range(50):  # padding values that would change row 1's routing if they entered its mean
        x[1, :3] = 6.0 * torch.randn(3, D, dtype=F64)
        if R.route_mean_rows(W, x)[1] != R.route_mean_rows(W, x, valid)[1]:
            break
    else:
        pytest.fail("could not build padding that matters")
    y, ctx = _run(ffn, x, valid=valid, causal=not encoder)
    trace = ctx.tally.traces["layer0/moe_expert"]
    means = R.route_mean_rows(W, x, valid)
    assert len({tuple(m) for m in means}) > 1
    for b in range(B):
        for t in range(T):
            want = [e if e < ffn.n_experts else -1 for e in means[b]] if valid[b, t] else [-1] * ffn.k
            assert trace[b, t].tolist() == want
    torch.testing.assert_close(y, R.moe(W, x, valid_BT=valid, granularity="sequence").y, **TOL64)
    _, ctx_all = _run(ffn, x, causal=not encoder)  # without a mask every token joins the mean
    assert ctx_all.tally.traces["layer0/moe_expert"][1, 0].tolist() == \
        [e if e < ffn.n_experts else -1 for e in R.route_mean_rows(W, x)[1]]


# -- 10. causality --------------------------------------------------------------------------------
CAUSAL = {
    "topk": {"top_k": 2},
    "switch": {"moe_router": "switch"},
    "noisy_topk": {"moe_router": "noisy_topk", "top_k": 2},
    "hash": {"moe_router": "hash"},
    "lsh": {"moe_router": "lsh"},
    "soft": {"moe_router": "soft"},
    "null": {"top_k": 2, "null_experts": 2},
    "shared": {"top_k": 1, "shared_experts": 1, "capacity_factor": 0.5},  # training capacity: eval stays dropless
}


def _moe_model(options: dict, *, kind: str = "decoder", pattern: str = "dense_moe"):
    spec = LayerSpec(ffn="moe", options={"experts": 4, "dispatch": "sorted", **options})
    layers = [LayerSpec(), spec] if pattern == "dense_moe" else [spec]
    return build_model(_cfg(layers=layers, kind=kind)).double().eval()


@pytest.mark.parametrize("router", CAUSAL)
@torch.no_grad()
def test_eval_output_is_causal(router):
    model = _moe_model(CAUSAL[router], pattern="moe")
    B, T = 2, 16
    tokens = torch.randint(0, V, (B, T))
    base = model(tokens, trace=True)
    for t in (0, 6, 13):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, V, (B, T - t - 1))
        out = model(changed, trace=True)
        torch.testing.assert_close(out.logits[:, :t + 1], base.logits[:, :t + 1], rtol=0, atol=1e-10)
        for key, tr in base.traces.items():
            assert torch.equal(out.traces[key][:, :t + 1], tr[:, :t + 1]), key
        assert (out.logits[:, t + 1:] - base.logits[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("options", [{"moe_router": "expert_choice"}, {"granularity": "sequence"},
                                     {"top_k": 2, "eval_capacity_factor": 0.5}])
@torch.no_grad()
def test_noncausal_routing_leaks_the_future(options):
    """Control: the check above detects routing that depends on later tokens."""
    model = _moe_model({**options, "allow_noncausal": True}, pattern="moe")
    B, T, t = 2, 16, 7
    tokens = torch.randint(0, V, (B, T))
    base = model(tokens).logits
    leaks = []
    for _ in range(4):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, V, (B, T - t - 1))
        leaks.append(float((model(changed).logits[:, :t + 1] - base[:, :t + 1]).abs().max()))
    assert max(leaks) > 1e-6


@pytest.mark.parametrize(("options", "what"), [({"moe_router": "expert_choice"}, "expert_choice"),
                                               ({"granularity": "sequence"}, "sequence"),
                                               ({"eval_capacity_factor": 1.0}, "eval_capacity_factor")])
def test_noncausal_routing_is_refused_in_a_decoder(options, what):
    msg = one_line_error(lambda: build_model(_cfg(options)))
    assert what in msg and "allow_noncausal" in msg
    build_model(_cfg(options, kind="encoder"))
    model = build_model(_cfg({**options, "allow_noncausal": True})).eval()
    cache = KVCache.for_model(model, 1, 8)
    msg = one_line_error(lambda: model(torch.randint(0, V, (1, 4)), cache=cache))
    assert "cache" in msg


# -- 11. cached generation --------------------------------------------------------------------------
def _check_cached(model, prompts: list[list[int]], conts: list[list[int]], atol: float = 1e-9) -> None:
    """Prefill + token-by-token decoding with a KV cache gives the logits of one full forward, and each
    left-padded row gives the logits of its sequence alone."""
    B, n = len(prompts), len(conts[0])
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
    tokens, positions, valid = left_pad(seqs, 0, torch.device("cpu"))
    padded = not bool(valid.all())
    full = model(tokens, positions_BT=positions, valid_BT=valid if padded else None).logits
    for b, s in enumerate(seqs):
        alone = model(torch.tensor([s])).logits[0]
        torch.testing.assert_close(full[b, valid[b]], alone, rtol=0, atol=atol)
    tp, pp, vp = left_pad(prompts, 0, torch.device("cpu"))
    P = tp.shape[1]
    cache = KVCache.for_model(model, B, P + n)
    out = model(tp, positions_BT=pp, valid_BT=vp if padded else None, cache=cache).logits
    torch.testing.assert_close(out[vp], full[:, :P][vp], rtol=0, atol=atol)
    nxt = pp[:, -1:] + 1
    for i in range(n):
        tok = torch.tensor([[c[i]] for c in conts])
        out = model(tok, positions_BT=nxt + i, cache=cache).logits
        torch.testing.assert_close(out[:, 0], full[:, P + i], rtol=0, atol=atol)


@pytest.mark.parametrize("router", CAUSAL)
@pytest.mark.parametrize("B", [1, 2])
@torch.no_grad()
def test_cached_decoding_matches_full_forward(router, B):
    model = _moe_model(CAUSAL[router])
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (7, 3)[:B]]
    conts = [torch.randint(0, V, (6,)).tolist() for _ in range(B)]
    _check_cached(model, prompts, conts)


@pytest.mark.parametrize("router", ["topk", "hash", "lsh", "null", "noisy_topk"])
def test_greedy_generate_matches_naive_loop(router):
    model = _moe_model(CAUSAL[router])
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (4, 9, 2)]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True))
    for p, row in zip(prompts, got, strict=True):
        assert row == naive_greedy(model, p, 8)
    assert len({tuple(row) for row in got}) == len(prompts)  # not degenerate


@pytest.mark.parametrize("moe_router", ["topk", "hash"])
@pytest.mark.parametrize("B", [1, 2])
@torch.no_grad()
def test_staged_mode_cached_decoding_matches_full_forward(moe_router, B):
    """MoD router around a block whose FFN is an MoE (staged MoDE), causal eval routing."""
    options = {"capacity": 0.5, "causal_router": "aux", "experts": 4, "moe_router": moe_router,
               "dispatch": "sorted"}
    model = build_model(_cfg(layers=[LayerSpec(), LayerSpec(router="mod", ffn="moe", options=options)])).double()
    model.eval()
    model.layers[1].router.weight.normal_(std=1.0)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (7, 4)[:B]]
    conts = [torch.randint(0, V, (6,)).tolist() for _ in range(B)]
    tokens, positions, valid = left_pad([p + c for p, c in zip(prompts, conts, strict=True)], 0,
                                        torch.device("cpu"))
    routed = model(tokens, positions_BT=positions, valid_BT=valid, trace=True).traces["layer1/mod_routed"]
    assert routed[valid].any() and not routed[valid].all()  # mixed decisions: the check means something
    _check_cached(model, prompts, conts)


# -- 12. validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "name"), [
    ({"moe_router": "topq"}, "moe_router"),
    ({"experts": 4, "top_k": 5}, "top_k"),
    ({"experts": 2, "null_experts": 1, "top_k": 4}, "top_k"),
    ({"moe_router": "switch", "top_k": 2}, "top_k"),
    ({"moe_router": "hash", "top_k": 2}, "top_k"),
    ({"moe_router": "hash", "null_experts": 2}, "null_experts"),
    ({"moe_router": "soft", "null_experts": 1}, "null_experts"),
    ({"moe_router": "lsh", "null_experts": 1}, "null_experts"),
    ({"load_coef": 0.1}, "load_coef"),
    ({"moe_router": "switch", "load_coef": 0.1}, "load_coef"),
    ({"balance_coef": -0.1}, "balance_coef"),
    ({"z_coef": -1e-3}, "z_coef"),
    ({"importance_coef": -1}, "importance_coef"),
    ({"moe_router": "noisy_topk", "load_coef": -0.5}, "load_coef"),
    ({"moe_router": "noisy_topk", "top_k": 1}, "top_k"),
    ({"aux_free_rate": -0.01}, "aux_free_rate"),
    ({"balance_coef": "0.01"}, "balance_coef"),
    ({"z_coef": True}, "z_coef"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"capacity_factor": True}, "capacity_factor"),
    ({"capacity_factor": "1.25"}, "capacity_factor"),
    ({"eval_capacity_factor": 0}, "eval_capacity_factor"),
    ({"experts": 0}, "experts"),
    ({"experts": 2.0}, "experts"),
    ({"experts": True}, "experts"),
    ({"top_k": 0}, "top_k"),
    ({"null_experts": -1}, "null_experts"),
    ({"shared_experts": -1}, "shared_experts"),
    ({"expert_dim": 0}, "expert_dim"),
    ({"renormalize": 1}, "renormalize"),
    ({"renormalize": "true"}, "renormalize"),
    ({"allow_noncausal": 0}, "allow_noncausal"),
    ({"drop_policy": "random"}, "drop_policy"),
    ({"dispatch": "fast"}, "dispatch"),
    ({"granularity": "batch"}, "granularity"),
    ({"balance_convention": "megablocks"}, "balance_convention"),
    ({"moe_router": "hash", "aux_free_rate": 0.01}, "aux_free_rate"),
    ({"moe_router": "hash", "granularity": "sequence", "allow_noncausal": True}, "granularity"),
    ({"capacity_facter": 1.0}, "capacity_facter"),
    ({"eval_capacity_factor": 2.0}, "eval_capacity_factor"),  # in a decoder: sees the future
])
def test_bad_options_raise_one_line_config_error(options, name):
    msg = one_line_error(lambda: build_model(_cfg(options)))
    assert name in msg


@pytest.mark.parametrize("options", [
    {}, {"moe_router": "switch", "top_k": 1}, {"moe_router": "hash", "top_k": 1},
    {"experts": 2, "null_experts": 2, "top_k": 4}, {"capacity_factor": None},
    {"eval_capacity_factor": 2, "allow_noncausal": True},
    {"moe_router": "noisy_topk", "load_coef": 0.1}, {"balance_coef": 0, "z_coef": 0}, {"experts": 1, "top_k": 1},
    {"aux_free_rate": 0.001, "moe_router": "noisy_topk"}, {"granularity": "sequence", "moe_router": "lsh",
                                                           "allow_noncausal": True},
])
def test_good_options_build(options):
    model = build_model(_cfg(options))
    assert isinstance(model.layers[0].block.ffn, MoEFFN)


# -- 13. torch.compile ------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("path", ["grouped", "capacity"])
def test_training_path_compiles_fullgraph_and_matches_eager(path, backend):
    """Dynamo + AOTAutograd trace the whole training step (no graph break); inductor also works but takes
    ~45 s for both paths on 2 CPU cores, so it runs only with ``-m slow``."""
    torch._dynamo.reset()
    opts = {"dispatch": "grouped", "capacity_factor": None} if path == "grouped" else {"capacity_factor": 1.0}
    model = build_model(_cfg({"experts": 4, "top_k": 2, **opts}, init_std=0.02, n_layers=1))
    eager = copy.deepcopy(model)
    tokens, targets = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    out = torch.compile(model, fullgraph=True, backend=backend)(tokens, targets)
    (out.loss + out.aux_loss).backward()
    ref = eager(tokens, targets)
    (ref.loss + ref.aux_loss).backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)
    for key, value in ref.stats.items():
        torch.testing.assert_close(torch.as_tensor(out.stats[key]), torch.as_tensor(value), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


# -- 14. determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["grouped", "sorted", "loop", "capacity", "capacity_score"])
def test_forward_and_backward_are_bit_identical_across_runs(path):
    opts = {
        "grouped": {"dispatch": "grouped", "capacity_factor": None},
        "sorted": PATHS["sorted"], "loop": PATHS["loop"],
        "capacity": {"capacity_factor": 0.5}, "capacity_score": {"capacity_factor": 0.5, "drop_policy": "score"},
    }[path]
    ffn = _ffn(dtype=torch.float32, experts=4, top_k=2, null_experts=1, **opts).train()
    x = _skew(ffn, 3, 8)
    runs = []
    for _ in range(2):
        ffn.zero_grad()
        y = ffn(x, _ctx(3, 8))
        (y * torch.linspace(-1, 1, D)).sum().backward()
        runs.append((y.detach(), ffn.bank.w_up.grad.clone(), ffn.router.weight.grad.clone()))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
