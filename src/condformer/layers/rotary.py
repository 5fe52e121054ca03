"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864) at arbitrary token positions.

Angles are computed from each token's *original* position, never from its index in the tensor, so a
subset of tokens (a Mixture-of-Depths selection, a cached decode step, a left-padded prompt) keeps the
same relative distances as in the full sequence.

Pretrained models stretch the frequencies to reach longer contexts than they were trained on; two schemes
are supported exactly (``ModelConfig.rope_scaling``): ``linear`` (position interpolation, Chen et al. 2023:
every frequency divided by ``factor``) and ``llama3`` (Llama 3.1: long wavelengths divided by ``factor``,
short ones kept, the band between interpolated smoothly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inv_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """The rotation frequency of each channel pair, float64, after ``scaling`` (None: plain RoPE)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    # llama3: by wavelength relative to the original context length
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, interpolated, out)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("inv_freq", inv_frequencies(head_dim, base, scaling).float(), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies in place (a model built on the meta device and then allocated has none:
        :mod:`condformer.parallel.meta_init`)."""
        with torch.no_grad():
            self.inv_freq.copy_(inv_frequencies(self.head_dim, self.base, self.scaling).float())

    def cos_sin(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles, (B, 1, T, d/2) in ``dtype``."""
        inv_freq = self.inv_freq
        if dtype == torch.float64:  # the buffer holds float32-rounded frequencies; recompute them exactly
            inv_freq = inv_frequencies(self.head_dim, self.base, self.scaling, positions_BT.device)
        angles_BTh = positions_BT.to(inv_freq.dtype)[..., None] * inv_freq
        return angles_BTh.cos()[:, None].to(dtype), angles_BTh.sin()[:, None].to(dtype)

    def forward(self, x_BHTd: torch.Tensor, positions_BT: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        """Rotate channel pairs (i, i + d/2) of ``x`` by ``position * inv_freq[i]``.

        ``memo`` (a forward's :attr:`Context.memo`): the angles of one positions tensor are computed once and
        reused by every layer with the same rotary settings, for queries and keys alike. Not under
        torch.compile, whose graph shares them anyway.
        """
        if memo is None or torch.compiler.is_compiling():
            cos, sin = self.cos_sin(positions_BT, x_BHTd.dtype)
        else:
            key = ("rotary", id(positions_BT), self.head_dim, self.base, repr(self.scaling), x_BHTd.dtype)
            hit = memo.get(key)
            if hit is None or hit[0] is not positions_BT:  # the id of a freed tensor may be reused
                hit = (positions_BT, *self.cos_sin(positions_BT, x_BHTd.dtype))
                memo[key] = hit
            _, cos, sin = hit
        x1, x2 = x_BHTd.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
