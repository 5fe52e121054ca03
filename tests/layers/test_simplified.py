"""Simplified Transformer blocks (He & Hofmann 2024): shaped attention, parallel, SAS and SAS-P.

Shaped attention is checked against a straightforward float64 T x T implementation of
``out_h = (beta_h A_h + alpha_h I - gamma_h C) V_h`` written out here (explicit softmax matrix, explicit
uniform matrix C, rotary by complex multiplication), with perturbed non-zero query weights and distinct
per-head gains so that A != C and the gains cannot be confused. The blocks are checked against their
formulas written out with their own submodules' weights; models against cached decoding, MoD routing,
FLOP counting, parameter counts and weight-decay groups.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from condformer.cache import KVCache
from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context
from condformer.flops import count_flops
from condformer.generation import SamplingConfig, generate, left_pad
from condformer.layers.attention import SelfAttention
from condformer.layers.blocks import PreLNBlock
from condformer.layers.norms import LayerNorm, RMSNorm
from condformer.layers.shaped_attention import ShapedAttention
from condformer.layers.simplified import ParallelBlock, SASBlock, SASPBlock
from condformer.model import IGNORE_INDEX, build_layer, build_model
from condformer.optim import param_groups
from condformer.presets import SIZES, preset
from condformer.routing.dense import DenseRouter
from condformer.routing.mod import MoDRouter, capacity_tokens
from helpers import decode_with_cache, naive_greedy, one_line_error

D, H, V = 32, 4, 260
HD = D // H
GAINS = ("alpha", "beta", "gamma", "beta_ff", "beta_sa")
BLOCK_CLASSES = {"parallel": ParallelBlock, "sas": SASBlock, "sasp": SASPBlock}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Other jobs share this machine's 2 cores: run single-threaded, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- independent references ----------------------------------------------------------------------
def rotate_ref(x_Td: torch.Tensor, pos_T: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary: channel pairs (i, i + d/2) as complex numbers times exp(1j * pos * base^(-2i/d)), float64."""
    d = x_Td.shape[-1]
    h = d // 2
    z = torch.complex(x_Td[..., :h].double(), x_Td[..., h:].double())
    theta = torch.tensor([base ** (-2 * i / d) for i in range(h)], dtype=torch.float64)
    angles = pos_T.double()[:, None] * theta
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def allowed_ref(pos_BT: torch.Tensor, valid_BT: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """M[b, t, s]: key s is a real token and (for a decoder) not after query t by original position."""
    B, T = pos_BT.shape
    M = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                ok = (not causal or int(pos_BT[b, s]) <= int(pos_BT[b, t]))
                M[b, t, s] = ok and (valid_BT is None or bool(valid_BT[b, s]))
    return M


def uniform_ref(M_BTT: torch.Tensor) -> torch.Tensor:
    """C: uniform attention over each query's allowed keys (rows without any are left NaN: unspecified)."""
    M = M_BTT.double()
    return M / M.sum(dim=-1, keepdim=True)


def explicit_C(B: int, T: int, causal: bool) -> torch.Tensor:
    """The spec's C for a full contiguous sequence: C[i, j] = 1/i for j <= i (1-indexed), or 1/T everywhere."""
    C = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            if not causal:
                C[i, j] = 1.0 / T
            elif j <= i:
                C[i, j] = 1.0 / (i + 1)
    return C.expand(B, T, T)


def _gains(attn: ShapedAttention) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(attn, n).detach().double().flatten() for n in ("alpha", "beta", "gamma"))


def shaped_ref(attn: ShapedAttention, x_BTD: torch.Tensor, pos_BT: torch.Tensor, M_BTT: torch.Tensor,
               C_BTT: torch.Tensor, gains: tuple[torch.Tensor, ...] | None = None,
               zero_queries: bool = False, values_BTD: torch.Tensor | None = None) -> torch.Tensor:
    """Per row and head: A = softmax(Q K^T / sqrt(d) masked), out = (beta A + alpha I - gamma C) V, V = x's slice
    (or ``values_BTD``'s slice: the reference's caller computes values itself)."""
    B, T, Dm = x_BTD.shape
    nh = attn.n_heads
    hd = Dm // nh
    W = attn.qk.weight.detach().double()
    Wq, Wk = W[:Dm], W[Dm:]
    if zero_queries:
        Wq = torch.zeros_like(Wq)
    alpha, beta, gamma = _gains(attn) if gains is None else gains
    x = x_BTD.double()
    vals = x if values_BTD is None else values_BTD.double()
    out = torch.zeros(B, T, Dm, dtype=torch.float64)
    eye = torch.eye(T, dtype=torch.float64)
    for b in range(B):
        q_all, k_all = x[b] @ Wq.T, x[b] @ Wk.T
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            q = rotate_ref(q_all[:, sl], pos_BT[b])
            k = rotate_ref(k_all[:, sl], pos_BT[b])
            scores = (q @ k.T) / math.sqrt(hd)
            scores = scores.masked_fill(~M_BTT[b], -math.inf)
            e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            A = e / e.sum(dim=-1, keepdim=True)
            A_tilde = beta[h] * A + alpha[h] * eye - gamma[h] * C_BTT[b]
            out[b, :, sl] = A_tilde @ vals[b, :, sl]
    return out


