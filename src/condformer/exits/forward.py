"""A forward pass of a model with exits: which depth policy runs, and how its exits become logits and losses.

It uses only the model's public surface (``run``, ``stream``, ``exit_heads``, ``exits``), never its layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from condformer.context import Context, Tally
from condformer.exits.policies import ExitWhenConfident, GivenDepths, LayerDropout, RecordExits
from condformer.losses import lm_loss


@dataclass
class ExitResult:
    logits: torch.Tensor
    loss: torch.Tensor | None
    objective: torch.Tensor | None = None  # what training minimises instead of ``loss`` (the exits' weighted mean)


def exit_forward(model: Any, state: Any, ctx: Context, targets_BT: torch.Tensor | None,
                 depth_BT: torch.Tensor | None) -> ExitResult:
    """The exit-aware forward from the entered state: given depths, training (aligned/mixed), or inference."""
    exits = model.exits
    if depth_BT is not None:
        return _given(model, state, ctx, targets_BT, depth_BT)
    if model.training:
        if exits.spec.training == "mixed" and targets_BT is not None:
            return _mixed(model, state, ctx, targets_BT)
        return _aligned(model, state, ctx, targets_BT)
    heads = model.exit_heads()
    if ctx.cache is not None or exits.policy() == "full":  # a cached generation's prefill runs at full depth
        logits = heads.logits(exits.last, model.stream.readout(model.run(state, ctx)))
        return ExitResult(logits, lm_loss(logits, targets_BT))
    stream = model.stream
    B, T = ctx.positions_BT.shape
    policy = ExitWhenConfident(exits, heads, stream, B, T, ctx.positions_BT.device, ctx.valid_BT)
    state = model.run(state, ctx, policy=policy)
    logits = policy.state.logits(lambda: heads.logits(exits.last, stream.readout(state)))
    exits.depth_stats(policy.state.depth, ctx)
    return ExitResult(logits, lm_loss(logits, targets_BT))


def _dropout(model: Any) -> LayerDropout:
    exits = model.exits
    return LayerDropout(exits.spec.layer_dropout, exits.n_layers, model.stream.batch_size, model.training)


def _aligned(model: Any, state: Any, ctx: Context, targets_BT: torch.Tensor | None) -> ExitResult:
    """Every token runs every layer; the objective is the weighted mean of every exit's loss."""
    exits, heads = model.exits, model.exit_heads()
    # a curriculum computes only some exits this step (each costs a vocabulary projection); halting needs all
    active = exits.training_exits() if model.training and exits.halting is None else list(range(exits.n_exits))
    record = RecordExits({exits.exit_layers[k]: k for k in active}, model.stream.readout, dropout=_dropout(model))
    model.run(state, ctx, policy=record)
    logits = [heads.logits(k, r) for k, r in zip(active, record.readouts, strict=True)]
    if targets_BT is None:
        return ExitResult(logits[-1], None)
    # a list, not a stacked tensor: returning views of one tensor as loss and statistics breaks compile
    losses = [lm_loss(lg, targets_BT) for lg in logits]
    if len(active) == exits.n_exits:  # a curriculum's partial steps would bias the logged per-exit means
        for k, layer in enumerate(exits.exit_layers):
            ctx.tally.stat(layer, "exit_loss", losses[k])
    w = exits.weights.to(losses[0].dtype)[active]
    objective = sum(w[j] * loss for j, loss in enumerate(losses)) / w.sum()
    if exits.halting is not None:
        exits.halting_loss(record.first, record.readouts, logits, targets_BT, ctx)
    return ExitResult(logits[-1], losses[-1], objective)


def _given(model: Any, state: Any, ctx: Context, targets_BT: torch.Tensor | None, depth_BT: torch.Tensor,
           k_BT: torch.Tensor | None = None) -> ExitResult:
    """Each token computes ``depth_BT`` layers (an exit's depth), then its state is copied upward.

    ``k_BT``: the exits of those depths when the caller drew them (mixed training), which skips the check
    (and its host sync) that a caller's depths belong to exits.
    """
    exits = model.exits
    if k_BT is None:
        k_BT = exits.exit_index_of_depth(depth_BT)
    state = model.run(state, ctx, policy=GivenDepths(depth_BT, model.stream.where, _dropout(model)))
    logits = model.exit_heads().at_exits(model.stream.readout(state), k_BT)
    exits.depth_stats(depth_BT, ctx)
    return ExitResult(logits, lm_loss(logits, targets_BT))


def _mixed(model: Any, state0: Any, ctx: Context, targets_BT: torch.Tensor) -> ExitResult:
    """DAT's mixed training: M sampled exit sequences, exited states copied upward, mean of the exits' CE.

    ``loss`` is the last layer's, as for aligned training (what evaluation and the log compare across
    runs); it costs one more forward pass, without gradients and with its statistics discarded.
    """
    exits = model.exits
    B, T = ctx.positions_BT.shape
    total, logits = None, None
    for _ in range(exits.spec.mixed_samples):
        k_BT = torch.randint(0, exits.n_exits, (B, T), device=ctx.positions_BT.device)
        result = _given(model, state0, ctx, targets_BT, exits.depths[k_BT], k_BT)
        total = result.loss if total is None else total + result.loss
        logits = result.logits
    objective = total / exits.spec.mixed_samples
    with torch.no_grad():
        quiet = dataclasses.replace(ctx, tally=Tally(), accumulate=False)
        final = model.stream.readout(model.run(state0, quiet))
        last = lm_loss(model.exit_heads().logits(exits.last, final), targets_BT)
    return ExitResult(logits, last, objective)
