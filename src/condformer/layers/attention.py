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
    """Fused QKV projection, rotary embeddings at original positions, SDPA, output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        # GPT-2 scaled init of residual-branch outputs: std / sqrt(2 * n_layers)
        nn.init.normal_(self.out.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.rotary(q, ctx.positions_BT)  # (B, H, T, d)
        k = self.rotary(k, ctx.positions_BT)
        y = self.attend(q, k, v, ctx)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Only the keys and values of ``x`` into the layer's cache (no query, no output): an exited token's."""
        B, T, D = x_BTD.shape
        k, v = F.linear(x_BTD, self.qkv.weight[D:]).view(B, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx.kv.append(self.rotary(k, ctx.positions_BT), v, ctx.positions_BT, ctx.valid_BT)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """SDPA over this step's keys plus the layer's cached ones; fused causal path when possible."""
        kv = ctx.kv
        if kv is not None:
            k, v, k_pos, k_valid = kv.append(k, v, ctx.positions_BT, ctx.valid_BT)
            mask = attention_mask(ctx.positions_BT, k_pos, k_valid, ctx.causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if ctx.contiguous and ctx.valid_BT is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal)
        mask = attention_mask(ctx.positions_BT, ctx.positions_BT, ctx.valid_BT, ctx.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def flops(cfg: ModelConfig, n_queries: int, n_keys: int) -> int:
        """Forward FLOPs: QKV and output projections for the queries, scores and weighted values.

        Scores are counted over the full (queries x keys) rectangle, causal or not: that is what SDPA's
        math and CPU kernels compute and what FlopCounterMode reports.
        """
        d = cfg.d_model
        proj = 2 * n_queries * d * 3 * d + 2 * n_queries * d * d
        return proj + 2 * 2 * n_queries * n_keys * d