def self_attention_ref(attn: SelfAttention, x_BTD: torch.Tensor, pos_BT: torch.Tensor,
                       M_BTT: torch.Tensor) -> torch.Tensor:
    """Standard attention written out: softmax(QK^T/sqrt(d)) V per head, then the output projection."""
    B, T, Dm = x_BTD.shape
    hd = Dm // attn.n_heads
    W = attn.qkv.weight.detach().double()
    Wq, Wk, Wv = W[:Dm], W[Dm:2 * Dm], W[2 * Dm:]
    out = torch.zeros(B, T, Dm, dtype=torch.float64)
    for b in range(B):
        x = x_BTD[b].double()
        q_all, k_all, v_all = x @ Wq.T, x @ Wk.T, x @ Wv.T
        for h in range(attn.n_heads):
            sl = slice(h * hd, (h + 1) * hd)
            s = rotate_ref(q_all[:, sl], pos_BT[b]) @ rotate_ref(k_all[:, sl], pos_BT[b]).T / math.sqrt(hd)
            s = s.masked_fill(~M_BTT[b], -math.inf)
            e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            out[b, :, sl] = (e / e.sum(dim=-1, keepdim=True)) @ v_all[:, sl]
    return out @ attn.out.weight.detach().double().T


def norm_ref(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, RMSNorm):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight.detach()
    assert isinstance(norm, nn.LayerNorm)
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.detach() + norm.bias.detach()


