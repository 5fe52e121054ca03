"""The dense router: every token gets the block. The baseline every technique is measured against."""

from __future__ import annotations

import torch
from torch import nn

from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context
from condformer.registry import ROUTERS


@ROUTERS.register("dense")
class DenseRouter(nn.Module):
    """``x + block(x)`` for every token."""

    options: tuple[str, ...] = ()  # the LayerSpec.options keys this component understands

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        # skipless blocks (SAS, SAS-P) replace x: take their output as is rather than x + (output - x)
        self.skipless = hasattr(block, "output")

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.skipless:
            return self.block.output(x_BTD, ctx)
        return x_BTD + self.block(x_BTD, ctx)

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Only the block's keys and values for ``x`` (tokens that exited below this layer)."""
        self.block.append_kv(x_BTD, ctx)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, seq_len: int, block_flops) -> int:
        """Forward FLOPs of the layer for one sequence of ``seq_len`` tokens."""
        return block_flops(seq_len, seq_len)
