"""SelfAttention against a naive float64 implementation: full sequences, gathered subsets, left padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from condformer.context import Context
from condformer.layers.attention import SelfAttention, attention_mask


def _rotate(x_Td: torch.Tensor, pos_T: torch.Tensor, base: float) -> torch.Tensor:
    """Independent rotary: pairs (i, i + d/2) as complex numbers times exp(1j * pos * base^(-2i/d))."""
    d = x_Td.shape[-1]
    h = d // 2
    z = torch.complex(x_Td[..., :h], x_Td[..., h:])
    theta = torch.tensor([base ** (-2 * i / d) for i in range(h)], dtype=torch.float64)
    angles = pos_T.double()[:, None] * theta
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def naive_attention(attn: SelfAttention, x_BTD: torch.Tensor, pos_BT: torch.Tensor, causal: bool,
                    valid_BT: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Per row, per head, per query: explicit masked softmax(q.k / sqrt(hd)) over allowed keys, in float64."""
    B, T, D = x_BTD.shape
    H = attn.n_heads
    hd = D // H
    W = attn.qkv.weight.detach().double()
    Wq, Wk, Wv = W[:D], W[D:2 * D], W[2 * D:]
    Wo = attn.out.weight.detach().double()
    x = x_BTD.double()
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        q_all, k_all, v_all = x[b] @ Wq.T, x[b] @ Wk.T, x[b] @ Wv.T
        heads = []
        for h in range(H):
            sl = slice(h * hd, (h + 1) * hd)
            q = _rotate(q_all[:, sl], pos_BT[b], base)
            k = _rotate(k_all[:, sl], pos_BT[b], base)
            v = v_all[:, sl]
            y = torch.zeros(T, hd, dtype=torch.float64)
            for t in range(T):
                allowed = [s for s in range(T)
                           if (not causal or pos_BT[b, s] <= pos_BT[b, t])
                           and (valid_BT is None or bool(valid_BT[b, s]))]
                if not allowed:
                    continue  # a query with nothing to attend to: its output is unspecified
                scores = torch.stack([(q[t] * k[s]).sum() / math.sqrt(hd) for s in allowed])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                y[t] = sum(w[j] * v[s] for j, s in enumerate(allowed))
            heads.append(y)
        out[b] = torch.cat(heads, dim=-1) @ Wo.T
    return out


def _attn(tiny_cfg, **overrides) -> SelfAttention:
    attn = SelfAttention(tiny_cfg(**overrides)).double()
    with torch.no_grad():  # larger weights give peaked attention, so masking mistakes are visible
        attn.qkv.weight.mul_(20)
        attn.out.weight.normal_()
    return attn