def mlp_ref(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GELU MLP written out (exact erf GELU), no biases."""
    h = x @ mlp.up.weight.detach().T
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return h @ mlp.down.weight.detach().T


# -- builders ------------------------------------------------------------------------------------
def _shaped(tiny_cfg, dtype=torch.float64, perturb: bool = True, value_matrix: bool = False) -> ShapedAttention:
    attn = ShapedAttention(tiny_cfg(n_heads=H), value_matrix=value_matrix).to(dtype)
    if perturb:
        with torch.no_grad():
            attn.qk.weight.normal_(std=0.3)  # non-zero queries: A != C
            if value_matrix:
                attn.value.weight.normal_(std=0.3)
            attn.alpha.copy_(torch.tensor([0.5, 1.5, -0.3, 2.0]).view(1, H, 1, 1))
            attn.beta.copy_(torch.tensor([1.2, 0.4, 0.9, -0.8]).view(1, H, 1, 1))
            attn.gamma.copy_(torch.tensor([0.7, 1.9, -1.1, 0.25]).view(1, H, 1, 1))
    return attn


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid) of left-padded rows, positions 0.. at each row's first real token (as generate does)."""
    _, pos, valid = left_pad([[1] * n for n in lengths], pad_id=0, device=torch.device("cpu"))
    return pos, valid


def _cfg(tiny_cfg, block: str, n_layers: int = 2, kind: str = "decoder", init_std: float = 0.1,
         **options) -> ModelConfig:
    return tiny_cfg(n_heads=H, n_layers=n_layers, kind=kind, init_std=init_std,
                    layers=[LayerSpec(block=block, options=options)])


@torch.no_grad()
def _perturb(model: nn.Module) -> nn.Module:
    """Random query/key weights, distinct per-head gains, non-trivial norm gains: nothing is at its init."""
    for m in model.modules():
        if isinstance(m, ShapedAttention):
            m.qk.weight.normal_(std=0.3)
            if m.value is not None:
                m.value.weight.normal_(std=0.3)
            for name in ("alpha", "beta", "gamma"):
                getattr(m, name).uniform_(0.5, 1.5)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(std=0.1)
    return model


def _model64(tiny_cfg, block: str, **kw) -> nn.Module:
    opts = {"beta_ff": 0.3, "beta_sa": 0.8} if block in ("sas", "sasp") else {}
    return _perturb(build_model(_cfg(tiny_cfg, block, **opts, **kw)).double().eval())


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


# -- 1. shaped attention = the T x T formula -----------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_shaped_attention_matches_explicit_matrix_formula(tiny_cfg, causal):
    attn = _shaped(tiny_cfg)
    B, T = 2, 7
    x = torch.randn(B, T, D, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    y = attn(x, Context(positions_BT=pos, causal=causal))  # contiguous: SDPA + running mean
    M = allowed_ref(pos, None, causal)
    C = explicit_C(B, T, causal)
    torch.testing.assert_close(uniform_ref(M), C, rtol=0, atol=1e-15)  # the mask-based C agrees with the spec's
    expected = shaped_ref(attn, x, pos, M, C)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    # the inputs discriminate: these plausible mistakes give measurably different outputs
    alpha, beta, gamma = _gains(attn)
    assert (expected - shaped_ref(attn, x, pos, M, C, gains=(alpha, beta, -gamma))).abs().max() > 1e-2
    assert (expected - shaped_ref(attn, x, pos, M, C, gains=(beta, alpha, gamma))).abs().max() > 1e-2
    assert (expected - shaped_ref(attn, x, pos, M, C, zero_queries=True)).abs().max() > 1e-2  # A != C
    if causal:
        assert (expected - shaped_ref(attn, x, pos, M, explicit_C(B, T, False))).abs().max() > 1e-2


def test_shaped_attention_has_no_value_or_output_projection(tiny_cfg):
    attn = ShapedAttention(tiny_cfg(n_heads=H))
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {"qk.weight": (2 * D, D), "alpha": (1, H, 1, 1), "beta": (1, H, 1, 1), "gamma": (1, H, 1, 1)}


def _values_ref(attn: ShapedAttention, x: torch.Tensor) -> torch.Tensor:
    """V = x (I + W)^T: the identity plus the optional trainable value matrix."""
    return x.double() + x.double() @ attn.value.weight.detach().double().T


@pytest.mark.parametrize("causal", [True, False])
def test_value_matrix_matches_formula(tiny_cfg, causal):
    """Optional first-layer value matrix (official SAS config): V = x (I + W), queries and keys from x."""
    attn = _shaped(tiny_cfg, value_matrix=True)
    B, T = 2, 7
    x = torch.randn(B, T, D, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    y = attn(x, Context(positions_BT=pos, causal=causal))
    M, C = allowed_ref(pos, None, causal), explicit_C(B, T, causal)
    expected = shaped_ref(attn, x, pos, M, C, values_BTD=_values_ref(attn, x))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    assert (expected - shaped_ref(attn, x, pos, M, C)).abs().max() > 1e-2  # W matters in this check
    # the padded (masked-mean) path uses the same values
    pos_p, valid = _left_padded([7, 3])
    y = attn(x, Context(positions_BT=pos_p, causal=causal, valid_BT=valid, contiguous=False))
    M = allowed_ref(pos_p, valid, causal)
    expected = shaped_ref(attn, x, pos_p, M, uniform_ref(M), values_BTD=_values_ref(attn, x))
    torch.testing.assert_close(y[valid], expected[valid], rtol=0, atol=1e-10)


def test_value_matrix_starts_at_zero_so_attention_is_still_the_identity(tiny_cfg):
    attn = _shaped(tiny_cfg, perturb=False, value_matrix=True)
    assert torch.equal(attn.value.weight.detach(), torch.zeros(D, D)) and attn.value.weight.requires_grad
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        y = attn(x, Context(positions_BT=torch.arange(7).expand(2, 7), causal=True))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", ["sas", "sasp"])
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
def test_gradients_match_finite_differences(tiny_cfg, block, layout):
    """The block's backward (gains folded into the attention's coefficients, in-place accumulation, the
    value matrix) against finite differences, in float64, for the input and every parameter."""
    cfg = _cfg(tiny_cfg, block, n_layers=2, value_matrix=True, beta_ff=0.3, beta_sa=0.8).validate()
    layer = _perturb(build_layer(cfg, 0).double())
    with torch.no_grad():
        layer.block.attn.value.weight.normal_(std=0.3)
    names = [n for n, _ in layer.named_parameters()]
    B, T = 2, 5
    if layout == "contiguous":
        ctx = Context(positions_BT=torch.arange(T).expand(B, T), causal=True)
    else:
        pos, valid = _left_padded([5, 3])
        ctx = Context(positions_BT=pos, causal=True, valid_BT=valid, contiguous=False)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x, ctx))

    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("block", ["sas", "sasp"])
def test_blocks_train_and_decode_under_bf16_autocast(tiny_cfg, block):
    """The GPU recipe (bf16 autocast over fp32 weights), here on CPU: same loss as fp32 to bf16 precision,
    finite gradients for every parameter, cached decoding close to the full forward."""
    cfg = _cfg(tiny_cfg, block, value_matrix=True, init_std=0.02)
    model = build_model(cfg)
    tokens = _tokens(2, 16)
    ref = model(tokens, tokens).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens)
    torch.testing.assert_close(out.loss.float(), ref, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():  # away from the zero-init queries (uniform attention would hide a wrong position)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))

    def decode(position: int) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cache = KVCache.for_model(model, 1, 16)
            model(tokens[:1, :10], cache=cache)
            return model(tokens[:1, 10:11], positions_BT=torch.tensor([[position]]), cache=cache).logits.float()[0, -1]

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(tokens[:1]).logits.float()[0, 10]
    err = (decode(10) - full).abs().max()
    assert err <= 5e-2 * full.abs().max()
    assert (decode(12) - full).abs().max() > 4 * err  # control: a wrong decode position shows


# -- 2. padding, non-contiguous subsets, KV cache -------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_shaped_attention_with_padding_averages_only_valid_keys(tiny_cfg, causal):
    attn = _shaped(tiny_cfg)
    pos, valid = _left_padded([7, 4, 2])
    B, T = valid.shape
    x = torch.randn(B, T, D, dtype=torch.float64)
    ctx = Context(positions_BT=pos, causal=causal, valid_BT=valid, contiguous=False)
    y = attn(x, ctx)
    assert torch.isfinite(y).all()
    M = allowed_ref(pos, valid, causal)
    expected = shaped_ref(attn, x, pos, M, uniform_ref(M))
    torch.testing.assert_close(y[valid], expected[valid], rtol=0, atol=1e-10)  # padding queries: unspecified
    # C over every causally allowed key (padding included) would differ
    M_all = allowed_ref(pos, None, causal)
    wrong = shaped_ref(attn, x, pos, M, uniform_ref(M_all))
    assert (wrong[valid] - expected[valid]).abs().max() > 1e-2
    # padding keys are invisible to real queries: new padding values change no real output
    x2 = torch.where(valid[..., None], x, 50 * torch.randn_like(x))
    torch.testing.assert_close(attn(x2, ctx)[valid], y[valid], rtol=0, atol=1e-11)
    # each real row gives what it gives alone
    for b, n in enumerate([7, 4, 2]):
        alone = attn(x[b:b + 1, T - n:], Context(positions_BT=torch.arange(n)[None], causal=causal))
        torch.testing.assert_close(y[b:b + 1, T - n:], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_shaped_attention_non_contiguous_positions(tiny_cfg, causal):
    attn = _shaped(tiny_cfg)
    pos = torch.tensor([[0, 2, 3, 7, 9], [8, 1, 6, 4, 5]])  # a sorted subset and a shuffled one
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y = attn(x, Context(positions_BT=pos, causal=causal, contiguous=False))
    M = allowed_ref(pos, None, causal)
    expected = shaped_ref(attn, x, pos, M, uniform_ref(M))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    if causal:  # causal order by position, not by index: the shuffled row's C is not lower triangular
        index_order = allowed_ref(torch.arange(5).expand(2, 5), None, True)
        wrong = shaped_ref(attn, x, pos, M, uniform_ref(index_order))
        assert (wrong[1] - expected[1]).abs().max() > 1e-2


def test_shaped_attention_ascending_subset_uses_the_fused_path_at_original_positions(tiny_cfg):
    """ctx.subset(ascending=True) of a contiguous context stays contiguous (running mean by index)."""
    attn = _shaped(tiny_cfg)
    idx = torch.tensor([[0, 2, 3, 7, 9], [1, 4, 5, 6, 8]])
    sub = Context(positions_BT=torch.arange(10).expand(2, 10), causal=True).subset(idx, ascending=True)
    assert sub.contiguous
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y = attn(x, sub)
    M = allowed_ref(idx, None, True)
    expected = shaped_ref(attn, x, idx, M, uniform_ref(M))
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    compact = shaped_ref(attn, x, torch.arange(5).expand(2, 5), M, uniform_ref(M))
    assert (compact - expected).abs().max() > 1e-3  # positions 0..4 would give this instead


@pytest.mark.parametrize("lengths", [[7, 7], [7, 3]])
def test_shaped_attention_kv_cache_matches_full_formula(tiny_cfg, lengths):
    attn = _shaped(tiny_cfg)
    pos, valid = _left_padded(lengths)
    B, T = valid.shape
    P = 4
    x = torch.randn(B, T, D, dtype=torch.float64)
    M = allowed_ref(pos, valid, True)
    expected = shaped_ref(attn, x, pos, M, uniform_ref(M))
    cache = KVCache(1, B, H, HD, T, dtype=torch.float64)
    v_pre = None if bool(valid[:, :P].all()) else valid[:, :P]
    y = attn(x[:, :P], Context(positions_BT=pos[:, :P], causal=True, valid_BT=v_pre, cache=cache, contiguous=False))
    torch.testing.assert_close(y[valid[:, :P]], expected[:, :P][valid[:, :P]], rtol=0, atol=1e-10)
    for t in range(P, T):
        y = attn(x[:, t:t + 1], Context(positions_BT=pos[:, t:t + 1], causal=True, cache=cache, contiguous=False))
        torch.testing.assert_close(y[:, 0], expected[:, t], rtol=0, atol=1e-10)
    assert cache.layers[0].length == T


# -- 3. identity at initialisation -----------------------------------------------------------------
def test_shaped_attention_init(tiny_cfg):
    cfg = tiny_cfg(n_heads=H, init_std=0.05)
    attn = ShapedAttention(cfg)
    for name in ("alpha", "beta", "gamma"):
        p = getattr(attn, name)
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert p.shape == (1, H, 1, 1) and torch.equal(p.detach(), torch.ones(1, H, 1, 1))
    w = attn.qk.weight.detach()
    assert torch.equal(w[:D], torch.zeros(D, D))  # queries
    assert 0.03 < float(w[D:].std()) < 0.07  # keys: N(0, init_std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "non_contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_fresh_shaped_attention_is_the_identity(tiny_cfg, dtype, layout, causal):
    attn = _shaped(tiny_cfg, dtype=dtype, perturb=False)
    B, T = 3, 7
    x = (3 * torch.randn(B, T, D, dtype=torch.float64)).to(dtype)
    if layout == "contiguous":
        ctx = Context(positions_BT=torch.arange(T).expand(B, T), causal=causal)
    elif layout == "padded":
        pos, valid = _left_padded([7, 4, 1])
        ctx = Context(positions_BT=pos, causal=causal, valid_BT=valid, contiguous=False)
    else:
        ctx = Context(positions_BT=torch.randperm(20)[:T].expand(B, T), causal=causal, contiguous=False)
    with torch.no_grad():
        y = attn(x, ctx)
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, x, rtol=0, atol=atol)
    # and it is not the identity once the queries move (the check above is not vacuous)
    with torch.no_grad():
        attn.qk.weight[:D].normal_(std=0.3)
        assert (attn(x, ctx) - x).abs().max() > 1e-3


@pytest.mark.parametrize("block", ["sas", "sasp"])
def test_skipless_block_without_norms_and_ffn_gain_zero_is_the_identity(tiny_cfg, block):
    """No norms (layer > 0), beta_FF = 0, beta_SA = 1: out = ShapedAttn(x) = x, so the update is zero."""
    cfg = _cfg(tiny_cfg, block, n_layers=3, block_norm=False, beta_ff=0.0).validate()
    layer = build_layer(cfg, 1).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    ctx = Context(positions_BT=torch.arange(7).expand(2, 7), causal=True)
    with torch.no_grad():
        torch.testing.assert_close(layer.block(x, ctx), torch.zeros_like(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(layer(x, ctx), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", ["sas", "sasp"])
def test_skipless_model_at_init_is_layer0_layernorm_of_the_embeddings(tiny_cfg, block):
    """Whole no-norm model with beta_FF = 0: every layer is the identity except layer 0's input LayerNorm."""
    model = build_model(_cfg(tiny_cfg, block, n_layers=3, block_norm=False, beta_ff=0.0)).double()
    with torch.no_grad():
        model.layers[0].block.norm1.weight.uniform_(0.5, 1.5)
        model.layers[0].block.norm1.bias.normal_()
    seen = {}
    model.final_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    tokens = _tokens(2, 9)
    with torch.no_grad():
        model(tokens)
        expected = norm_ref(model.layers[0].block.norm1, model.embed(tokens))
    torch.testing.assert_close(seen["h"], expected, rtol=0, atol=1e-12)


# -- 4. parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("d", [32, 64])
def test_parameter_counts(d, norm):
    L = 3
    ns = d if norm == "rmsnorm" else 2 * d  # one norm's parameters

    def count(block: str, **options) -> tuple[int, nn.Module]:
        cfg = ModelConfig(d_model=d, n_layers=L, n_heads=H, norm=norm, vocab_size=V, max_seq_len=32,
                          layers=[LayerSpec(block=block, options=options)])
        with torch.device("meta"):
            model = build_model(cfg)
        n = model.num_params()
        assert count_flops(cfg, 16).non_embedding_params == n
        return n, model

    preln, _ = count("preln")
    assert preln == L * (12 * d * d + 2 * ns) + ns
    gains = 3 * H + 2
    parallel, _ = count("parallel")
    assert parallel == preln - L * ns  # one shared norm
    sas, sas_model = count("sas")
    assert sas == preln - L * (2 * d * d - gains)
    sasp, _ = count("sasp")
    assert sasp == preln - L * (2 * d * d - gains + ns)
    n_gains = sum(p.numel() for n, p in sas_model.named_parameters() if n.split(".")[-1] in GAINS)
    assert n_gains == L * gains
    # the attention's weights: 4 d^2 in pre-LN, 2 d^2 (queries and keys) in shaped attention
    assert sum(p.numel() for n, p in sas_model.named_parameters() if ".attn." in n) == L * (2 * d * d + 3 * H)
    # no-norm variants: only layer 0's input LayerNorm (2d) and the model's final norm remain
    assert count("sas", block_norm=False)[0] == L * (10 * d * d + gains) + 2 * d + ns
    assert count("sasp", block_norm=False)[0] == L * (10 * d * d + gains) + 2 * d + ns
    assert count("preln", block_norm=False)[0] == L * 12 * d * d + 2 * d + ns
    # the optional value matrix gives back d^2 per block that has it
    assert count("sasp", value_matrix=True)[0] == sasp + L * d * d


# -- 5. cached decoding and generation ----------------------------------------------------------------
@pytest.mark.parametrize("block", ["parallel", "sas", "sasp", "sasp-value"])
@torch.no_grad()
def test_cached_decoding_matches_full_forward(tiny_cfg, block):
    model = _model64(tiny_cfg, "sasp", value_matrix=True) if block == "sasp-value" else _model64(tiny_cfg, block)
    T, P = 12, 5
    tokens = _tokens(1, T)
    full = model(tokens).logits
    decode_with_cache(model, tokens, P, full, atol=1e-9)
    # prefixes really interact (the comparison is not between position-wise independent computations)
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % V
    assert (model(changed).logits[0, -1] - full[0, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("block", ["parallel", "sas", "sasp"])
@torch.no_grad()
def test_left_padded_cached_decoding_matches_each_sequence_alone(tiny_cfg, block):
    model = _model64(tiny_cfg, block)
    prompts = [_tokens(1, n)[0].tolist() for n in (6, 2)]
    conts = _tokens(2, 4)
    tokens, positions, valid = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    B, T = tokens.shape
    cache = KVCache.for_model(model, B, T + conts.shape[1])
    pre = model(tokens, positions_BT=positions, valid_BT=valid, cache=cache).logits
    steps = []
    next_pos = positions[:, -1:] + 1
    for j in range(conts.shape[1]):
        steps.append(model(conts[:, j:j + 1], positions_BT=next_pos, cache=cache).logits[:, 0])
        next_pos = next_pos + 1
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p + conts[b].tolist()])).logits[0]
        torch.testing.assert_close(pre[b, T - len(p):], alone[:len(p)], rtol=0, atol=1e-9)
        for j, step in enumerate(steps):
            torch.testing.assert_close(step[b], alone[len(p) + j], rtol=0, atol=1e-9)


@pytest.mark.parametrize("block", ["parallel", "sas", "sasp"])
def test_greedy_generate_matches_naive_loop(tiny_cfg, block):
    model = _model64(tiny_cfg, block, init_std=1.0)  # large weights: varied greedy paths
    prompts = [_tokens(1, n)[0].tolist() for n in (3, 7)]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=8, greedy=True))
    for p, row in zip(prompts, got, strict=True):
        assert row == naive_greedy(model, p, 8)
    assert len({t for row in got for t in row}) > 2  # not degenerate


# -- 6. composition with Mixture-of-Depths -----------------------------------------------------------
def _mod_sasp_model(tiny_cfg) -> nn.Module:
    routed = LayerSpec(block="sasp", router="mod", options={"capacity": 0.5, "causal_router": "aux"})
    cfg = tiny_cfg(n_heads=H, n_layers=4, init_std=0.1, layers=[LayerSpec(block="sasp"), routed])
    model = _perturb(build_model(cfg).double().eval())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoDRouter):
                m.router.weight.normal_(std=1.0)  # "aux": the causal decision is r > 0, about half the tokens
    return model


