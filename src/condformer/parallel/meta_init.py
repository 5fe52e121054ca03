"""Deferred initialisation for FSDP2: no rank ever holds the whole model on its device.

Building the model on every rank and then sharding it makes each rank's high-water mark one full copy of the
weights (on a GPU: the whole model in its memory, however many ranks share it afterwards), which defeats the
point of FSDP for a model that does not fit one device. Instead (torch's FSDP2 recipe: ``fully_shard`` on
meta-device modules, ``to_empty``, then ``set_model_state_dict(..., broadcast_from_rank0=True)``):

1. every rank builds the model's structure on the meta device (:func:`build_on_meta`: no memory, no random
   draws);
2. only rank 0 builds a real copy on the CPU (the seed's initialisation, then a checkpoint's or ``--init-from``'s
   weights): the one source of every value, so a run starts from exactly the weights a single process would;
3. every rank applies expert parallelism and FSDP2 to its meta model (shapes only), and :func:`materialize`
   allocates each rank's shards on its device and fills them from rank 0, one tensor at a time, so a rank's
   peak is its shards plus one full tensor (an expert bank travels whole, then each rank keeps its block).

Buffers that are not saved (rotary frequencies, the exits' depths and weights) are recomputed by their modules'
``reset_buffers`` method: a sharded checkpoint restores everything else, so a resume from one needs no source
at all. A module that adds an unsaved buffer without that method is refused here (its values would be garbage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from condformer.config import ModelConfig
from condformer.errors import CondformerError
from condformer.model import Transformer, build_model

__all__ = ["build_on_meta", "is_meta", "materialize", "reset_buffers", "unsaved_buffers"]


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The model's structure (names, shapes, dtypes) without storage: every tensor on the meta device."""
    with torch.device("meta"):
        return build_model(cfg)


def is_meta(model: nn.Module) -> bool:
    """Whether the model's parameters are on the meta device (built by :func:`build_on_meta`)."""
    p = next(model.parameters(), None)
    return p is not None and p.is_meta


def unsaved_buffers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, owning module) of every non-persistent buffer: the ones no state dict carries."""
    out = []
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if getattr(module, name, None) is not None:
                out.append((f"{prefix}.{name}" if prefix else name, module))
    return out


def reset_buffers(model: nn.Module) -> None:
    """Recompute every unsaved buffer in place, through its module's ``reset_buffers``."""
    owners: dict[int, nn.Module] = {}
    for name, module in unsaved_buffers(model):
        if not callable(getattr(module, "reset_buffers", None)):
            raise CondformerError(f"buffer '{name}' is not saved and {type(module).__name__} has no reset_buffers() "
                                  f"to recompute it, so a model built on the meta device cannot be materialised; "
                                  f"give {type(module).__name__} a reset_buffers method")
        owners[id(module)] = module
    for module in owners.values():
        module.reset_buffers()


def materialize(model: nn.Module, device: torch.device | str, source: nn.Module | None, *,
                from_source: bool = True) -> None:
    """Allocate a (sharded) meta model on ``device`` and fill it; collective: every rank calls it.

    ``source``: on rank 0, an unsharded model of the same configuration holding the values (ignored on the other
    ranks: pass None there); its parameters and saved buffers are broadcast tensor by tensor and each rank keeps
    its shard. ``from_source=False`` (every rank alike): allocate and recompute the unsaved buffers only, for a
    caller that loads a sharded checkpoint next (which fills everything else).
    """
    from condformer.parallel.expert_parallel import expert_parameter_names

    device = torch.device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        model.to_empty(device=device)
    reset_buffers(model)
    if not from_source:
        return
    if rank == 0 and source is None:
        raise CondformerError("materialize needs the source model on rank 0 (from_source=True)")
    experts = set(expert_parameter_names(model))
    full = source.state_dict() if rank == 0 else {}
    if rank == 0:
        missing = set(model.state_dict()) - set(full)
        if missing:
            raise CondformerError(f"the source model lacks {sorted(missing)[:3]}; it must be built from the same "
                                  f"configuration as the sharded one")
    # the experts travel apart: a sharded expert weight is a block of the full (E, ...) tensor, not torch's own
    # sharding of a parameter of that shape
    rest = {k: v for k, v in full.items() if k not in experts}
    set_model_state_dict(model, rest, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))
    _fill_experts(model, {k: full[k] for k in experts} if rank == 0 else {}, device)


def _fill_experts(model: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Each rank's block of every expert weight, from rank 0's full ones (broadcast whole, one at a time)."""
    from torch.distributed.tensor import DTensor

    from condformer.parallel.expert_parallel import (
        EXPERT_WEIGHTS,
        expert_parameter_names,
        expert_parameters,
        parallel_layers,
    )

    names = dict(zip(map(id, expert_parameters(model)), expert_parameter_names(model), strict=True))
    for m, par in parallel_layers(model):
        for attr in EXPERT_WEIGHTS:
            p = getattr(m.bank, attr)
            local = p.to_local() if isinstance(p, DTensor) else p
            shape = (par.n_experts, *p.shape[1:])
            if dist.get_rank() == 0:
                whole = full[names[id(p)]].to(device=device, dtype=local.dtype).contiguous()
            else:
                whole = torch.empty(shape, device=device, dtype=local.dtype)
            dist.broadcast(whole, src=0)
            block = whole[par.first:par.first + par.n_local]
            if par.fsdp_replicas:  # FSDP2's even split of dim 1 over the ep groups holding these experts
                block = block.chunk(par.replicas, dim=1)[dist.get_rank(par.replicate_group)]
            with torch.no_grad():
                local.copy_(block)