@pytest.mark.parametrize("causal", [True, False])
def test_full_sequence_matches_naive(tiny_cfg, causal):
    attn = _attn(tiny_cfg)
    B, T = 2, 11
    x = torch.randn(B, T, 32, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    y = attn(x, Context(positions_BT=pos, causal=causal))  # contiguous: the fused is_causal path
    torch.testing.assert_close(y, naive_attention(attn, x, pos, causal), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_explicit_positions_match_naive(tiny_cfg, causal):
    attn = _attn(tiny_cfg, rope_base=500.0)
    B, T = 2, 9
    x = torch.randn(B, T, 32, dtype=torch.float64)
    pos = torch.stack([torch.arange(T) + 5, torch.randperm(40)[:T]])  # an offset row and a shuffled row
    y = attn(x, Context(positions_BT=pos, causal=causal, contiguous=False))
    torch.testing.assert_close(y, naive_attention(attn, x, pos, causal, base=500.0), rtol=1e-9, atol=1e-10)


def test_gathered_subset_uses_original_positions(tiny_cfg):
    attn = _attn(tiny_cfg)
    B, T, K = 2, 16, 6
    x = torch.randn(B, T, 32, dtype=torch.float64)
    ctx = Context(positions_BT=torch.arange(T).expand(B, T), causal=True)
    idx = torch.stack([torch.randperm(T)[:K].sort().values for _ in range(B)])
    x_sub = x.gather(1, idx[..., None].expand(B, K, 32))
    sub = ctx.subset(idx)
    assert not sub.contiguous
    torch.testing.assert_close(sub.positions_BT, idx, rtol=0, atol=0)
    y = attn(x_sub, sub)
    torch.testing.assert_close(y, naive_attention(attn, x_sub, idx, causal=True), rtol=1e-9, atol=1e-10)
    # positions matter: the same tokens at compacted positions 0..K-1 give a different result
    compact = naive_attention(attn, x_sub, torch.arange(K).expand(B, K), causal=True)
    assert (y - compact).abs().max() > 1e-6


def test_subset_keeps_validity():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    ctx = Context(positions_BT=torch.arange(5).expand(2, 5), causal=True, valid_BT=valid)
    idx = torch.tensor([[1, 3], [0, 4]])
    sub = ctx.subset(idx)
    assert sub.valid_BT.tolist() == [[False, True], [True, True]]
    assert sub.positions_BT.tolist() == [[1, 3], [0, 4]]


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    pos = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        valid[b, T - n:] = True
        pos[b, T - n:] = torch.arange(n)
    return valid, pos


@pytest.mark.parametrize("causal", [True, False])
def test_left_padding(tiny_cfg, causal):
    attn = _attn(tiny_cfg)
    lengths = [7, 3, 5, 1]
    valid, pos = _left_padded(lengths)
    B, T = valid.shape
    x = torch.randn(B, T, 32, dtype=torch.float64)
    y = attn(x, Context(positions_BT=pos, causal=causal, valid_BT=valid, contiguous=False))
    assert torch.isfinite(y).all()  # padding rows included
    # each row's real tokens give what they give alone, at positions 0..n-1
    for b, n in enumerate(lengths):
        alone = naive_attention(attn, x[b:b + 1, T - n:], torch.arange(n)[None], causal)
        torch.testing.assert_close(y[b:b + 1, T - n:], alone, rtol=1e-9, atol=1e-10)
    # pad keys are never attended by valid queries: changing the pad tokens changes no valid output
    x2 = torch.where(valid[..., None], x, 100 * torch.randn_like(x))
    y2 = attn(x2, Context(positions_BT=pos, causal=causal, valid_BT=valid, contiguous=False))
    torch.testing.assert_close(y2[valid], y[valid], rtol=0, atol=1e-12)
    assert torch.isfinite(y2).all()


def test_attention_mask_rules():
    q_pos = torch.tensor([[0, 1, 2, 3]])
    k_pos = torch.tensor([[0, 1, 2, 3]])
    k_valid = torch.tensor([[False, True, True, True]])
    m = attention_mask(q_pos, k_pos, k_valid, causal=True)
    assert m.shape == (1, 1, 4, 4)
    expected = torch.tensor([[True, True, True, True],  # query 0 has no allowed key: allowed everything
                             [False, True, False, False],
                             [False, True, True, False],
                             [False, True, True, True]])
    assert m[0, 0].tolist() == expected.tolist()
    m = attention_mask(q_pos, k_pos, k_valid, causal=False)
    assert m[0, 0].tolist() == [[False, True, True, True]] * 4
    m = attention_mask(q_pos, k_pos, None, causal=True)
    assert m[0, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()


def test_query_with_no_allowed_key_stays_finite(tiny_cfg):
    attn = _attn(tiny_cfg)
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    valid = torch.tensor([[False, False, False, False]])  # an all-padding row
    pos = torch.zeros(1, 4, dtype=torch.long)
    for causal in (True, False):
        y = attn(x, Context(positions_BT=pos, causal=causal, valid_BT=valid, contiguous=False))
        assert torch.isfinite(y).all()
    # and the mask itself never hands SDPA an all-False row
    mask = attention_mask(torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), None, causal=True)
    assert mask.any(dim=-1).all()
    q = torch.randn(1, 1, 2, 4)
    assert torch.isfinite(F.scaled_dot_product_attention(q, q, q, attn_mask=mask)).all()
