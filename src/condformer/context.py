"""What a layer receives besides its hidden states: positions, masks, its cache slot, and the tally.

The tally is the side channel that keeps the backbone technique-agnostic: any layer may add a named
auxiliary loss (``ctx.tally.loss``) or a routing statistic (``ctx.tally.stat``); the model returns them
with the logits, and the trainer optimises ``loss + aux_loss`` and logs the statistics without knowing
which technique produced them. Statistics stay tensors (no host sync in the forward pass); the trainer
converts them to numbers only when it logs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from condformer.cache import KVCache, LayerKV


class Tally:
    def __init__(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor | float] = {}

    def loss(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` to the auxiliary loss ``name`` (summed if added twice)."""
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def stat(self, layer: int | None, name: str, value: torch.Tensor | float) -> None:
        """Record a statistic, keyed ``layer{L}/{name}`` (or ``name`` when not layer-specific)."""
        key = name if layer is None else f"layer{layer}/{name}"
        self.stats[key] = value.detach() if isinstance(value, torch.Tensor) else value

    def total(self, like: torch.Tensor) -> torch.Tensor:
        """Sum of all auxiliary losses, a zero scalar on ``like``'s device when there are none."""
        total = like.new_zeros((), dtype=torch.float32)
        for v in self.losses.values():
            total = total + v.float()
        return total


@dataclass
class Context:
    """Per-forward state shared by all layers; ``for_layer`` gives each layer its own view.

    positions_BT: each token's original position (rotary angles and causal order use it).
    valid_BT: False for padding tokens (left-padded batched prompts); None when all are real.
    contiguous: True when positions are 0..T-1 in every row and nothing is padded, so attention may
        use the fused ``is_causal`` path instead of an explicit mask.
    """

    positions_BT: torch.Tensor
    causal: bool
    tally: Tally = field(default_factory=Tally)
    valid_BT: torch.Tensor | None = None
    cache: KVCache | None = None
    contiguous: bool = True
    layer: int = 0

    def for_layer(self, layer: int) -> Context:
        return dataclasses.replace(self, layer=layer)

    @property
    def kv(self) -> LayerKV | None:
        return None if self.cache is None else self.cache.layers[self.layer]

    def subset(self, idx_BK: torch.Tensor) -> Context:
        """The context of a gathered subset of tokens (original positions and validity kept)."""
        valid = None if self.valid_BT is None else self.valid_BT.gather(1, idx_BK)
        return dataclasses.replace(self, positions_BT=self.positions_BT.gather(1, idx_BK), valid_BT=valid,
                                   contiguous=False)