@pytest.mark.parametrize("B", [1, 2])
@torch.no_grad()
def test_mod_sasp_cached_decoding_matches_full_forward(tiny_cfg, B):
    model = _mod_sasp_model(tiny_cfg)
    assert isinstance(model.layers[1], MoDRouter) and isinstance(model.layers[1].block, SASPBlock)
    T, P = 14, 5
    tokens = _tokens(B, T)
    full = model(tokens, trace=True)
    for i in (1, 3):
        routed = full.traces[f"layer{i}/mod_routed"]
        assert routed.any() and not routed.all(), "decisions not mixed: the test would prove nothing"
        if B == 2:
            assert not torch.equal(routed[0], routed[1])  # fillers: rows route different tokens
    decode_with_cache(model, tokens, P, full.logits, atol=1e-9)


@torch.no_grad()
def test_mod_sasp_topk_layer_matches_gathered_reference(tiny_cfg):
    """Training (top-k): the sasp block runs on the chosen tokens at their original positions."""
    model = _mod_sasp_model(tiny_cfg).train()
    layer = model.layers[1]
    B, T = 2, 12
    k = capacity_tokens(0.5, T)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y = layer(x, Context(positions_BT=torch.arange(T).expand(B, T), causal=True))
    r = x @ layer.router.weight.detach().double()[0]
    expected = x.clone()
    for b in range(B):
        idx = sorted(sorted(range(T), key=lambda t, b=b: -float(r[b, t]))[:k])
        z = norm_ref(layer.block.norm1, x[b, idx][None])
        pos = torch.tensor([idx])
        M = allowed_ref(pos, None, True)
        beta_sa, beta_ff = float(layer.block.beta_sa), float(layer.block.beta_ff)
        out = beta_sa * shaped_ref(layer.block.attn, z, pos, M, uniform_ref(M)) + beta_ff * mlp_ref(layer.block.ffn, z)
        expected[b, idx] = x[b, idx] + torch.sigmoid(r[b, idx])[:, None] * (out[0] - x[b, idx])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)


