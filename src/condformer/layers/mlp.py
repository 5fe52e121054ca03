"""Feed-forward sub-blocks: GELU MLP (exact, or GPT-2's tanh approximation) and SwiGLU (Shazeer 2020,
arXiv 2002.05202)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import LayerSpec, ModelConfig
from condformer.registry import FFNS


@FFNS.register("mlp")
class MLP(nn.Module):
    """``down(act(up(x)))``; with ``mlp="swiglu"``: ``down(silu(gate(x)) * up(x))``.

    SwiGLU's gate and up projections are one matrix (gate rows first): one matmul instead of two.
    ``mlp_bias`` adds biases to every projection (GPT-2); ``mlp="gelu_tanh"`` is GPT-2's GELU.

    The down projection is initialised with std / sqrt(2 * n_layers) (GPT-2): each layer adds two
    residual branches, and this keeps the residual stream's variance independent of depth.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        self.up = nn.Linear(d, 2 * f if self.swiglu else f, bias=cfg.mlp_bias)
        self.down = nn.Linear(f, d, bias=cfg.mlp_bias)
        nn.init.normal_(self.up.weight, std=cfg.init_std)
        nn.init.normal_(self.down.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        for bias in (self.up.bias, self.down.bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x_BTD: torch.Tensor, ctx: object = None) -> torch.Tensor:
        h = self.up(x_BTD)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.down(h)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, n_tokens: int) -> int:
        """Forward FLOPs for ``n_tokens`` tokens (matmuls only, 2mnk each)."""
        n_mats = 3 if cfg.mlp == "swiglu" else 2
        return 2 * n_tokens * cfg.d_model * cfg.ffn_dim * n_mats
