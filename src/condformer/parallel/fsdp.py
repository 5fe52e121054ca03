"""FSDP2: every layer's parameters, gradients and optimiser state sharded over the data-parallel ranks.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter DTensor sharding on dim 0)
to each ``model.layers[i]`` and then to the model itself, whose group holds everything else: the embedding, the
head (which may be *tied* to the embedding: both names must live in one group, and the root is the only group
that sees both), the final norm, exit heads and AltUp's coefficients. Each layer's group is all-gathered just
before the layer runs and freed after it (``reshard_after_forward``), so a rank holds one layer's full weights
at a time plus its 1/N share of everything (torch docs: "FSDP2", ``torch.distributed.fsdp.fully_shard``).

Everything the trainer needs beside the wrapping lives here too, because FSDP changes what the single-process
calls return: ``clip_grad_norm`` (the norm of DTensor gradients is a DTensor), ``full_model_state`` /
``full_optimizer_state`` / ``consolidate`` (the consolidated state the single-file checkpoints hold, with the
exact names and optimiser layout of an unsharded model), ``load_full_state`` (the reverse) and ``shard_sizes``
(what a rank holds).

Buffers are not sharded, and FSDP (unlike DDP) never broadcasts them: each rank keeps its own copy. The ones
that change in training are identical on every rank by construction: MoE's ``expert_bias`` and MoD's
``threshold`` move by global-batch quantities (:mod:`condformer.parallel.global_batch`), step counters by
one per applied step.

Use in a training script (torchrun, one process per GPU, ``torch.cuda.set_device(local_rank)`` first)::

    model = shard_model(build_on_meta(cfg), device=device)               # no rank allocates the whole model
    materialize(model, device, build_model(cfg) if rank == 0 else None)  # rank 0's values, shard by shard
    optimizer = make_optimizer(model, train_cfg)                         # on the final (DTensor) parameters
    ...  loss.backward(); norm = clip_grad_norm(params, max_norm); before_optimizer_step(model); optimizer.step()
    full, full_opt = consolidate(model, optimizer)                       # every rank; rank 0 gets them
    if rank == 0: save_checkpoint(run, step, full, full_opt, ...)

(``build_on_meta`` and ``materialize``: :mod:`condformer.parallel.meta_init`; ``shard_model(build_model(cfg)
.to(device))`` also works, but then every rank holds one full copy before sharding.)

Layers are walked through their ``__call__`` (the stream calls ``layer(x, ctx)``), which is what fires FSDP's
pre-forward all-gather; anything that reads a sharded module's weights outside its ``forward`` must be
registered with ``register_fsdp_forward_method`` (done below for the expert-choice and soft MoE routers).
Hence the limits: a sharded model is for ``model(...)`` calls (training, evaluation); tools that call
``model.enter``/``run``/``logits`` themselves (generation, exit decoding, calibration) need an unsharded one.
Every rank must run every layer in each forward (FSDP's collectives are per layer): training does, but
confidence-based early exit at evaluation (calibrated exit thresholds) stops each rank at its own depth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from condformer.errors import CheckpointError, ConfigError
from condformer.model import Transformer, build_model
from condformer.routing.moe.routers import LinearRouter

__all__ = [
    "PRECISIONS",
    "FullOptimizerState",
    "ShardSizes",
    "clip_grad_norm",
    "consolidate",
    "full_model_state",
    "full_optimizer_state",
    "is_sharded",
    "load_full_state",
    "mixed_precision",
    "shard_model",
    "shard_sizes",
]

PRECISIONS = ("auto", "bf16", "fp32")
NO_PROCESS_GROUP = ("--parallel fsdp needs torchrun (or an initialised process group); launch with torchrun "
                    "--nproc_per_node=N ...")
# consolidated state on rank 0's CPU: the memory of one full copy, never N (torch.distributed.checkpoint.state_dict)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# -- wrapping ------------------------------------------------------------------------------------
def mixed_precision(precision: str, device: torch.device) -> MixedPrecisionPolicy:
    """The FSDP2 policy of a precision name: ``bf16`` computes with bf16 copies of the fp32 master weights and
    reduces gradients in fp32 (sums of N bf16 gradients lose the low bits torch's docs warn about); ``fp32``
    casts nothing; ``auto`` is bf16 on CUDA and fp32 elsewhere (CPUs gain little from bf16 matmuls).

    ``cast_forward_inputs`` is off: a layer's float input is already the previous layer's bf16 output, and the
    cast would rebuild the :class:`~condformer.context.Context` of every layer call, with a new ``memo`` dict
    each time (the per-forward cache of rotary angles that all layers are meant to share).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown FSDP precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ConfigError("the model has no parameters to shard")
    return p.device


def _fp32_routers(model: Transformer, mesh: DeviceMesh, reshard_after_forward: bool,
                  offload: OffloadPolicy) -> None:
    """Give every learned MoE router a group of its own that stays fp32 under a bf16 policy.

    Top-k selection flips on tiny logit differences, so routers keep fp32 weights (Switch Transformer, Fedus et
    al. 2021, Sec. 2.4 "selective precision"; ``float32_linear`` already computes them in fp32, but a bf16
    all-gathered weight would have lost its bits before that). A plain ``LinearRouter`` (expert choice, soft
    MoE) is read through ``logits``, not ``forward``, so that method is registered to run FSDP's hooks.
    The MoD router (an ``nn.Linear`` read as ``router.weight`` inside the MoD layer's forward) cannot be
    grouped this way and stays in its layer's bf16 group.
    """
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, LinearRouter):
                read_by_logits = type(module) is LinearRouter  # before fully_shard swaps in an FSDP subclass
                fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=fp32,
                            offload_policy=offload)
                if read_by_logits:
                    register_fsdp_forward_method(module, "logits")