# -- 7. weight decay ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_norm", [True, False])
@pytest.mark.parametrize("block", ["parallel", "sas", "sasp"])
def test_gains_and_norms_get_no_weight_decay(tiny_cfg, block, block_norm):
    model = build_model(_cfg(tiny_cfg, block, block_norm=block_norm))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    expected_no_decay = {n for n in names.values()
                         if n.split(".")[-1] in GAINS or n.endswith(".bias") or re.search(r"norm\d?\.", n)}
    assert {names[id(p)] for p in no_decay["params"]} == expected_no_decay
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected_no_decay
    assert all(p.dim() == 2 for p in decay["params"])
    decayed, not_decayed = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    for i in range(2):
        blk = model.layers[i].block
        if block != "parallel":
            gains = [blk.attn.alpha, blk.attn.beta, blk.attn.gamma, blk.beta_ff, blk.beta_sa]
            assert {id(g) for g in gains} <= not_decayed
            assert id(blk.attn.qk.weight) in decayed
        else:
            assert id(blk.attn.qkv.weight) in decayed and id(blk.attn.out.weight) in decayed
        if not block_norm and i == 0:
            first = blk.norm if block == "parallel" else blk.norm1
            assert isinstance(first, LayerNorm)
            assert {id(first.weight), id(first.bias)} <= not_decayed


