"""Cached decoding with early exits: one token per row per step, exited states propagated lazily.

A row that exits at layer n skips the layers above. While another row of the batch still needs a layer,
the exited row runs it on its copied state (static shapes) and its output is dropped. When every row has
exited, the step's stream states wait in a per-layer *pending* list; the next token that reaches that layer
first computes their keys and values (``append_kv``, no query, no FFN) in one batch, then attends. Pending
states are residual-stream states, so AltUp's K blocks are propagated (and read by the layer) like a dense
state. The decoder walks the layers through the model's one loop (:meth:`~condformer.model.Transformer.run`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from condformer.context import Context
from condformer.errors import CondformerError
from condformer.exits.halting import confidence
from condformer.exits.policies import DepthPolicy, Exiting
from condformer.losses import wide


@dataclass
class DecodeStats:
    """Depths of the tokens one generation decoded, for the exit-depth histogram."""

    depths: list[int] = field(default_factory=list)

    def histogram(self, n_layers: int) -> list[int]:
        return [self.depths.count(d) for d in range(1, n_layers + 1)]

    @property
    def mean_depth(self) -> float | None:
        return sum(self.depths) / len(self.depths) if self.depths else None


class ExitDecoder:
    """Prefill a prompt at full depth, then decode one token per row per :meth:`step` at its exit's depth."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.exits, self.stream = model, model.exits, model.stream
        for i, layer in enumerate(model.layers):
            if not hasattr(layer, "append_kv"):
                raise CondformerError(f"layer {i}'s router ({type(layer).__name__}) cannot compute keys and values "
                                      f"for exited tokens; early-exit generation needs dense or MoD routers")
        self.heads = model.exit_heads()
        self.pending: list[list[tuple[Any, torch.Tensor]]] = [[] for _ in model.layers]
        # sequence halting: the running sum and count of each row's first-layer readouts (its prefix's mean)
        self.r1_sum_BD: torch.Tensor | None = None
        self.r1_count_B: torch.Tensor | None = None
        self.stats = DecodeStats()

    def prefill(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, valid_BT: torch.Tensor | None,
                cache) -> torch.Tensor:  # noqa: ANN001
        """The prompt at full depth; returns the last position's logits (B, V)."""
        model = self.model
        ctx = model.context(tokens_BT, positions_BT, valid_BT, cache)
        halting = self.exits.halting
        first = _FirstReadout(self.stream) if halting is not None and halting.kind == "sequence" else DepthPolicy()
        state = model.run(model.enter(tokens_BT, ctx.positions_BT), ctx, policy=first)
        if isinstance(first, _FirstReadout):
            r = wide(first.readout)
            if valid_BT is not None:
                r = r * valid_BT.to(r.dtype)[..., None]
            self.r1_sum_BD = r.sum(dim=1)
            self.r1_count_B = (torch.full(r.shape[:1], r.shape[1], device=r.device, dtype=r.dtype)
                               if valid_BT is None else valid_BT.to(r.dtype).sum(dim=1))
        return self.heads.logits(self.exits.last, self.stream.readout(state)[:, -1:])[:, 0]

    def planned(self, r_B1W: torch.Tensor) -> torch.Tensor | None:
        """Halting's exit for the new tokens (B, 1), from their first-layer readouts; None without a plan.

        ``sequence`` adds the token to its row's running mean first, as the full forward's prefix mean does.
        """
        halting = self.exits.halting
        if halting is None or halting.kind == "geometric":
            return None
        if halting.kind == "token":
            return halting.log_q_first(r_B1W, None).argmax(dim=-1)
        self.r1_sum_BD = self.r1_sum_BD + wide(r_B1W[:, 0])
        self.r1_count_B = self.r1_count_B + 1
        return halting.log_q(self.r1_sum_BD / self.r1_count_B.clamp_min(1)[:, None]).argmax(dim=-1)[:, None]

    def step(self, tok_B: torch.Tensor, pos_B1: torch.Tensor, cache) -> torch.Tensor:  # noqa: ANN001
        """Logits (B, V) of one new token per row, each from the exit where its row stopped."""
        model = self.model
        tokens = tok_B[:, None]
        ctx = model.context(tokens, pos_B1, None, cache)
        policy = _OneRow(self, pos_B1) if tok_B.shape[0] == 1 else _Batched(self, pos_B1)
        state = model.run(model.enter(tokens, ctx.positions_BT), ctx, policy=policy)
        return policy.finish(state)[:, 0]

    def flush(self, i: int, lctx: Context) -> None:
        """Keys and values of layer ``i`` for the tokens that exited below it since it last ran."""
        if not self.pending[i]:
            return
        state = self.stream.cat_time([s for s, _ in self.pending[i]])
        pos = torch.cat([p for _, p in self.pending[i]], dim=1)
        x, _ = self.stream.read(i, state)
        self.model.layers[i].append_kv(x, dataclasses.replace(lctx, positions_BT=pos, valid_BT=None,
                                                              contiguous=False, tokens_BT=None))
        self.pending[i].clear()

    def defer(self, after: int, state: Any, pos_B1: torch.Tensor) -> None:
        """The step's states wait for a deeper token in every layer above ``after``."""
        for j in range(after + 1, self.exits.n_layers):
            self.pending[j].append((state, pos_B1))


