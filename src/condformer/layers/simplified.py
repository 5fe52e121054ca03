"""Simplified blocks (He & Hofmann 2024, arXiv 2311.01906): parallel, SAS and SAS-P.

Each returns the residual-free update the router contract asks for. SAS and SAS-P have no skip
connection: their output *replaces* x (the identity path is shaped attention's alpha * I), so their
update is ``out - x`` and the dense router's ``x + update`` is ``out``. They also offer ``output(x)``,
which the dense router calls instead, to skip the two passes of subtracting and adding x back::

    parallel: out = x + Attn(N1 x) + FFN(N1 x)                     one shared norm
    sas:      h = beta_SA * ShapedAttn(N1 x);  out = h + beta_FF * FFN(N2 h)
    sasp:     out = beta_SA * ShapedAttn(N1 x) + beta_FF * FFN(N1 x)

Options (``LayerSpec.options``): ``block_norm`` (default true; false drops the block's norms, except a
LayerNorm at the input of layer 0, the paper's no-norm variant), ``beta_ff`` (initial FFN gain, default
0.1) and ``beta_sa`` (initial attention gain, default 1), both trainable and excluded from weight decay, and
``value_matrix`` (default false; true gives the shaped attention W_V = I + W with W zero at init, which the
``<size>-sas``/``-sasp`` presets use in layer 0 only, as the official configuration does). Any FFN from the
registry works (MLP, MoE); any router wraps these blocks.
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
from condformer.layers.shaped_attention import ShapedAttention
from condformer.options import ComponentOptions
from condformer.refusals import refuse
from condformer.registry import BLOCKS, FFNS


@dataclass
class Parallel(ComponentOptions):
    """Options of the parallel block: ``block_norm`` false drops its shared norm (the paper's no-norm variant)."""

    axis: ClassVar[str] = "block"
    component: ClassVar[str] = "parallel"

    block_norm: bool = True


@dataclass
class SAS(ComponentOptions):
    """Options of the skipless SAS block: ``LayerSpec(block=SAS(beta_ff=0.1))``.

    block_norm: false drops the block's norms. beta_ff / beta_sa: initial FFN and attention gains (trainable,
    no weight decay). value_matrix: the shaped attention's W_V = I + W (W zero at init) instead of W_V = I.
    """

    axis: ClassVar[str] = "block"
    component: ClassVar[str] = "sas"

    block_norm: bool = True
    beta_ff: float = 0.1
    beta_sa: float = 1.0
    value_matrix: bool = False


@dataclass
class SASP(SAS):
    """Options of the skipless parallel SAS-P block (the same settings as :class:`SAS`)."""

    component: ClassVar[str] = "sasp"


@BLOCKS.register("parallel")
class ParallelBlock(nn.Module):
    """Attention and FFN side by side on one shared norm (GPT-J, PaLM): ``Attn(N x) + FFN(N x)``."""

    Options = Parallel

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__()
        self.norm = block_norm(cfg, spec, layer_index)
        self.attn = SelfAttention(cfg)
        self.ffn = FFNS.get(spec.ffn)(cfg, spec, layer_index)

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        z = self.norm(x_BTD)
        return self.attn(z, ctx) + self.ffn(z, ctx)

    # the two halves, for a router that computes attention for every token but the FFN for some (MoD routed 'ffn')
    def attention_update(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.attn(self.norm(x_BTD), ctx)

    def ffn_update(self, x_BTD: torch.Tensor, a_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The FFN's update: it reads the block input (in parallel with attention), not x + a."""
        return self.ffn(self.norm(x_BTD), ctx)

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Keys and values of ``x`` for the cache, without the rest of the block (exited tokens)."""
        self.attn.append_kv(self.norm(x_BTD), ctx)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, n_queries: int, n_keys: int) -> int:
        return SelfAttention.flops(cfg, n_queries, n_keys) + FFNS.get(spec.ffn).flops(cfg, spec, n_queries)


class _ShapedBlock(nn.Module):
    Options: type[SAS] = SAS
    no_weight_decay = ("beta_ff", "beta_sa")

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__()
        self.norm1 = block_norm(cfg, spec, layer_index)
        o = self.Options.of(spec, f"layers[{layer_index}]")
        self.attn = ShapedAttention(cfg, value_matrix=o.value_matrix)
        self.ffn = FFNS.get(spec.ffn)(cfg, spec, layer_index)
        self.beta_ff = nn.Parameter(torch.tensor(float(o.beta_ff)))
        self.beta_sa = nn.Parameter(torch.tensor(float(o.beta_sa)))

    def output(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The block's output, which replaces ``x`` (no skip connection)."""
        raise NotImplementedError

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.output(x_BTD, ctx) - x_BTD

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Keys and values of ``x`` for the cache, without the rest of the block (exited tokens)."""
        self.attn.append_kv(self.norm1(x_BTD), ctx)

    @staticmethod
    def validate_spec(spec: LayerSpec, cfg: ModelConfig, layer_index: int) -> None:
        what = ShapedAttention.unsupported(cfg)
        if what is not None:
            raise refuse("shaped_attention_heads", where=f"layers[{layer_index}]", block=spec.block, what=what)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, n_queries: int, n_keys: int) -> int:
        return (ShapedAttention.flops(cfg, n_queries, n_keys, SAS.of(spec).value_matrix)
                + FFNS.get(spec.ffn).flops(cfg, spec, n_queries))


@BLOCKS.register("sas")
class SASBlock(_ShapedBlock):
    """Skipless attention, sequential: ``h = beta_SA * ShapedAttn(N1 x); out = h + beta_FF * FFN(N2 h)``."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__(cfg, spec, layer_index)
        self.norm2 = block_norm(cfg, spec, layer_index, first=False)

    def output(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = self.attn(self.norm1(x_BTD), ctx, gain=self.beta_sa)
        return torch.addcmul(h, self.ffn(self.norm2(h), ctx), self.beta_ff).to(x_BTD.dtype)


@BLOCKS.register("sasp")
class SASPBlock(_ShapedBlock):
    """Skipless attention, parallel, no skip at all: ``beta_SA * ShapedAttn(N1 x) + beta_FF * FFN(N1 x)``."""

    Options = SASP

    def output(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        z = self.norm1(x_BTD)
        # the attention's fresh output takes the FFN in place (beta_SA is folded into its coefficients)
        return self.attn(z, ctx, gain=self.beta_sa).addcmul_(self.ffn(z, ctx), self.beta_ff).to(x_BTD.dtype)