# -- 8. block semantics with non-default gains -----------------------------------------------------------
def _f32(v: float) -> float:
    """``v`` as the float32 parameter holds it (the block builds its gains in float32; ``.double()`` keeps that)."""
    return float(torch.tensor(v, dtype=torch.float32))


@pytest.mark.parametrize("layer_index", [0, 1])
@pytest.mark.parametrize("block_norm", [True, False])
@pytest.mark.parametrize("block", ["parallel", "sas", "sasp"])
@torch.no_grad()
def test_block_update_matches_formula(tiny_cfg, block, block_norm, layer_index):
    opts = {"block_norm": block_norm}
    if block != "parallel":
        opts.update(beta_ff=0.3, beta_sa=0.7)
    cfg = _cfg(tiny_cfg, block, **opts).validate()
    layer = _perturb(build_layer(cfg, layer_index).double())
    assert isinstance(layer, DenseRouter) and type(layer.block) is BLOCK_CLASSES[block]
    blk = layer.block
    if block == "parallel":
        norms = [blk.norm]
        assert isinstance(blk.attn, SelfAttention)
    else:
        assert isinstance(blk.attn, ShapedAttention)
        norms = [blk.norm1, blk.norm2] if block == "sas" else [blk.norm1]
        assert block == "sas" or not hasattr(blk, "norm2")  # sasp: one shared norm
        for name, value in (("beta_ff", 0.3), ("beta_sa", 0.7)):
            p = getattr(blk, name)
            assert isinstance(p, nn.Parameter) and p.requires_grad and p.shape == ()
            assert float(p) == _f32(value)  # the options are wired (defaults 0.1 and 1.0)
    if block_norm:
        expected_types = [RMSNorm] * len(norms)
    else:  # the paper's no-norm variant: one LayerNorm at the input of layer 0, nothing else
        expected_types = [LayerNorm if (layer_index == 0 and j == 0) else nn.Identity for j in range(len(norms))]
    assert [type(n) for n in norms] == expected_types

    B, T = 2, 7
    x = 2 * torch.randn(B, T, D, dtype=torch.float64) + 0.5
    pos = torch.arange(T).expand(B, T)
    ctx = Context(positions_BT=pos, causal=True)
    M = allowed_ref(pos, None, True)
    C = explicit_C(B, T, True)
    b_sa, b_ff = _f32(0.7), _f32(0.3)
    if block == "parallel":
        z = norm_ref(blk.norm, x)
        update = self_attention_ref(blk.attn, z, pos, M) + mlp_ref(blk.ffn, z)
    elif block == "sas":
        h = b_sa * shaped_ref(blk.attn, norm_ref(blk.norm1, x), pos, M, C)
        update = h + b_ff * mlp_ref(blk.ffn, norm_ref(blk.norm2, h)) - x
    else:
        z = norm_ref(blk.norm1, x)
        update = b_sa * shaped_ref(blk.attn, z, pos, M, C) + b_ff * mlp_ref(blk.ffn, z) - x
    torch.testing.assert_close(blk(x, ctx), update, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x, ctx), x + update, rtol=0, atol=1e-10)


