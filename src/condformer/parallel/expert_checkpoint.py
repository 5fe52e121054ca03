"""Checkpoints of expert-parallel models in the layouts one process reads.

Under :mod:`~condformer.parallel.expert_parallel` each rank holds (E/ep, ...) slices of every expert weight
under the unsharded names. Two ways to write checkpoints that do not depend on the ep size:

* :func:`gathered_experts` - for the safetensors checkpoints of :mod:`condformer.checkpoint`: inside it the
  weights (and AdamW's state) have their full (E, ...) shapes, so ``save_checkpoint`` writes exactly what a
  single process would. Resuming: load into the full model, then ``shard_experts(model, ep, optimizer)``.
* :func:`expert_dtensors` - for ``torch.distributed.checkpoint`` (FSDP2 runs): DTensor views that tell DCP
  which slice each rank holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from condformer.parallel.expert_parallel import (
    EP_DIM,
    EXPERT_WEIGHTS,
    expert_parameter_names,
    expert_parameters,
    gather_shards,
    parallel_layers,
)


@contextlib.contextmanager
def gathered_experts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside, every expert weight (and its optimizer state) has its full single-process shape (E, ...).

    For saving: ``save_checkpoint`` (safetensors ``save_model``, ``optimizer_to_flat``) inside it writes a
    checkpoint a single process loads unchanged. Every rank must enter it (it all-gathers); only the
    weights are swapped, so do not run the model inside.
    """
    swapped: list[tuple[Any, Any, torch.Tensor]] = []  # (owner, key, local tensor) to restore
    try:
        with torch.no_grad():
            for m, par in parallel_layers(model):
                for name in EXPERT_WEIGHTS:
                    p = getattr(m.bank, name)
                    local = p.data
                    state = optimizer.state.get(p, {}) if optimizer is not None else {}
                    for key, value in list(state.items()):
                        if isinstance(value, torch.Tensor) and value.shape == local.shape:
                            swapped.append((state, key, value))
                            state[key] = gather_shards(par, value)
                    swapped.append((p, None, local))
                    p.data = gather_shards(par, local)
                m.bank.n_experts = par.n_experts
        yield
    finally:
        for owner, key, local in reversed(swapped):
            if key is None:
                owner.data = local
            else:
                owner[key] = local
        for m, par in parallel_layers(model):
            m.bank.n_experts = par.n_local


def full_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full (E, ...) tensor} of every sharded expert weight, gathered on every rank (collective)."""
    out = {}
    names = dict(zip(map(id, expert_parameters(model)), expert_parameter_names(model), strict=True))
    for m, par in parallel_layers(model):
        for name in EXPERT_WEIGHTS:
            p = getattr(m.bank, name)
            out[names[id(p)]] = gather_shards(par, p.detach())
    return out


def expert_views(model: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{expert weight name: a function making a tensor of that weight's local (E/ep, ...) shape a DTensor view of
    the global (E, ...) tensor} (``Shard(0)`` over ``ep``; over the other mesh dimension replicated, or
    ``Shard(1)`` where FSDP2 splits the experts over it: then the function takes FSDP's DTensor shards).

    For ``torch.distributed.checkpoint``: the weights and their AdamW moments given as such views are stored once
    with their global shapes, and loaded in place (the views share storage), whatever the ep size that saved them;
    a single process loads that checkpoint into the plain unsharded names. Without them DCP would take the
    same-named local shards of different ranks for copies of one tensor and keep one rank's.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    names = dict(zip(map(id, expert_parameters(model)), expert_parameter_names(model), strict=True))
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for m, par in parallel_layers(model):
        mesh = par.mesh
        # the other dimension: copies, or (FSDP2 over the replicas) each rank one block of dim 1
        other = Shard(1) if par.fsdp_replicas else Replicate()
        placements = [Shard(0) if d == EP_DIM or mesh.ndim == 1 else other
                      for d in (mesh.mesh_dim_names or (EP_DIM,))]
        for name in EXPERT_WEIGHTS:
            p = getattr(m.bank, name)
            shape = torch.Size((par.n_experts, *p.shape[1:]))  # an FSDP2 DTensor's shape is its (E/ep, ...) one

            def view(t: torch.Tensor, mesh: Any = mesh, placements: list = placements,
                     shape: torch.Size = shape) -> torch.Tensor:
                local = t.to_local() if isinstance(t, DTensor) else t  # FSDP2's shard of this rank's experts
                return DTensor.from_local(local.detach(), mesh, placements, shape=shape,
                                          stride=_contiguous_stride(shape))

            out[names[id(p)]] = view
    return out


def expert_dtensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: DTensor} views of the expert weights themselves (see :func:`expert_views`)."""
    named = dict(zip(expert_parameter_names(model), expert_parameters(model), strict=True))
    return {name: view(named[name]) for name, view in expert_views(model).items()}


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))
