"""Depth policies: what the model's one layer loop consults around each layer.

A policy decides, per layer, which rows run it (LayerSkip's per-sample dropout), which tokens keep its
output (given depths, confidence or halting exits: the others keep their copied state), what to record
(exit readouts for training and calibration) and when nothing above is needed (every token has exited).
The loop (:meth:`condformer.model.Transformer.run`) is the same for every policy and every residual stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from condformer.context import Context
from condformer.exits.halting import layer_dropout_rate


class DepthPolicy:
    """Full depth: every row runs every layer and keeps its output. Subclasses override the hooks."""

    done = False  # set by a policy when no token needs the layers above

    def before_layer(self, i: int, state: Any, ctx: Context) -> None:
        """Called before layer ``i`` runs (cached exit decoding computes pending keys and values here)."""

    def rows(self, i: int, state: Any, ctx: Context) -> torch.Tensor | None:
        """The batch rows that run layer ``i`` (a 1-D index), or None for all of them."""
        return None

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        """The state to continue with after layer ``i`` turned ``prev`` into ``new``."""
        return new


FULL_DEPTH = DepthPolicy()


class LayerDropout(DepthPolicy):
    """LayerSkip's per-sample layer dropout in training: layer l is skipped for a whole row with probability
    p_max (2^(l/(L-1)) - 1); only the kept rows are computed (zero rows still run, so DDP sees every parameter).
    """

    def __init__(self, p_max: float, n_layers: int, batch_size: Callable[[Any], int], training: bool) -> None:
        self.p_max, self.n_layers, self.batch_size = p_max, n_layers, batch_size
        self.active = training and p_max > 0

    def rows(self, i: int, state: Any, ctx: Context) -> torch.Tensor | None:
        if not self.active:
            return None
        p = layer_dropout_rate(self.p_max, i, self.n_layers)
        if p <= 0:
            return None
        keep_B = torch.rand(self.batch_size(state), device=ctx.positions_BT.device) >= p
        ctx.tally.stat(i, "exit_layer_kept", keep_B.float().mean())
        return keep_B.nonzero().squeeze(1)


class RecordExits(LayerDropout):
    """Aligned training (and calibration): every layer runs; the readout at every exit is recorded.

    ``first``: the readout after layer 0 (what a ``token``/``sequence`` halting module reads).
    ``previous``: also record the readout before each exit's layer (cosine confidence compares the two).
    """

    def __init__(self, exit_of_layer: dict[int, int], readout: Callable[[Any], torch.Tensor], *,
                 previous: bool = False, dropout: LayerDropout | None = None) -> None:
        if dropout is not None:
            super().__init__(dropout.p_max, dropout.n_layers, dropout.batch_size, dropout.active)
        else:
            self.active = False
        self.exit_of_layer, self.readout, self.previous = exit_of_layer, readout, previous
        self.readouts: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.first: torch.Tensor | None = None

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        if i in self.exit_of_layer:
            r = self.readout(new)
            self.readouts.append(r)
            if self.previous:
                self.before.append(self.readout(prev))
            if i == 0:
                self.first = r
        elif i == 0:
            self.first = self.readout(new)
        return new


class GivenDepths(LayerDropout):
    """Each token computes ``depth_BT`` layers, then its state is copied upward (state propagation)."""

    def __init__(self, depth_BT: torch.Tensor, where: Callable[[torch.Tensor, Any, Any], Any],
                 dropout: LayerDropout) -> None:
        super().__init__(dropout.p_max, dropout.n_layers, dropout.batch_size, dropout.active)
        self.depth_BT, self.where = depth_BT, where

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        return self.where(self.depth_BT > i, new, prev)


class Exiting:
    """Which tokens have stopped, at which depth, with which logits, during an inference pass."""

    def __init__(self, B: int, T: int, n_layers: int, device: torch.device) -> None:
        self.depth = torch.full((B, T), n_layers, dtype=torch.long, device=device)
        self.exited = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.chosen: torch.Tensor | None = None

    def stop(self, now_BT: torch.Tensor, logits_BTV: torch.Tensor, depth: int) -> None:
        self.chosen = logits_BTV if self.chosen is None else torch.where(now_BT[..., None], logits_BTV, self.chosen)
        self.depth = torch.where(now_BT, depth, self.depth)
        self.exited = self.exited | now_BT

    def logits(self, final: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Each token's logits: its exit's, or the last layer's (``final()``, computed only if a token needs it)."""
        if self.chosen is not None and bool(self.exited.all()):
            return self.chosen
        out = final()
        return out if self.chosen is None else torch.where(self.exited[..., None], self.chosen, out)


class ExitWhenConfident(DepthPolicy):
    """Inference: each token exits where the exits' policy (confidence thresholds or halting) says.

    Exited tokens keep their state in every layer above (their keys and values there come from it); the loop
    stops early once every token has exited, as nothing in this pass attends to the layers above then.
    ``planned``: the halting module's exits, set after layer 0 (``token``/``sequence`` halting).
    """

    def __init__(self, exits: Any, heads: Any, stream: Any, B: int, T: int, device: torch.device,
                 valid_BT: torch.Tensor | None) -> None:
        self.exits, self.heads, self.stream, self.valid_BT = exits, heads, stream, valid_BT
        self.state = Exiting(B, T, exits.n_layers, device)
        self.planned: torch.Tensor | None = None
        self.last_readout: torch.Tensor | None = None

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        exits, stream, state = self.exits, self.stream, self.state
        s = stream.where(~state.exited, new, prev)
        halting = exits.halting
        if i == 0 and halting is not None and halting.kind != "geometric":
            self.planned = halting.log_q_first(stream.readout(s), self.valid_BT).argmax(dim=-1)
        k = exits.exit_of_layer.get(i)
        if k is not None and k != exits.last and exits.checks(k):
            r = stream.readout(s)
            r_prev = stream.readout(prev) if exits.spec.confidence == "cosine" and halting is None else r
            logits_k = self.heads.logits(k, r)
            state.stop(exits.exits_now(k, logits_k, r, r_prev, self.planned) & ~state.exited, logits_k, i + 1)
            self.done = bool(state.exited.all())
        return s