def test_default_gains(tiny_cfg):
    for block in ("sas", "sasp"):
        blk = build_layer(_cfg(tiny_cfg, block).validate(), 0).block
        assert float(blk.beta_ff.detach()) == _f32(0.1) and float(blk.beta_sa.detach()) == 1.0
        assert isinstance(blk.norm1, RMSNorm)


# -- 9. FLOPs -----------------------------------------------------------------------------------------
def _measured(model, tokens) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    return counter.get_total_flops()


@pytest.mark.parametrize(("block", "kind", "T"), [("sas", "decoder", 16), ("sas", "decoder", 40),
                                                  ("sasp", "decoder", 16), ("sasp", "encoder", 24),
                                                  ("parallel", "decoder", 16)])
def test_flops_match_flop_counter(tiny_cfg, block, kind, T):
    cfg = _cfg(tiny_cfg, block, kind=kind)
    model = build_model(cfg).train()
    report = count_flops(cfg, T)
    measured = _measured(model, _tokens(1, T))
    assert measured > 0
    assert abs(report.forward_flops - measured) <= 0.01 * measured, (report.forward_flops, measured)
    preln = count_flops(_cfg(tiny_cfg, "preln", kind=kind), T)
    attn_proj_saving = 0 if block == "parallel" else 4 * T * D * D  # no value or output projection
    assert report.per_layer == [p - attn_proj_saving for p in preln.per_layer]
    # closed form: projections (2 or 4 d^2 per token), scores and values 4 T^2 d, MLP 16 T d^2
    proj = 8 if block == "parallel" else 4
    assert report.per_layer == [proj * T * D * D + 4 * T * T * D + 16 * T * D * D] * 2


