"""Routing statistics over the global batch: every data-parallel rank's tokens of this micro-step.

Under DDP, FSDP or expert parallelism each of W ranks holds B rows of a global batch of W*B rows. A
per-token mean (the language-model loss, the router z-loss) averages correctly through the gradient
averaging the data-parallel engine already does. Quantities of the *whole batch* do not: which pairs an
over-full expert drops (capacity), the Switch loss's assignment fractions and mean probabilities, Shazeer's
importance and load CV^2, the load statistics, MoD's running top-k boundary. Computed on B rows they make a
2-rank run differ from one process at batch 2B (measured on main before this module: 4.35551 vs 4.35740
validation loss for `tiny-moe`, while dense matched to every digit). Computed here over all ranks, they
equal the one-process values, so a run does not depend on how many ranks share it. Global-batch balancing
is also reported to train better (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873): a micro-batch
of code is rarely balanced over experts even when the corpus is.

Each quantity is a sum over the batch, so one ``all_reduce`` (or ``all_gather`` for capacity) per routed
layer and micro-step does it. A loss built on a global sum is the same number on every rank; its gradient
reaches each rank's own rows only, and the engine then *averages* gradients over the W ranks, so
:meth:`GlobalBatch.sum` scales the gradient of its input by W to make that average the true gradient.

The scope is an option (``MoE(balance_scope=...)``): ``"global"`` (default) or ``"micro_batch"`` (each
rank's rows alone: the behaviour before this module, and what most MoE trainers do). Collectives run only
in training; evaluation and generation never communicate from a layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SCOPES = ("global", "micro_batch")


class BatchScope:
    """The batch a statistic is taken over: this rank's micro-batch (every method is the identity)."""

    world = 1
    rank = 0

    def counts(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the scope's ranks; no gradient (counts, sums of detached values)."""
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the scope's ranks, differentiable (see the module docstring for the scaling)."""
        return t

    def gather(self, t_N: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t_N`` stacked in rank order (the global batch's row order); no gradient."""
        return t_N

    def own_rows(self, t_all: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor laid out as :meth:`gather` returns it."""
        return t_all


MICRO_BATCH = BatchScope()


class GlobalBatch(BatchScope):
    """Sums and gathers over every rank of a process group (the data-parallel world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def counts(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        total = self.counts(t)
        # value: the global sum; gradient: W times this rank's, undone by the engine's average over W ranks
        local = t * self.world - t.detach() * (self.world - 1)
        return local + (total - t.detach())

    def gather(self, t_N: torch.Tensor) -> torch.Tensor:
        t_N = t_N.detach().contiguous()
        out = t_N.new_empty((self.world * t_N.shape[0], *t_N.shape[1:]))
        dist.all_gather_single(out, t_N, group=self.group)
        return out

    def own_rows(self, t_all: torch.Tensor) -> torch.Tensor:
        n = t_all.shape[0] // self.world
        return t_all[self.rank * n:(self.rank + 1) * n]


def data_parallel_world() -> int:
    """How many ranks share the batch (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def batch_scope(kind: str = "global") -> BatchScope:
    """The scope ``kind`` names, for a training forward pass; ``micro_batch`` (the identity) in one process."""
    if kind not in SCOPES:
        raise ValueError(f"unknown batch scope {kind!r}; choose one of {SCOPES}")
    if kind == "global" and data_parallel_world() > 1:
        return GlobalBatch()
    return MICRO_BATCH
