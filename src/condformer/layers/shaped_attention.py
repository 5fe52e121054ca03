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


def running_sum(v_BTHd: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """C V for a contiguous sequence along dim 1, as (sum, 1/count): C V = sum * 1/count.

    Causal: the cumulative sum and 1/(t+1) as (1, T, 1, 1); encoder: the total (broadcast along T) and 1/T.
    """
    T = v_BTHd.shape[1]
    if not causal:
        return v_BTHd.sum(dim=1, keepdim=True), v_BTHd.new_full((), 1.0 / T)
    counts = torch.arange(1, T + 1, device=v_BTHd.device, dtype=v_BTHd.dtype)
    return v_BTHd.cumsum(dim=1), counts.reciprocal().view(1, T, 1, 1)


class ShapedAttention(nn.Module):
    """Query/key projections only, rotary at original positions, ``alpha V + beta SDPA(Q,K,V) - gamma C V``."""

    no_weight_decay = ("alpha", "beta", "gamma")

    def __init__(self, cfg: ModelConfig, value_matrix: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_size
        d = cfg.d_model
        # Optional W_V = I + W with W zero-initialised (the official SAS/SAS-P configuration uses it in the
        # first layer only): still the identity at init, but it lets attention write what it gathers into
        # other channels than the ones it read, which identity values cannot do.
        self.value = nn.Linear(d, d, bias=False) if value_matrix else None
        if self.value is not None:
            nn.init.zeros_(self.value.weight)
        self.qk = nn.Linear(d, 2 * d, bias=False)
        with torch.no_grad():
            self.qk.weight[:d].zero_()  # zero queries: A = C at init, so the sub-block is the identity
            nn.init.normal_(self.qk.weight[d:], std=cfg.init_std)
        shape = (1, cfg.n_heads, 1, 1)
        self.alpha = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.ones(shape))
        self.gamma = nn.Parameter(torch.ones(shape))
        self.rotary = Rotary(cfg.head_size, cfg.rope_base, cfg.rope_scaling) if cfg.positions == "rope" else None

    def forward(self, x_BTD: torch.Tensor, ctx: Context, gain: torch.Tensor | None = None) -> torch.Tensor:
        """Shaped attention of ``x``, times ``gain`` (a scalar such as the block's beta_SA) if given.

        The gain is folded into the three per-head coefficients (tiny tensors), and the causal running
        mean's 1/count into gamma's, so the output costs three elementwise passes over (B, T, D): alpha V,
        + gamma' cumsum(V), + beta A V. On a CPU these passes, not the matmuls, are what a shaped block
        gives back of its FLOP saving, so every one counts.
        """
        B, T, D = x_BTD.shape
        H, d = self.n_heads, self.head_dim
        q, k = self.qk(x_BTD).view(B, T, 2, H, d).permute(2, 0, 3, 1, 4)
        if self.value is not None:
            x_BTD = x_BTD + self.value(x_BTD)
        x_BTHd = x_BTD.view(B, T, H, d).to(q.dtype)
        v = x_BTHd.transpose(1, 2)  # W_V = I: head h's values are the h-th slice of the input
        if self.rotary is not None:
            q = self.rotary(q, ctx.positions_BT, ctx.memo)
            k = self.rotary(k, ctx.positions_BT, ctx.memo)
        alpha, beta, gamma = (g.view(1, 1, H, 1) for g in (self.alpha, self.beta, self.gamma))
        if gain is not None:
            alpha, beta, gamma = alpha * gain, beta * gain, gamma * gain
        attended_BHTd, summed_BTHd, inv_count = self._attend(q, k, v, ctx, x_BTHd)
        # (B, T, H, d) layout throughout, so the result needs no copy to become (B, T, D) (W_P = I); the
        # in-place addcmuls are safe for autograd (nothing saved the running value of y)
        y = x_BTHd * alpha
        y.addcmul_(summed_BTHd, gamma * inv_count, value=-1)
        y.addcmul_(attended_BHTd.transpose(1, 2), beta)
        return y.view(B, T, D)

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Only the keys and values of ``x`` into the layer's cache (W_V = I: the values are ``x`` itself)."""
        B, T, D = x_BTD.shape
        k = F.linear(x_BTD, self.qk.weight[D:]).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.value is not None:
            x_BTD = x_BTD + self.value(x_BTD)
        v = x_BTD.view(B, T, self.n_heads, self.head_dim).to(k.dtype).transpose(1, 2)
        ctx.kv.append(k if self.rotary is None else self.rotary(k, ctx.positions_BT, ctx.memo), v, ctx.positions_BT,
                      ctx.valid_BT)

    @staticmethod
    def unsupported(cfg: ModelConfig) -> str | None:
        """What of the config's attention this module cannot do (None: all of it); see the refusal table."""
        what = [name for name, bad in (("n_kv_heads", cfg.kv_heads != cfg.n_heads),
                                       ("head_dim", cfg.attn_dim != cfg.d_model), ("qk_norm", cfg.qk_norm),
                                       ("qkv_bias", cfg.qkv_bias), ("attn_out_bias", cfg.attn_out_bias)) if bad]
        return ", ".join(what) or None

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                x_BTHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A V as (B, H, T, d), and C V = S * inv_count with S as (B, T, H, d), over this step's keys plus
        the layer's cached ones. Keeping S and 1/count apart lets the caller fold 1/count into gamma."""
        kv = ctx.kv
        if kv is not None:
            k, v, k_pos, k_valid = kv.append(k, v, ctx.positions_BT, ctx.valid_BT)
            mask = attention_mask(ctx.positions_BT, k_pos, k_valid, ctx.causal)
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), masked_mean(mask, v).transpose(1, 2),
                    v.new_ones(()))
        if ctx.contiguous and ctx.valid_BT is None:  # the running sum along T of the contiguous input
            summed, inv_count = running_sum(x_BTHd, ctx.causal)
            return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal), summed, inv_count
        mask = attention_mask(ctx.positions_BT, ctx.positions_BT, ctx.valid_BT, ctx.causal)
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask), masked_mean(mask, v).transpose(1, 2),
                v.new_ones(()))

    @staticmethod
    def flops(cfg: ModelConfig, n_queries: int, n_keys: int, value_matrix: bool = False) -> int:
        """Query and key projections, scores and weighted values; no output projection, no value
        projection unless ``value_matrix``.

        The running mean is elementwise work (not counted, like softmax); the masked-mean paths add a
        (queries x keys) product that only padding, routed fillers and decoding need.
        """
        d = cfg.d_model
        return 2 * n_queries * d * (3 if value_matrix else 2) * d + 2 * 2 * n_queries * n_keys * d
