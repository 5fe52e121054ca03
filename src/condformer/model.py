"""The backbone: embed -> layers -> final norm -> head. Nothing here knows about any per-layer technique.

Each layer is a router (from the registry) wrapped around a block (from the registry) whose FFN comes
from the registry too; which ones is decided by the config's per-layer :class:`LayerSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from condformer.cache import KVCache
from condformer.config import ModelConfig
from condformer.context import Context, Tally
from condformer.layers.norms import make_norm
from condformer.registry import BLOCKS, ROUTERS
from condformer.routing.altup import AltUp
from condformer.routing.early_exit import EarlyExit

IGNORE_INDEX = -100  # targets with this value (padding, unmasked MLM positions) carry no loss


@dataclass
class Output:
    """What a forward pass returns.

    logits: (B, T, V). loss: mean cross-entropy over targets != IGNORE_INDEX, or None without targets.
    aux_loss: sum of the auxiliary losses layers added (a zero scalar when none).
    aux_losses: each auxiliary loss by name. stats: routing statistics by ``layer{L}/{name}`` (tensors).
    traces: per-token tensors by ``layer{L}/{name}`` (e.g. routing decisions), only with ``trace=True``.
    objective: what training minimises instead of ``loss`` when they differ (early exits: the weighted mean of
        every exit's loss, while ``loss`` stays the last layer's); None when it is ``loss``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)
    traces: dict[str, torch.Tensor] = field(default_factory=dict)
    objective: torch.Tensor | None = None

    @property
    def train_loss(self) -> torch.Tensor:
        """The scalar a trainer backpropagates: the objective (or loss) plus the auxiliary losses."""
        return (self.loss if self.objective is None else self.objective) + self.aux_loss


def build_layer(cfg: ModelConfig, layer_index: int) -> nn.Module:
    spec = cfg.layer_specs()[layer_index]
    block = BLOCKS.get(spec.block)(cfg, spec, layer_index)
    return ROUTERS.get(spec.router)(cfg, spec, layer_index, block)


class MLMHead(nn.Module):
    """BERT's masked-LM transform before the vocabulary projection: dense -> GELU -> norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.head_in_dim
        self.dense = nn.Linear(width, width)
        self.norm = make_norm(cfg.norm, width, cfg.norm_eps)
        nn.init.normal_(self.dense.weight, std=cfg.init_std)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class Transformer(nn.Module):
    """A decoder (causal LM) or encoder (bidirectional, masked LM) built from a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(build_layer(cfg, i) for i in range(cfg.n_layers))
        # the one stream-level technique: AltUp keeps K d-wide blocks around the same layers
        self.altup = AltUp(cfg) if cfg.altup is not None else None
        # depth-adaptive: exit heads after chosen layers and the exit-aware layer loop
        self.exits = EarlyExit(cfg) if cfg.exits is not None else None
        self.final_norm = make_norm(cfg.norm, cfg.head_in_dim, cfg.norm_eps)
        self.mlm_head = MLMHead(cfg) if cfg.kind == "encoder" else None
        self.head = nn.Linear(cfg.head_in_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        positions_BT: torch.Tensor | None = None,
        valid_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        trace: bool = False,
        exit_depth_BT: torch.Tensor | None = None,
    ) -> Output:
        """Run the model. ``positions_BT`` defaults to 0..T-1; ``valid_BT`` marks padding as False.

        ``trace=True`` also returns per-token traces (routing decisions, ...) in ``Output.traces``.
        ``exit_depth_BT`` (models with exits): the number of layers each token computes, fixed by the caller.
        """
        ctx = self._context(tokens_BT, positions_BT, valid_BT, cache)
        ctx.tally.tracing = trace
        h = self.embed(tokens_BT)
        if self.exits is not None:
            r = self.exits(self, h, ctx, targets_BT, exit_depth_BT)
            tally = ctx.tally
            return Output(r.logits, r.loss, tally.total(r.logits), dict(tally.losses), dict(tally.stats),
                          dict(tally.traces), r.objective)
        if exit_depth_BT is not None:
            raise ValueError("exit_depth_BT needs a model with exits (ModelConfig.exits)")
        if self.altup is not None:
            h = self.altup(h, self.layers, ctx)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, ctx.for_layer(i))
        h = self.final_norm(h)
        if self.mlm_head is not None:
            h = self.mlm_head(h)
        logits = self.head(h)
        loss = None
        if targets_BT is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; float64 kept
            loss = F.cross_entropy(wide.flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)
        tally = ctx.tally
        return Output(logits, loss, tally.total(h), dict(tally.losses), dict(tally.stats), dict(tally.traces))

    def _context(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None,
                 valid_BT: torch.Tensor | None, cache: KVCache | None) -> Context:
        B, T = tokens_BT.shape
        if cache is not None and not self.cfg.causal:
            raise ValueError("a KV cache needs a causal decoder; encoders attend to later tokens")
        contiguous = positions_BT is None
        if positions_BT is None:
            if self.cfg.max_seq_len < T:
                raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        return Context(positions_BT=positions_BT, causal=self.cfg.causal, tally=Tally(), valid_BT=valid_BT,
                       cache=cache, contiguous=contiguous, tokens_BT=tokens_BT)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def build_model(cfg: ModelConfig) -> Transformer:
    """Build a model from a config (validated first, so a bad config fails with a one-line error)."""
    return Transformer(cfg)