def test_value_matrix_flops_match_flop_counter(tiny_cfg):
    T = 16
    cfg = _cfg(tiny_cfg, "sasp", value_matrix=True)
    measured = _measured(build_model(cfg), _tokens(1, T))
    report = count_flops(cfg, T)
    assert abs(report.forward_flops - measured) <= 0.01 * measured, (report.forward_flops, measured)
    assert report.per_layer == [p + 2 * T * D * D for p in count_flops(_cfg(tiny_cfg, "sasp"), T).per_layer]


# -- 10. option validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(("block", "options", "name"), [
    ("sas", {"block_norm": "yes"}, "block_norm"),
    ("sasp", {"block_norm": 1}, "block_norm"),
    ("parallel", {"block_norm": "yes"}, "block_norm"),
    ("preln", {"block_norm": None}, "block_norm"),
    ("sas", {"beta_ff": "0.1"}, "beta_ff"),
    ("sasp", {"beta_ff": True}, "beta_ff"),
    ("sasp", {"beta_sa": "1"}, "beta_sa"),
    ("sas", {"beta_sa": None}, "beta_sa"),
    ("sasp", {"value_matrix": 1}, "value_matrix"),
    ("parallel", {"value_matrix": True}, "value_matrix"),  # standard attention has its own value matrix
    ("parallel", {"beta_ff": 0.1}, "beta_ff"),  # parallel has no gains: unknown option
])
def test_bad_options_raise_one_line_config_error(tiny_cfg, block, options, name):
    msg = one_line_error(lambda: build_model(_cfg(tiny_cfg, block, **options)))
    assert name in msg and "layers[0]" in msg


@pytest.mark.parametrize(("block", "options"), [
    ("sas", {"block_norm": False, "beta_ff": 0, "beta_sa": 2}), ("sasp", {"beta_ff": 0.2, "value_matrix": True}),
    ("parallel", {"block_norm": False}), ("preln", {"block_norm": True}),
])
def test_good_options_build(tiny_cfg, block, options):
    model = build_model(_cfg(tiny_cfg, block, **options))
    assert type(model.layers[0].block) is {**BLOCK_CLASSES, "preln": PreLNBlock}[block]


# -- 11. encoder -------------------------------------------------------------------------------------
def test_presets():
    for size, dims in SIZES.items():
        for block in ("parallel", "sas", "sasp"):
            cfg = preset(f"{size}-{block}")
            assert cfg.kind == "decoder" and [s.block for s in cfg.layer_specs()] == [block] * dims["n_layers"]
            assert (cfg.d_model, cfg.n_heads) == (dims["d_model"], dims["n_heads"])
            # shaped blocks: a value matrix in layer 0 only (the official SAS / SAS-P configuration)
            values = [s.options.get("value_matrix", False) for s in cfg.layer_specs()]
            first_only = [True] + [False] * (dims["n_layers"] - 1)
            assert values == (first_only if block != "parallel" else [False] * len(values))
        for name, block in ((f"{size}-bert", "preln"), (f"{size}-bert-sasp", "sasp")):
            cfg = preset(name)
            assert cfg.kind == "encoder" and {s.block for s in cfg.layer_specs()} == {block}
            assert cfg.layer_specs()[0].options.get("value_matrix", False) == (block == "sasp")


def test_sasp_encoder_trains_on_masked_lm_and_attends_both_ways(tiny_cfg):
    cfg = _cfg(tiny_cfg, "sasp", kind="encoder")
    model = build_model(cfg).double()
    B, T = 2, 10
    tokens = _tokens(B, T)
    targets = torch.full((B, T), IGNORE_INDEX)
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked[:, [1, 4, 8]] = True
    targets[masked] = tokens[masked]
    out = model(tokens, targets)
    ref = F.cross_entropy(out.logits[masked], tokens[masked])
    torch.testing.assert_close(out.loss.double(), ref, rtol=0, atol=1e-6)  # the loss is taken in float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.split(".")[-1] in GAINS or name.endswith("qk.weight"):
            assert p.grad.abs().max() > 0, name
    # at init shaped attention is the identity (no mixing); move the queries, then position 0 sees the end
    _perturb(model)
    with torch.no_grad():
        base = model(tokens).logits
        changed = tokens.clone()
        changed[:, -1] = (tokens[:, -1] + 7) % V
        assert (model(changed).logits[:, 0] - base[:, 0]).abs().max() > 1e-6
        # the same model as a decoder does not look ahead
        decoder = build_model(_cfg(tiny_cfg, "sasp")).double()
        decoder.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mlm_head")})
        dbase = decoder(tokens).logits
        torch.testing.assert_close(decoder(changed).logits[:, :-1], dbase[:, :-1], rtol=0, atol=1e-12)