def _shard_expert_replicas(model: Transformer, policy: MixedPrecisionPolicy, reshard_after_forward: bool,
                           offload: OffloadPolicy) -> set[nn.Parameter]:
    """FSDP2 over the replicate dimension for the experts of every expert-parallel layer; returns the expert
    weights left for FSDP to ignore (those of layers whose ep group is the whole world: nothing to shard).

    Under a (world / ep, ep) mesh the ranks of one ``ep_replicate`` group hold the same E/ep experts: each of
    them keeps 1/(world/ep) of every expert weight instead of a copy (torchtitan's ``dp_shard_mod_ep``), and
    the bank is all-gathered over that group around :meth:`StackedExperts.sized`, the one method expert
    parallelism runs it through. The split is on dim 1 (d_model of ``w_up``, d_expert of ``w_down``), not dim
    0: the dims stay orthogonal to the ep split on experts, so each rank's piece is one block of the global
    (E, ...) tensor (what :func:`condformer.parallel.expert_checkpoint.expert_views` describes to DCP), and a
    layer with fewer local experts than replicas still splits evenly. Gradients: the all-to-all's backward
    sums over the ep group, FSDP's reduce-scatter over the replicas, and the divide factor W turns the sum
    over all ranks into the mean over their losses that DDP/FSDP give every other weight (what
    :func:`~condformer.parallel.expert_parallel.reduce_expert_grads` does for experts outside FSDP).
    """
    from torch.distributed.tensor import Shard

    from condformer.parallel.expert_parallel import EXPERT_WEIGHTS, REPLICATE_DIM, parallel_layers

    plain: set[nn.Parameter] = set()
    for m, par in parallel_layers(model):
        weights = [getattr(m.bank, name) for name in EXPERT_WEIGHTS]
        if par.replicas == 1:
            plain.update(weights)
            continue
        for name, p in zip(EXPERT_WEIGHTS, weights, strict=True):
            if p.shape[1] % par.replicas:
                raise ConfigError(f"FSDP splits layer {m.layer_index}'s experts over the {par.replicas} ep groups "
                                  f"that hold them, along dim 1 of {name} ({p.shape[1]}), which {par.replicas} does "
                                  f"not divide; choose an --expert-parallel for which it does")
        fully_shard(m.bank, mesh=par.mesh[REPLICATE_DIM], reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=lambda _p: Shard(1), mp_policy=policy, offload_policy=offload)
        register_fsdp_forward_method(m.bank, "sized")
        m.bank.set_gradient_divide_factor(float(par.data_parallel))
        if dist.get_backend(par.replicate_group) == "gloo":  # gloo has no PREMUL_SUM: a sum, then the division
            m.bank.set_force_sum_reduction_for_comms(True)
        par.fsdp_replicas = True
    return plain


