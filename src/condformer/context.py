"""What a layer receives besides its hidden states: positions, masks, its cache slot, and the tally.

The tally is the side channel that keeps the backbone technique-agnostic: any layer may add a named
auxiliary loss (``ctx.tally.loss``) or a routing statistic (``ctx.tally.stat``); the model returns them
with the logits, and the trainer optimises ``loss + aux_loss`` and logs the statistics without knowing
which technique produced them. Statistics stay tensors (no host sync in the forward pass); the trainer
converts them to numbers only when it logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from condformer.cache import KVCache, LayerKV


class Tally:
    """Auxiliary losses, scalar statistics and (when ``tracing``) per-token traces of one forward pass.

    Traces are per-token tensors such as a routing layer's decisions (B, T); they are recorded only when
    the caller asks for them (``model(..., trace=True)``, used by ``condformer inspect``), so training
    pays nothing for them.

    ``recomputing``: True while activation checkpointing recomputes a layer in the backward pass (see
    :meth:`Context.recomputation`). The forward already recorded that layer's losses, statistics and traces;
    the recomputation records nothing, so a loss is not counted twice and a statistic is not replaced by a
    value computed after the forward moved some state. (Autograd differentiates the loss tensor the forward
    recorded; the recomputation only rebuilds the tensors its backward reads.)
    """

    def __init__(self, tracing: bool = False) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor | float] = {}
        self.traces: dict[str, torch.Tensor] = {}
        self.tracing = tracing
        self.recomputing = False

    def loss(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` to the auxiliary loss ``name`` (summed if added twice; ignored while recomputing)."""
        if self.recomputing:
            return
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def stat(self, layer: int | None, name: str, value: torch.Tensor | float) -> None:
        """Record a statistic, keyed ``layer{L}/{name}`` (or ``name`` when not layer-specific)."""
        if self.recomputing:
            return
        key = name if layer is None else f"layer{layer}/{name}"
        self.stats[key] = value.detach() if isinstance(value, torch.Tensor) else value

    def trace(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Record a per-token tensor keyed ``layer{L}/{name}``, if tracing is on (and not recomputing)."""
        if self.tracing and not self.recomputing:
            self.traces[f"layer{layer}/{name}"] = value.detach()

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
    contiguous: True when positions strictly increase along every row and nothing is padded, so causal
        order by position is the lower triangle by index and attention may use the fused ``is_causal``
        path instead of an explicit mask (true for 0..T-1 and for a position-sorted subset of it).
    tokens_BT: each position's input token id, for components that route on ids (hash-routed experts);
        None when the caller feeds hidden states without ids.
    accumulate: whether layers may update state kept outside the gradient (MoE's aux-loss-free load, MoD's
        running threshold); False for a side pass that must leave no trace (mixed exit training's last-layer
        loss) and while activation checkpointing recomputes a layer (:meth:`recomputation`).
    memo: values computed once per forward and shared by every layer's view (one dict object): the rotary
        angles of a positions tensor are the same in all 30 layers of a model and for queries and keys, and
        recomputing them per call was 5-7% of a batch-1 decoding step.
    """

    positions_BT: torch.Tensor
    causal: bool
    tally: Tally = field(default_factory=Tally)
    valid_BT: torch.Tensor | None = None
    cache: KVCache | None = None
    contiguous: bool = True
    layer: int = 0
    tokens_BT: torch.Tensor | None = None
    accumulate: bool = True
    memo: dict = field(default_factory=dict)  # per-forward values every layer shares (rotary cos/sin)

    def for_layer(self, layer: int) -> Context:
        return dataclasses.replace(self, layer=layer)

    @contextlib.contextmanager
    def recomputation(self) -> Iterator[None]:
        """The scope in which activation checkpointing recomputes a layer that ran with this context.

        A recomputed forward must have no side effects (the forward had them already): the shared tally records
        nothing (``tally.recomputing``) and ``accumulate`` is False, so state kept outside autograd (expert load,
        MoD's threshold) moves once per forward, not twice. Every context the layer derives inside the scope
        (``subset``, ``rows``) copies ``accumulate``; both flags are restored on exit, also when torch ends the
        recomputation with an exception.
        """
        tally = self.tally
        before = tally.recomputing, self.accumulate
        tally.recomputing, self.accumulate = True, False
        try:
            yield
        finally:
            tally.recomputing, self.accumulate = before

    @property
    def kv(self) -> LayerKV | None:
        return None if self.cache is None else self.cache.layers[self.layer]

    def rows(self, idx_B: torch.Tensor) -> Context:
        """The context of a subset of the batch's rows (per-sample layer dropout); no cache."""
        if self.cache is not None:
            raise ValueError("a row subset cannot share a KV cache")
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx_B)

        return dataclasses.replace(self, positions_BT=self.positions_BT.index_select(0, idx_B),
                                   valid_BT=pick(self.valid_BT), tokens_BT=pick(self.tokens_BT))

    def subset(self, idx_BK: torch.Tensor, *, keep_BK: torch.Tensor | None = None,
               ascending: bool = False) -> Context:
        """The context of a gathered subset of tokens (original positions and validity kept).

        keep_BK: marks gathered tokens that only fill a row to the common width as invalid (False).
        ascending: the caller guarantees each row of ``idx_BK`` is increasing; then a subset of a
            contiguous context is still contiguous in the sense above (fused causal attention applies).
        """
        valid = None if self.valid_BT is None else self.valid_BT.gather(1, idx_BK)
        if keep_BK is not None:
            valid = keep_BK if valid is None else valid & keep_BK
        tokens = None if self.tokens_BT is None else self.tokens_BT.gather(1, idx_BK)
        return dataclasses.replace(self, positions_BT=self.positions_BT.gather(1, idx_BK), valid_BT=valid,
                                   contiguous=self.contiguous and ascending and valid is None, tokens_BT=tokens)
