"""Multi-head self-attention over SDPA, causal by original position, with an optional KV cache.

Shapes: B batch, T query tokens, S key tokens (T plus cached ones), H heads, d head_dim, D d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import ModelConfig
from condformer.context import Context
from condformer.layers.norms import RMSNorm
from condformer.layers.rotary import Rotary


def attention_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, k_valid_BS: torch.Tensor | None,
                   causal: bool) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): True where query t may attend to key s.

    Causality compares original positions, so it is right for gathered subsets and cached keys. A query
    with no allowed key (a padding token) is allowed everything instead: its output is ignored, and this
    keeps every kernel's output finite (some return NaN for an all-masked row).
    """
    allowed = torch.ones(q_pos_BT.shape[0], q_pos_BT.shape[1], k_pos_BS.shape[1], dtype=torch.bool,
                         device=q_pos_BT.device)
    if causal:
        allowed = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
    if k_valid_BS is not None:
        allowed = allowed & k_valid_BS[:, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


class SelfAttention(nn.Module):
    """Fused QKV projection, rotary embeddings at original positions, SDPA, output projection.

    Grouped-query attention (``n_kv_heads`` < ``n_heads``) stores and attends over fewer key/value heads,
    each shared by ``n_heads / n_kv_heads`` query heads (SDPA's ``enable_gqa``: no copies of the keys). The
    optional parts that pretrained families need (biases, a per-head q/k RMSNorm, explicit head width) are
    config fields, so a converted Llama, Qwen or GPT-2 layer is this module with its own weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.q_width, self.kv_width = cfg.attn_dim, cfg.kv_heads * cfg.head_size
        self.qkv = nn.Linear(cfg.d_model, self.q_width + 2 * self.kv_width, bias=cfg.qkv_bias)
        self.out = nn.Linear(self.q_width, cfg.d_model, bias=cfg.attn_out_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(self.head_dim, cfg.rope_base, cfg.rope_scaling) if cfg.positions == "rope" else None
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        # GPT-2 scaled init of residual-branch outputs: std / sqrt(2 * n_layers)
        nn.init.normal_(self.out.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        for bias in (self.qkv.bias, self.out.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def _heads(self, y_BTW: torch.Tensor, n: int, norm: nn.Module | None, ctx: Context) -> torch.Tensor:
        """(B, T, n * d) -> (B, n, T, d), normed per head and rotated when the config says so."""
        B, T, _ = y_BTW.shape
        y = y_BTW.view(B, T, n, self.head_dim)
        if norm is not None:
            y = norm(y)
        y = y.transpose(1, 2)
        return y if self.rotary is None else self.rotary(y, ctx.positions_BT, ctx.memo)

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split((self.q_width, self.kv_width, self.kv_width), dim=-1)
        q = self._heads(q, self.n_heads, self.q_norm, ctx)  # (B, H, T, d)
        k = self._heads(k, self.n_kv_heads, self.k_norm, ctx)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = self.attend(q, k, v, ctx)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Only the keys and values of ``x`` into the layer's cache (no query, no output): an exited token's."""
        B, T, _ = x_BTD.shape
        bias = None if self.qkv.bias is None else self.qkv.bias[self.q_width:]
        k, v = F.linear(x_BTD, self.qkv.weight[self.q_width:], bias).split(self.kv_width, dim=-1)
        k = self._heads(k, self.n_kv_heads, self.k_norm, ctx)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        ctx.kv.append(k, v, ctx.positions_BT, ctx.valid_BT)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """SDPA over this step's keys plus the layer's cached ones; fused causal path when possible."""
        kv = ctx.kv
        gqa = q.shape[1] != k.shape[1]
        if kv is not None:
            k, v, k_pos, k_valid = kv.append(k, v, ctx.positions_BT, ctx.valid_BT)
            if q.shape[2] == 1 and ctx.valid_BT is None and not kv.needs_mask:  # the next token: sees every entry
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            mask = attention_mask(ctx.positions_BT, k_pos, k_valid, ctx.causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if ctx.contiguous and ctx.valid_BT is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal, enable_gqa=gqa)
        mask = attention_mask(ctx.positions_BT, ctx.positions_BT, ctx.valid_BT, ctx.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    @staticmethod
    def flops(cfg: ModelConfig, n_queries: int, n_keys: int) -> int:
        """Forward FLOPs: QKV and output projections for the queries, scores and weighted values.

        Scores are counted over the full (queries x keys) rectangle, causal or not: that is what SDPA's
        math and CPU kernels compute and what FlopCounterMode reports. Grouped keys and values shrink only
        their projections: every query head still scores every key.
        """
        d, q_width = cfg.d_model, cfg.attn_dim
        qkv_width = q_width + 2 * cfg.kv_heads * cfg.head_size
        proj = 2 * n_queries * d * qkv_width + 2 * n_queries * q_width * d
        return proj + 2 * 2 * n_queries * n_keys * q_width
