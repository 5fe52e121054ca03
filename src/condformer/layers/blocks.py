"""Block types. A block returns its residual-free *update*, not ``x + update``.

Returning the update is the contract that lets a router decide what to do with it: the dense router
adds it to every token, a Mixture-of-Depths router adds ``r * update`` to the chosen tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context
from condformer.layers.attention import SelfAttention
from condformer.layers.norms import block_norm
from condformer.options import ComponentOptions
from condformer.registry import BLOCKS, FFNS


@dataclass
class PreLN(ComponentOptions):
    """Options of the pre-LN block: ``block_norm`` false drops its norms (but a LayerNorm at layer 0's input)."""

    axis: ClassVar[str] = "block"
    component: ClassVar[str] = "preln"

    block_norm: bool = True


@BLOCKS.register("preln")
class PreLNBlock(nn.Module):
    """Pre-LN block (Xiong et al. 2020), as in GPT-2/3 and Llama::

        x ──┬──────────────────────┬─(+)──┬───────────────────────┬─(+)──> x + update
            └─ norm ─ attention ───┘      └─ norm ─ FFN ──────────┘
    """

    Options = PreLN

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__()
        self.pre_attn_norm = block_norm(cfg, spec, layer_index)
        self.attn = SelfAttention(cfg)
        self.pre_ffn_norm = block_norm(cfg, spec, layer_index, first=False)
        self.ffn = FFNS.get(spec.ffn)(cfg, spec, layer_index)

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        a = self.attention_update(x_BTD, ctx)
        return a + self.ffn_update(x_BTD, a, ctx)

    # the two halves, for a router that computes attention for every token but the FFN for some (MoD routed 'ffn')
    def attention_update(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.attn(self.pre_attn_norm(x_BTD), ctx)

    def ffn_update(self, x_BTD: torch.Tensor, a_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The FFN's update given the block input ``x`` and the attention's update ``a`` (it reads x + a)."""
        return self.ffn(self.pre_ffn_norm(x_BTD + a_BTD), ctx)

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Keys and values of ``x`` for the cache, without the rest of the block (exited tokens)."""
        self.attn.append_kv(self.pre_attn_norm(x_BTD), ctx)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, n_queries: int, n_keys: int) -> int:
        return SelfAttention.flops(cfg, n_queries, n_keys) + FFNS.get(spec.ffn).flops(cfg, spec, n_queries)
