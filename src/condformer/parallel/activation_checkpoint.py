"""Activation checkpointing per layer: free a layer's activations after the forward, recompute them in the backward.

Modes (``apply_activation_checkpointing(model, mode)``):

* ``none``: autograd keeps every activation (the default);
* ``full``: each layer's step is run under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; only its
  input is kept, and the whole layer runs again when the backward reaches it (about one more forward of compute);
* ``selective``: the same, with torch's selective activation checkpointing
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs of the expensive ops are kept,
  the cheap ones are recomputed (see :func:`selective_policy`). The idea is torchtitan's op-level selective AC
  (``torchtitan/distributed/activation_checkpoint.py``): keep what costs FLOPs, recompute what costs bandwidth.

Checkpointing applies only where memory is at stake: the model in training mode with gradients enabled. The
unit is one call of :meth:`~condformer.streams.base.ResidualStream.step` inside :meth:`Transformer.run`, the one
layer loop, so it covers every block, router, FFN and residual stream (AltUp's predict and correct included);
what a depth policy does between layers (layer dropout's row draw, exit readouts) stays outside.

**A recomputed forward has no side effects.** It runs inside :meth:`Context.recomputation` (entered through the
``context_fn`` hook of ``torch.utils.checkpoint``, the recompute half): the tally records no loss, statistic or
trace, and ``ctx.accumulate`` is False, so MoE's aux-loss-free load and MoD's running threshold move once per
forward. Random draws inside a layer (noisy top-k's noise) repeat exactly: ``preserve_rng_state`` restores the
RNG before the recomputation, and the selective policy never keeps the output of a random op (skipping one in
the recomputation would shift every later draw). Identical inputs then give identical routing (MoD's gather
indices, MoE's assignments).

**Collectives** inside a layer (global-batch routing statistics, expert-parallel all-to-all) run again in the
recomputation, on every rank in the same order (the backward visits layers in the same order on every rank).
Early stopping of the recomputation is switched off (``set_checkpoint_early_stop(False)``): torch would otherwise
end a recomputation as soon as the last tensor the backward needs is rebuilt, and where that happens can depend on
the data (how many tensors a data-dependent path saved), so one rank could stop before a collective that another
rank enters and waits in. The cost is the few ops after a layer's last saved tensor.

**Invariant for layer code** (what a recomputation may skip): code gated on ``ctx.accumulate`` or on
``Context.memo`` hits runs in the forward and not in the recomputation. Under ``selective`` torch matches saved
op outputs by each op's call count, so such code must not call the ops the policy saves (matmuls, attention):
it does not today (counts, a threshold's min/max, rotary angles are element-wise).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from condformer.context import Context
from condformer.errors import ConfigError

if TYPE_CHECKING:
    from condformer.streams.base import ResidualStream

MODES = ("none", "full", "selective")

# ops whose outputs ``selective`` keeps: matmuls (dense projections, experts, AltUp's predict), fused attention
# kernels, grouped matmuls. Names that this torch build lacks are skipped (``_grouped_mm`` is new in 2.8).
_SAVED_OP_NAMES = (
    ("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"), ("aten", "baddbmm"), ("aten", "_grouped_mm"),
    ("aten", "_scaled_mm"), ("aten", "_scaled_grouped_mm"),
    ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("aten", "_scaled_dot_product_efficient_attention"), ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_scaled_dot_product_fused_attention_overrideable"),
    ("condformer", "grouped_mm"),  # the expert bank's grouped matmul (routing/moe/experts.py)
)
_DROPOUT_ARG = {"_scaled_dot_product_flash_attention": 3, "_scaled_dot_product_flash_attention_for_cpu": 3,
                "_scaled_dot_product_efficient_attention": 5, "_scaled_dot_product_cudnn_attention": 5,
                "_scaled_dot_product_fused_attention_overrideable": 4}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Set how :meth:`Transformer.run` checkpoints its layers in training: ``none``, ``full`` or ``selective``.

    Call it on the model itself (not a DDP wrapper; before ``torch.compile``). Nothing is saved in the state dict:
    a checkpoint loads into a model with any mode.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown activation_checkpointing {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "selective" and not hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts"):
        raise ConfigError(f"activation_checkpointing 'selective' needs torch >= 2.4 (this is {torch.__version__}); "
                          f"use 'full'")
    if mode != "none" and hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        # under torch.compile the same contract as eager's Context.recomputation: a layer's Python side effects
        # (tally entries, expert load, MoD's threshold) happen in the forward only; without this flag dynamo
        # refuses a checkpointed region that has any ("HOP: Unsafe side effect")
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    model.activation_checkpointing = mode


def mode_now(model: nn.Module) -> str:
    """The mode the layer loop uses for this call: the model's in training with gradients, else ``none``.

    Evaluation, generation and ``torch.no_grad`` passes (mixed exit training's last-layer loss) build no
    backward, so there is nothing to free and nothing would be recomputed.
    """
    mode = getattr(model, "activation_checkpointing", "none")
    return mode if mode != "none" and model.training and torch.is_grad_enabled() else "none"


def layer_step(mode: str, stream: ResidualStream, i: int, state: Any, layer: nn.Module, ctx: Context) -> Any:
    """``stream.step(i, state, layer, ctx)``, checkpointed unless ``mode`` is ``none`` (see the module docstring)."""
    if mode == "none":
        return stream.step(i, state, layer, ctx)
    if torch.compiler.is_compiling():
        return _compiled_step(mode, stream, i, state, layer, ctx)
    with set_checkpoint_early_stop(False):
        return checkpoint(stream.step, i, state, layer, ctx, use_reentrant=False, preserve_rng_state=True,
                          context_fn=functools.partial(_contexts, mode, ctx))


def _compiled_step(mode: str, stream: ResidualStream, i: int, state: Any, layer: nn.Module, ctx: Context) -> Any:
    """Under torch.compile the recomputation is part of the compiled backward graph (the partitioner replays the
    forward's ops), so no Python runs again and nothing needs silencing; torch.compile accepts only a selective
    policy as ``context_fn`` and always disables early stopping itself."""
    if mode == "full":
        return checkpoint(stream.step, i, state, layer, ctx, use_reentrant=False)
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return checkpoint(stream.step, i, state, layer, ctx, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, selective_policy))


# -- the forward / recompute contexts ------------------------------------------------------------------
def _contexts(mode: str, ctx: Context) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recompute context) for ``checkpoint``'s ``context_fn``: the recomputation runs inside
    ``ctx.recomputation()``, and under ``selective`` both halves also carry torch's caching dispatch modes."""
    if mode == "full":
        return contextlib.nullcontext(), ctx.recomputation()
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    forward, recompute = create_selective_checkpoint_contexts(selective_policy)
    return forward, _both(ctx.recomputation(), recompute)


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


# -- the selective policy -------------------------------------------------------------------------------
@functools.cache
def saved_ops() -> frozenset:
    """The op overloads whose outputs ``selective`` keeps (the ``.default`` overloads that exist in this torch)."""
    found = set()
    for namespace, name in _SAVED_OP_NAMES:
        packet = getattr(getattr(torch.ops, namespace), name, None)
        overload = None if packet is None else getattr(packet, "default", None)
        if overload is not None:
            found.add(overload)
    return frozenset(found)


def selective_policy(sac_ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep the outputs of matmuls, grouped matmuls and fused attention; recompute everything else.

    Recomputed: norms, activations (GELU, SiLU and the SwiGLU product), rotary rotation, residual adds, softmax
    and top-k of routers, gathers and scatters, casts: element-wise or data-movement ops whose outputs are as
    large as a matmul's but cost a small fraction of its FLOPs (torch docs, "Selective activation checkpoint";
    torchtitan's op save list). Random ops are always recomputed, never kept: the recomputation must draw the
    same numbers in the same order from the restored RNG, and a kept op would not draw at all. Fused attention
    with dropout is recomputed for the same reason. Out-variants (``mm.out``) are not in the list (their output
    is a caller's buffer, which torch may not cache).
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if func in saved_ops() and not _has_dropout(func, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _has_dropout(func: Any, args: tuple, kwargs: dict) -> bool:
    position = _DROPOUT_ARG.get(getattr(func, "__name__", "").split(".")[0])
    if position is None:
        return False
    p = kwargs.get("dropout_p", args[position] if len(args) > position else 0.0)
    return float(p) > 0


def saved_op_names() -> list[str]:
    """The kept ops' names, for reports and tests."""
    return sorted(str(op) for op in saved_ops())