class _FirstReadout(DepthPolicy):
    """Full depth, keeping the readout after layer 0 (sequence halting's running mean starts from it)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.readout = stream, None

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        if i == 0:
            self.readout = self.stream.readout(new)
        return new


class _Batched(DepthPolicy):
    """One decode step of several rows: masks keep exited rows' states; pending once every row has exited."""

    def __init__(self, dec: ExitDecoder, pos_B1: torch.Tensor) -> None:
        self.dec, self.pos_B1 = dec, pos_B1
        self.state = Exiting(pos_B1.shape[0], 1, dec.exits.n_layers, pos_B1.device)
        self.plan: torch.Tensor | None = None

    def before_layer(self, i: int, state: Any, ctx: Context) -> None:
        self.dec.flush(i, ctx)

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        dec, exits, stream = self.dec, self.dec.exits, self.dec.stream
        s = stream.where(~self.state.exited, new, prev)
        if i == 0:
            self.plan = dec.planned(stream.readout(s))
        k = exits.exit_of_layer.get(i)
        if k is not None and k != exits.last and exits.checks(k):
            r = stream.readout(s)
            r_prev = stream.readout(prev) if exits.spec.confidence == "cosine" else r
            logits_k = dec.heads.logits(k, r)
            self.state.stop(exits.exits_now(k, logits_k, r, r_prev, self.plan) & ~self.state.exited, logits_k, i + 1)
            if i < exits.n_layers - 1 and bool(self.state.exited.all()):
                dec.defer(i, s, self.pos_B1)
                self.done = True
        return s

    def finish(self, state: Any) -> torch.Tensor:
        dec = self.dec
        logits = self.state.logits(lambda: dec.heads.logits(dec.exits.last, dec.stream.readout(state)))
        dec.stats.depths.extend(self.state.depth[:, 0].tolist())
        return logits


class _OneRow(DepthPolicy):
    """One decode step of one row: plain control flow, no masks, and a head only where the token stops.

    The same arithmetic as the batched path (tested equal), minus its bookkeeping, which at batch 1 would
    cost as much as the layers the exit saves.
    """

    def __init__(self, dec: ExitDecoder, pos_B1: torch.Tensor) -> None:
        self.dec, self.pos_B1 = dec, pos_B1
        self.plan: int | None = None
        self.fired: torch.Tensor | None = None

    def before_layer(self, i: int, state: Any, ctx: Context) -> None:
        self.dec.flush(i, ctx)

    def after_layer(self, i: int, prev: Any, new: Any, ctx: Context) -> Any:
        dec, exits = self.dec, self.dec.exits
        if i == 0:
            plan = dec.planned(dec.stream.readout(new))
            self.plan = None if plan is None else int(plan)
        k = exits.exit_of_layer.get(i)
        if k is None or k == exits.last or not exits.checks(k):
            return new
        logits = self._fires(k, new, prev)
        if logits is not None:
            dec.defer(i, new, self.pos_B1)
            dec.stats.depths.append(i + 1)
            self.fired, self.done = logits, True
        return new

    def _fires(self, k: int, state: Any, prev: Any) -> torch.Tensor | None:
        """Exit ``k``'s logits if the token stops there, else None (cosine and halting skip the head then)."""
        dec, exits = self.dec, self.dec.exits
        r = dec.stream.readout(state)
        if exits.halting is not None:
            if exits.halting.kind == "geometric":
                fire = bool(torch.sigmoid(exits.halting.halt_logit(k, r)) > exits.spec.halting_tau)
            else:
                fire = self.plan == k
            return dec.heads.logits(k, r) if fire else None
        kind, threshold = exits.spec.confidence, exits.thresholds[k]
        if kind == "cosine":
            fire = bool(confidence(kind, None, r, dec.stream.readout(prev)) > threshold)
            return dec.heads.logits(k, r) if fire else None
        logits = dec.heads.logits(k, r)
        return logits if bool(confidence(kind, logits, r, r) > threshold) else None

    def finish(self, state: Any) -> torch.Tensor:
        if self.fired is not None:
            return self.fired
        dec = self.dec
        dec.stats.depths.append(dec.exits.n_layers)
        return dec.heads.logits(dec.exits.last, dec.stream.readout(state))
