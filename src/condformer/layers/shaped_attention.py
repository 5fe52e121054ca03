"""Shaped attention (He & Hofmann 2024, arXiv 2311.01906): attention that starts as the identity.

Per head h, with A_h the usual (causal) softmax attention and C the uniform attention over the same
allowed keys::

    out_h = (alpha_h * I + beta_h * A_h - gamma_h * C) V_h

alpha, beta, gamma are trainable per-head scalars initialised to 1 and the query weights start at zero,
so at initialisation A = C and the sub-block is exactly the identity. There are no value or output
projections (W_V = W_P = I): V_h is the h-th slice of the block's (normalised) input, which removes 2 d^2
parameters per block.

We never build the T x T matrix: A V is one fused SDPA call and C V is the running mean of V over the
allowed keys (a cumulative sum for a causal contiguous sequence, the plain mean for an encoder, and a
masked mean where padding, a routed subset's fillers or a KV cache make the allowed set irregular).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import ModelConfig
from condformer.context import Context
from condformer.layers.attention import attention_mask
from condformer.layers.rotary import Rotary


def masked_mean(mask_B1TS: torch.Tensor, v_BHSd: torch.Tensor) -> torch.Tensor:
    """Mean of v over the keys each query may attend to: (mask @ v) / mask.sum."""
    w = mask_B1TS.to(v_BHSd.dtype)
    return (w @ v_BHSd) / w.sum(dim=-1, keepdim=True).clamp(min=1)


def running_mean(v_BHTd: torch.Tensor, causal: bool) -> torch.Tensor:
    """C V for a contiguous sequence: the causal running mean, or the full mean for an encoder."""
    if not causal:
        return v_BHTd.mean(dim=2, keepdim=True).expand_as(v_BHTd)
    T = v_BHTd.shape[2]
    counts = torch.arange(1, T + 1, device=v_BHTd.device, dtype=v_BHTd.dtype)
    return v_BHTd.cumsum(dim=2) / counts[:, None]


class ShapedAttention(nn.Module):
    """Query/key projections only, rotary at original positions, ``alpha V + beta SDPA(Q,K,V) - gamma C V``."""

    no_weight_decay = ("alpha", "beta", "gamma")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        d = cfg.d_model
        self.qk = nn.Linear(d, 2 * d, bias=False)
        with torch.no_grad():
            self.qk.weight[:d].zero_()  # zero queries: A = C at init, so the sub-block is the identity
            nn.init.normal_(self.qk.weight[d:], std=cfg.init_std)
        shape = (1, cfg.n_heads, 1, 1)
        self.alpha = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.ones(shape))
        self.gamma = nn.Parameter(torch.ones(shape))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k = self.qk(x_BTD).view(B, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = x_BTD.view(B, T, self.n_heads, self.head_dim).transpose(1, 2).to(q.dtype)  # W_V = I
        q = self.rotary(q, ctx.positions_BT)
        k = self.rotary(k, ctx.positions_BT)
        attended, mean = self._attend(q, k, v, ctx)
        y = self.alpha * v + self.beta * attended - self.gamma * mean
        return y.transpose(1, 2).reshape(B, T, D)  # W_P = I

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """(A V, C V) over this step's keys plus the layer's cached ones."""
        kv = ctx.kv
        if kv is not None:
            k, v, k_pos, k_valid = kv.append(k, v, ctx.positions_BT, ctx.valid_BT)
            mask = attention_mask(ctx.positions_BT, k_pos, k_valid, ctx.causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), masked_mean(mask, v)
        if ctx.contiguous and ctx.valid_BT is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal), running_mean(v, ctx.causal)
        mask = attention_mask(ctx.positions_BT, ctx.positions_BT, ctx.valid_BT, ctx.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), masked_mean(mask, v)

    @staticmethod
    def flops(cfg: ModelConfig, n_queries: int, n_keys: int) -> int:
        """Query and key projections, scores and weighted values; no value or output projection.

        The running mean is elementwise work (not counted, like softmax); the masked-mean paths add a
        (queries x keys) product that only padding, routed fillers and decoding need.
        """
        d = cfg.d_model
        return 2 * n_queries * d * 2 * d + 2 * 2 * n_queries * n_keys * d
