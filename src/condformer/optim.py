"""AdamW with explicit no-weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from condformer.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, new: frozenset[str] = frozenset(),
                 lr_scale_new: float = 1.0) -> list[dict]:
    """Split the trainable parameters into decayed and non-decayed groups (and the same for ``new`` ones).

    A parameter is not decayed if it is a bias or if its module lists it in ``no_weight_decay`` (norm
    gains, scalar gains of any shape). We do not use a ``dim < 2`` rule: it would decay per-head gains
    stored as (1, H, 1, 1) tensors. Each group carries ``lr_scale``, its rate relative to the schedule's:
    ``lr_scale_new`` for the parameters named in ``new`` (a conversion's routers, exits, experts), which get
    groups of their own only when that scale is not 1 (so a run without them keeps the two groups its
    checkpoints hold). Frozen parameters (``requires_grad`` False) are in no group.
    """
    split = bool(new) and lr_scale_new != 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[bool, bool], list] = {(d, f): [] for f in (False, True) for d in (True, False)}
    seen: set[int] = set()
    for module in model.modules():
        tagged = set(getattr(module, "no_weight_decay", ()))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            decayed = not (name == "bias" or name in tagged)
            groups[(decayed, split and names.get(id(p)) in new)].append(p)
    out = []
    for (decayed, fresh), params in groups.items():
        if fresh and not params:
            continue
        out.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                    "lr_scale": lr_scale_new if fresh else 1.0})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig, new: frozenset[str] = frozenset()) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where every parameter's device supports it.

    The fused kernel matters on CPU: on 143M parameters (an 8 x 512 model with 8 experts per layer) a step
    takes 81 ms fused vs 510 ms with the default multi-tensor loop, which would otherwise dominate the
    training step of any model with many parameters per FLOP, i.e. every MoE.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    scale = 1.0 if cfg.lr_new is None or cfg.lr is None else cfg.lr_new / cfg.lr
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, new, scale), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=fused or None)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at the last step, ``total_steps - 1``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    peak = max(warmup - 1, 0)  # the step at which warmup reaches lr
    progress = min(1.0, (step - peak) / max(1, total_steps - 1 - peak))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's ``lr_scale`` (``lr_new / lr`` for new parameters)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def before_optimizer_step(model: torch.nn.Module, skip: bool = False) -> None:
    """Run every submodule's ``before_optimizer_step(skip=...)`` hook, once per optimiser step.

    Components that update state outside the gradient (the aux-loss-free expert bias of an MoE layer) do it
    here, so the trainer stays technique-agnostic. ``skip``: the step was dropped (non-finite gradients).
    """
    for m in model.modules():
        hook = getattr(m, "before_optimizer_step", None)
        if hook is not None and m is not model:
            hook(skip=skip)