def shard_model(model: Transformer, *, mesh: DeviceMesh | None = None, precision: str = "auto",
                offload: bool = False, reshard_after_forward: bool = True,
                ignored: set[nn.Parameter] | None = None, device: torch.device | str | None = None) -> Transformer:
    """Shard ``model`` in place with FSDP2 over ``mesh`` (default: every rank of the default process group).

    One group per layer and one for the root (embedding, tied head, final norm, exits, AltUp); under a bf16
    policy each learned MoE router gets an fp32 group of its own. ``offload``: parameters, gradients and
    optimiser state live in CPU memory and are copied to the GPU per layer (``CPUOffloadPolicy``), only
    meaningful for a CUDA model. ``reshard_after_forward``: free each layer's gathered weights after its
    forward (and gather them again in the backward); False trades memory for one all-gather per layer.
    The root keeps its weights gathered between forward and backward (torch's default for the root: the
    backward starts with the head). 0-dim parameters, which FSDP2 refuses, stay replicated (see
    :func:`_replicate_scalars`).

    Expert-parallel layers (:func:`condformer.parallel.expert_parallel.shard_experts`, applied before this)
    keep their experts out of their layer's group: where several ep groups hold the same experts, a group of
    their own shards them over those groups (:func:`_shard_expert_replicas`); where one does, they are left
    alone. ``ignored``: further parameters FSDP leaves alone because another scheme handles them.

    ``device``: where the shards live; by default the model's. A model on the meta device (built under
    ``torch.device("meta")``) is sharded without memory and materialised after:
    :func:`condformer.parallel.meta_init.materialize`.

    Build the optimiser *after* this call: sharding replaces every parameter by a DTensor.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    if device.type == "meta":
        raise ConfigError("the model is on the meta device: pass shard_model the device its shards will live on "
                          "(device=...)")
    policy = mixed_precision(precision, device)
    if offload and device.type != "cuda":
        raise ConfigError(f"FSDP offload keeps parameters and optimiser state in CPU memory instead of the GPU's; "
                          f"this model is on {device.type} already: drop the offload option")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(NO_PROCESS_GROUP)
    if is_sharded(model):
        raise ConfigError("this model is sharded already (shard_model was applied to it); shard a fresh model")
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise ConfigError(f"shard_model needs a condformer Transformer (with .layers), got {type(model).__name__}")
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    elif mesh.device_type != device.type:
        raise ConfigError(f"the device mesh is on {mesh.device_type} but the model is on {device}; move the model "
                          f"to the mesh's device before sharding")
    off = CPUOffloadPolicy() if offload else OffloadPolicy()
    if policy.param_dtype is not None and policy.param_dtype != torch.float32:
        _fp32_routers(model, mesh, reshard_after_forward, off)
    scalars = _replicate_scalars(model, mesh, device)
    ignored = set(ignored or ()) | _shard_expert_replicas(model, policy, reshard_after_forward, off)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    offload_policy=off, ignored_params=scalars | (ignored & set(layer.parameters())))
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy, offload_policy=off,
                ignored_params=scalars | ignored)
    return model


def _replicate_scalars(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> set[nn.Parameter]:
    """0-dim parameters (the shaped blocks' beta_sa, beta_ff), which FSDP2 cannot shard: kept whole on every
    rank, outside FSDP, with their gradients averaged over the mesh as soon as they are accumulated (what
    FSDP's reduce-scatter does for the others). They cost a few bytes and one tiny all-reduce each.

    On a meta-device model they are allocated here, before their hooks: allocating a meta parameter later
    (``to_empty``) makes a new parameter object, which would not carry the hook.
    """
    real: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.dim() == 0 and p.is_meta:
                if id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty((), dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                setattr(module, name, real[id(p)])
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(functools.partial(_average_grad, mesh=mesh))
    return scalars


def _average_grad(p: torch.Tensor, mesh: DeviceMesh) -> None:
    for dim in range(mesh.ndim):  # every mesh dimension is data-parallel here
        dist.all_reduce(p.grad, group=mesh.get_group(dim))
    p.grad.div_(mesh.size())


def is_sharded(model: nn.Module) -> bool:
    """Whether ``shard_model`` (or any ``fully_shard``) was applied to ``model`` itself."""
    return isinstance(model, FSDPModule)


# -- training-step helpers -----------------------------------------------------------------------
def clip_grad_norm(parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model: the global norm, as a plain tensor.

    The gradients are DTensor shards (their norm needs a reduction over the mesh, which torch's
    ``get_total_norm`` does, returning a replicated DTensor) and, for the scalar parameters FSDP leaves
    unsharded, plain tensors already averaged over the ranks (counted once). The norm is taken per kind and
    combined (the p-norm of the p-norms is the p-norm of all), every gradient is scaled by the one factor,
    and the norm comes back as a plain tensor that the trainer's ``isfinite(loss) & isfinite(norm)`` accepts.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded, norm_type).full_tensor()] if sharded else []
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, norm_type))
    if not norms:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(norms, norm_type) if len(norms) > 1 else norms[0]
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@dataclass
class ShardSizes:
    """Bytes of parameters (and optimiser state) this rank holds, against the unsharded model's."""

    local_param_bytes: int
    full_param_bytes: int
    local_optim_bytes: int = 0

    @property
    def param_fraction(self) -> float:
        return self.local_param_bytes / max(self.full_param_bytes, 1)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def shard_sizes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ShardSizes:
    """What this rank stores: its parameter shards and optimiser state vs the full parameters (tied: once).

    With N ranks the local shares are about 1/N of the full ones (dim-0 shards are padded to equal sizes, so
    a tensor with fewer rows than ranks sits on the first ranks).
    """
    params = list(model.parameters())
    local = sum(_local_bytes(p) for p in params)
    full = sum(p.numel() * p.element_size() for p in params)
    optim = 0
    if optimizer is not None:
        optim = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
    return ShardSizes(local, full, optim)


# -- consolidated state for the single-file checkpoints ------------------------------------------
def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (the head tied to the embedding), first name first."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _snapshot(sd: dict[str, Any], live: Any) -> dict[str, Any]:
    """``sd`` with every tensor a compact one of its own.

    torch gathers a DTensor into a new tensor, but one with fewer rows than ranks comes back as a view into
    the padded gather buffer (safetensors refuses a tensor that does not cover its storage), and the model's
    own plain tensors (buffers such as ``expert_bias``, the replicated scalars, their optimiser state) come
    back as themselves when they are on the CPU already, so the next step would change a state taken before it.
    """
    ptrs = {t.data_ptr() for t in live if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)}

    def own(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        compact = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t if compact and t.data_ptr() not in ptrs else t.clone(memory_format=torch.contiguous_format)

    return {k: own(v) for k, v in sd.items()}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's ``state_dict()`` on rank 0's CPU (``{}`` on other ranks); every rank must call it.

    Same names, shapes and values as the model before sharding, buffers included (rank 0's), all of them
    copies that later steps leave alone. Tied names map to one tensor, as in an unsharded model, so that
    safetensors' ``save_model`` (which dedups by shared storage) stores the tie once, under the same name as
    a single-process run does.
    """
    sd = _snapshot(get_model_state_dict(model, options=_FULL), model.state_dict().values())
    if sd:
        for first, *aliases in _tied_names(model):
            for alias in aliases:
                sd[alias] = sd[first]
    return sd


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimiser's ``state_dict()`` on rank 0's CPU (``{}`` elsewhere); every rank must call it.

    torch's full optimiser state is keyed by parameter names; a torch optimiser's own ``state_dict`` (what
    ``condformer.checkpoint.optimizer_to_flat`` stores) numbers the parameters in param-group order. Both
    list the groups' parameters in the optimiser's order, so the numbers follow from the positions.
    """
    sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not sd:
        return {}
    live = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    sd["state"] = {name: _snapshot(st, live) for name, st in sd["state"].items()}
    index, groups = {}, []
    for group in sd["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: st for name, st in sd["state"].items()}, "param_groups": groups}


@dataclass
class FullOptimizerState:
    """A consolidated optimiser state standing in for the optimiser where only ``state_dict()`` is read."""

    sd: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.sd


def consolidate(model: Transformer, optimizer: torch.optim.Optimizer | None = None
                ) -> tuple[Transformer | None, FullOptimizerState | None]:
    """What a single-process run would hold, on rank 0: an unsharded CPU model and its optimiser's state.

    ``condformer.checkpoint.save_checkpoint(run, step, *consolidate(model, optimizer), ...)`` on rank 0 then
    writes the files an unsharded run writes. The model is built on the meta device and takes the gathered
    tensors as they are (no second copy); it is for saving, not running (its non-persistent buffers, such as
    rotary tables, stay on the meta device). Collective: every rank calls it; other ranks get ``(None, None)``.
    """
    model_sd = full_model_state(model)
    optim_sd = full_optimizer_state(model, optimizer) if optimizer is not None else None
    if dist.get_rank() != 0:
        return None, None
    with torch.device("meta"):
        full = build_model(model.cfg)
    full.load_state_dict(model_sd, assign=True)
    return full.train(model.training), None if optim_sd is None else FullOptimizerState(optim_sd)


def _with_tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights with tied names filled in (safetensors files store a tie under one name)."""
    out = dict(sd)
    for names in _tied_names(model):
        stored = [n for n in names if n in out]
        for name in names:
            if stored and name not in out:
                out[name] = out[stored[0]]
    return out


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_sd: dict[str, torch.Tensor] | None, optim_sd: dict[str, Any] | None, *,
                    from_rank0: bool = True) -> None:
    """Load consolidated (single-process layout) weights and optimiser state into a sharded model.

    ``model_sd``: names as ``model.state_dict()`` (a tie may be stored under one name); ``optim_sd``: a torch
    optimiser ``state_dict()`` (parameters numbered in group order). Either may be None to leave that part
    alone (the trainer loads a checkpoint's weights before sharding). ``from_rank0``: only rank 0's dicts are
    read and torch broadcasts each tensor (other ranks pass ``{}``); False: every rank passes the same full
    dicts. Collective: every rank calls it with the same parts None, or the ranks wait for each other.
    """
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    sending = dist.get_rank() == 0 or not from_rank0
    if model_sd is not None:
        set_model_state_dict(model, _with_tied(model, model_sd) if sending else {}, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, _named_optimizer_state(model, optimizer, optim_sd)
                                 if sending else {}, options=opts)


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                           sd: dict[str, Any]) -> dict[str, Any]:
    """A numbered optimiser state dict keyed by parameter names instead, as torch's set_* functions expect."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ordered = [names[id(p)] for p in params]
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_saved != len(ordered) or len(sd["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the optimiser state holds {n_saved} parameters in {len(sd['param_groups'])} groups, "
                          f"this optimiser {len(ordered)} in {len(optimizer.param_groups)}; the checkpoint was "
                          f"written for another model or trainable set")
    # torch scatters a DTensor parameter's full state into new shards but keeps plain tensors (step counts, the
    # replicated scalars' moments) as given: copies, so that training does not write into the caller's dict
    state = {ordered[int(i)]: {k: v.clone() if isinstance(v, torch.Tensor) and (v.dim() == 0 or not isinstance(
        params[int(i)], DTensor)) else v for k, v in st.items()} for i, st in sd["state"].items()}
    groups = [{**g, "params": [ordered[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}
