"""A count of applied optimiser steps that a module's behaviour follows (capacity annealing, exit curricula).

Why a module of its own: a schedule inside the model (not the trainer) keeps the trainer technique-agnostic,
and the count must be *saved with the weights* so a resumed run continues the schedule exactly. The count is
a persistent buffer (in every checkpoint) mirrored by a Python int, so reading it costs no host sync on a
GPU; the mirror is refreshed whenever a state dict is loaded. The trainer's ``before_optimizer_step`` walk
advances it once per applied step (a step dropped for a non-finite gradient does not count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StepCounter(nn.Module):
    """Applied optimiser steps so far: ``int(counter)`` (no sync), advanced by the trainer's hook."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._steps = 0

    def __int__(self) -> int:
        return self._steps

    def before_optimizer_step(self, skip: bool = False) -> None:
        if not skip:
            self.step.add_(1)
            self._steps += 1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved = state_dict.get(prefix + "step")
        if saved is not None:
            self._steps = int(saved)


def linear_ramp(start: float, end: float, step: int, steps: int) -> float:
    """``start`` at step 0, moving linearly to ``end`` at ``steps`` and staying there (``steps`` 0: ``end``)."""
    if steps <= 0:
        return end
    return start + (end - start) * min(1.0, step / steps)
