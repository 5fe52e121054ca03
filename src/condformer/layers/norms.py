"""Normalisation layers, named by position at the call site (``pre_attn_norm``, ``final_norm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without centring, one gain per channel."""

    no_weight_decay = ("weight",)

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm; its gain and bias are excluded from weight decay."""

    no_weight_decay = ("weight", "bias")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'")  # unreachable after ModelConfig.validate


def block_norm(cfg, spec, layer_index: int, first: bool = True) -> nn.Module:  # noqa: ANN001
    """A block's norm, or the identity for the no-norm variant (``spec.options["block_norm"] = False``).

    The no-norm variant keeps one LayerNorm at the input of layer 0, as He & Hofmann (2024) do, so the
    embeddings enter the stack at a sane scale; the final norm before the head is the model's, always kept.
    """
    if spec.options.get("block_norm", True):
        return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
    if layer_index == 0 and first:
        return LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.Identity()
