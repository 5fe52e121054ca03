"""AdamW with explicit no-weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from condformer.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed and non-decayed groups.

    A parameter is not decayed if it is a bias or if its module lists it in ``no_weight_decay`` (norm
    gains, scalar gains of any shape). We do not use a ``dim < 2`` rule: it would decay per-head gains
    stored as (1, H, 1, 1) tensors.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        tagged = set(getattr(module, "no_weight_decay", ()))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (no_decay if name == "bias" or name in tagged else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where every parameter's device supports it.

    The fused kernel matters on CPU: on 143M parameters (an 8 x 512 model with 8 experts per layer) a step
    takes 81 ms fused vs 510 ms with the default multi-tensor loop, which would otherwise dominate the
    training step of any model with many parameters per FLOP, i.e. every MoE.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
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


def before_optimizer_step(model: torch.nn.Module, skip: bool = False) -> None:
    """Run every submodule's ``before_optimizer_step(skip=...)`` hook, once per optimiser step.

    Components that update state outside the gradient (the aux-loss-free expert bias of an MoE layer) do it
    here, so the trainer stays technique-agnostic. ``skip``: the step was dropped (non-finite gradients).
    """
    for m in model.modules():
        hook = getattr(m, "before_optimizer_step", None)
        if hook is not None and m is not model:
            hook(skip=skip)
