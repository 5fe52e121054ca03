"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) at arbitrary token positions.

Angles are computed from each token's *original* position, never from its index in the tensor, so a
subset of tokens (a Mixture-of-Depths selection, a cached decode step, a left-padded prompt) keeps the
same relative distances as in the full sequence.
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x_BHTd: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
        """Rotate channel pairs (i, i + d/2) of ``x`` by ``position * inv_freq[i]``."""
        inv_freq = self.inv_freq
        if x_BHTd.dtype == torch.float64:  # the buffer holds float32-rounded frequencies; recompute them exactly
            inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64,
                                                   device=x_BHTd.device) / self.head_dim)
        angles_BTh = positions_BT.to(inv_freq.dtype)[..., None] * inv_freq
        cos = angles_BTh.cos()[:, None].to(x_BHTd.dtype)  # (B, 1, T, d/2)
        sin = angles_BTh.sin()[:, None].to(x_BHTd.dtype)
        x1, x2 = x_BHTd.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
