"""Expert parallelism: each MoE layer's experts split over the ``ep`` ranks of a mesh, tokens moved by all-to-all.

With ``ep = R`` ranks in a group, rank j holds experts ``[j*E/R, (j+1)*E/R)`` of every MoE layer (GShard,
Lepikhin et al. 2020, arXiv 2006.16668, section 3; DeepSpeed-MoE and torchtitan do the same). A layer then
runs in five moves, every rank doing each move at once::

    route own tokens (as in one process)  ->  sort pairs by expert = by destination rank
    all-to-all counts (one host sync)     ->  all-to-all rows to their experts' ranks
    local experts (StackedExperts.grouped, the same kernel as dropless dispatch, on rows grouped by expert)
    all-to-all outputs back               ->  unsort, combine the K choices in the fixed order of dispatch._combine

Shapes (as in :mod:`condformer.routing.moe.dispatch`): N this rank's tokens, K choices, D d_model, E the
layer's real experts, R ranks in the ep group, L = E / R local experts, P = N*K pairs. Ids >= E (no-op
experts of integrated MoDE, padding, pairs dropped by a capacity limit) are never sent and add zero.

Why the output does not depend on the world size: each (token, choice) pair meets the same expert weights
and the K results are summed in choice order on the token's own rank, exactly as in
:func:`~condformer.routing.moe.dispatch.dropless`; on the expert's rank, rows arrive grouped by source rank
and, within it, in token order, so an expert's rows are the global batch's rows in order.

Host sync: the split sizes of an all-to-all are host integers (``torch.distributed`` takes Python lists),
so each layer and forward reads one small tensor (R + E integers) after the all-to-all of the counts. That
is the price of dropless EP without padding to a worst case; the backward pass reuses the sizes.

Gradients (the trainer's part): each rank's loss is the mean over its own rows and DDP/FSDP *average*
replicated gradients over the W data-parallel ranks. An expert's gradient arrives by the backward all-to-all
already *summed* over the ranks whose tokens it served, so :func:`reduce_expert_grads` (after the last
backward of a step) scales it by 1/W and, where the same experts live in several ep groups (W > ep), sums the
copies; under FSDP2 the experts' own groups do both (:mod:`condformer.parallel.fsdp`). No tensor hooks: a
model built on the meta device gets new parameter objects when it is allocated, which would drop them.
The grad norm must count every shard once: :func:`clip_grad_norm_`.
Checkpoints in the single-process layout: :mod:`condformer.parallel.expert_checkpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from condformer.errors import ConfigError
from condformer.routing.moe.dispatch import _combine, count_ids, gather_rows, inverse_permutation
from condformer.routing.moe.experts import StackedExperts
from condformer.routing.moe.ffn import MoEFFN

EP_DIM = "ep"  # the mesh dimension experts are sharded over
REPLICATE_DIM = "ep_replicate"  # the other one: ep groups holding the same experts (world > ep)
EXPERT_WEIGHTS = ("w_up", "w_down")  # the stacked (E, ...) parameters of a StackedExperts bank
UNSUPPORTED_ROUTERS = ("expert_choice", "soft")  # they never reach MoEFFN's token-choice dispatch hook


# -- the mesh ---------------------------------------------------------------------------------------
def expert_mesh(ep: int, device_type: str = "cpu") -> DeviceMesh:
    """A (world / ep, ep) mesh named (``ep_replicate``, ``ep``): ep groups are runs of consecutive ranks.

    Consecutive ranks share a node first, so the all-to-alls stay on the fastest links (NVLink) where they
    can. Every rank must call this (it creates process groups).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("expert_parallel needs torch.distributed initialised; launch with torchrun "
                          "--nproc_per_node=N (N a multiple of expert_parallel)")
    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ConfigError(f"expert_parallel {ep} does not divide the world size {world}; choose a divisor of {world}")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=(REPLICATE_DIM, EP_DIM))


def _mesh_groups(mesh: DeviceMesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(ep group, replicate group or None) of a mesh with an ``ep`` dimension (1-D meshes: all of it is ep)."""
    names = mesh.mesh_dim_names or ()
    if mesh.ndim == 1:
        return mesh.get_group(), None
    if EP_DIM not in names or mesh.ndim != 2:
        raise ConfigError(f"expert_parallel needs a 1-D mesh or a 2-D mesh with a dimension named '{EP_DIM}', got "
                          f"dimensions {names or mesh.ndim}; build one with expert_mesh(ep)")
    other = names[1 - names.index(EP_DIM)]
    return mesh.get_group(EP_DIM), mesh.get_group(other)


# -- timing (the benchmark helper's probe) ---------------------------------------------------------------
class _Timer:
    """Seconds spent inside the collectives of one layer, forward and backward (only while benchmarking).

    Each interval waits for its collective (and, on CUDA, the device) at both ends, so overlap is given up
    while measuring: the numbers say how long the exchanges take, not how much of them could be hidden.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.pairs_sent = 0
        self.pairs_received = 0
        self._open: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, name: str) -> None:
        self._sync()
        self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._open.pop(name)

    def backward_probe(self, before: torch.Tensor, after: torch.Tensor, name: str) -> None:
        """Time the backward all-to-all between ``before`` (its output) and ``after`` (its input)."""
        def open_(g: torch.Tensor) -> None:
            self.start(name)

        def close(g: torch.Tensor) -> torch.Tensor:
            g = funcol.wait_tensor(g)
            self.stop(name)
            return g

        before.register_hook(open_)
        after.register_hook(close)


# -- the per-layer object MoEFFN calls -----------------------------------------------------------------------
class ExpertParallel:
    """Stored in ``MoEFFN.expert_parallel``: moves a layer's (token, choice) pairs to their experts and back."""

    def __init__(self, n_experts: int, mesh: DeviceMesh, layer_index: int) -> None:
        self.mesh = mesh
        self.group, self.replicate_group = _mesh_groups(mesh)
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.data_parallel = mesh.size()  # ranks whose losses are averaged: every rank of the mesh
        self.n_experts = n_experts
        self.n_local = n_experts // self.size
        self.first = self.rank * self.n_local  # this rank's experts: [first, first + n_local)
        self.layer_index = layer_index
        self.timer: _Timer | None = None
        # set by condformer.parallel.fsdp when FSDP2 shards this layer's experts over the replicate dimension:
        # FSDP then reduces their gradients (sum over replicas / W) instead of reduce_expert_grads
        self.fsdp_replicas = False
        self.last_sent = 0  # pairs this rank sent / received in the last forward (host integers, free to read)
        self.last_received = 0

    @property
    def replicas(self) -> int:
        """How many ep groups hold this rank's experts (the size of the replicate dimension)."""
        return 1 if self.replicate_group is None else dist.get_world_size(self.replicate_group)

    def __repr__(self) -> str:
        return (f"ExpertParallel(layer={self.layer_index}, experts {self.first}..{self.first + self.n_local - 1} "
                f"of {self.n_experts}, ep rank {self.rank} of {self.size})")

    # -- forward ---------------------------------------------------------------------------------
    def dispatch(self, x_ND: torch.Tensor, expert_NK: torch.Tensor, gate_NK: torch.Tensor,
                 bank: StackedExperts, record: bool = True) -> torch.Tensor:
        """y_ND = sum_j gate_nj * expert_(e_nj)(x_n) over the real pairs, experts on whichever rank holds them.

        ``record``: count the pairs moved (False in activation checkpointing's recomputation, which moves them
        again: the time is real and is measured, the pairs are the same ones)."""
        N, K = expert_NK.shape
        E, R = self.n_experts, self.size
        e_P = expert_NK.reshape(-1)  # pair p = n*K + j
        key_P = torch.where(e_P < E, e_P, E)  # no-op, padding and dropped pairs sort last and stay home
        order_P = torch.argsort(key_P, stable=True)  # by expert, hence by destination rank (experts are contiguous)
        inverse_P = inverse_permutation(order_P)
        counts_E = count_ids(key_P, E + 1)[:E]
        recv_RL = self._exchange_counts(counts_E)
        # the one host sync: what this rank sends to each rank, and what each rank sends to each local expert
        sizes = torch.cat([counts_E.view(R, -1).sum(dim=1), recv_RL.reshape(-1)]).tolist()
        send_R, recv_RL_host = sizes[:R], sizes[R:]
        recv_R = [sum(recv_RL_host[r * self.n_local:(r + 1) * self.n_local]) for r in range(R)]
        n_send = sum(send_R)
        # rows travel in the experts' compute dtype (bf16 under autocast: half the bytes); the expert kernel
        # would cast them on arrival anyway, so the numbers are those of one process
        x_sorted = gather_rows(x_ND.to(_compute_dtype(x_ND)), order_P, inverse_P, K)
        x_send = x_sorted[:n_send]
        x_recv = self._all_to_all(x_send, recv_R, send_R, "dispatch")
        out_recv = self._local_experts(x_recv, recv_RL, recv_RL_host, bank)
        out_sent = self._all_to_all(out_recv, send_R, recv_R, "combine")
        out_sorted = torch.cat([out_sent, out_sent.new_zeros(N * K - n_send, out_sent.shape[1])])
        if not record:
            return _combine(gather_rows(out_sorted, inverse_P, order_P), gate_NK, x_ND)
        self.last_sent, self.last_received = n_send, sum(recv_R)
        if self.timer is not None:
            self.timer.pairs_sent += n_send
            self.timer.pairs_received += self.last_received
        return _combine(gather_rows(out_sorted, inverse_P, order_P), gate_NK, x_ND)

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """(R, L): how many pairs each rank of the group sends to each of this rank's experts."""
        if self.timer is not None:
            self.timer.start("counts")
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E, group=self.group)  # equal splits: L counts to each rank
        if self.timer is not None:
            self.timer.stop("counts")
        return recv.view(self.size, self.n_local)

    def _all_to_all(self, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], name: str) -> torch.Tensor:
        """Rows to the ranks given by ``in_sizes``; autograd's backward is the reverse all-to-all."""
        timer = self.timer
        if timer is not None:
            timer.start(f"{name}_forward")
        y = funcol.all_to_all_single_autograd(x.contiguous(), out_sizes, in_sizes, self.group)
        y = funcol.wait_tensor(y)
        if timer is not None:
            timer.stop(f"{name}_forward")
            if y.requires_grad:
                timer.backward_probe(y, x, f"{name}_backward")
        return y

    def _local_experts(self, x_recv: torch.Tensor, recv_RL: torch.Tensor, recv_RL_host: list[int],
                       bank: StackedExperts) -> torch.Tensor:
        """Received rows (grouped by source rank, then by local expert) through the local experts.

        The expert kernel wants rows grouped by expert, so the (source, expert) blocks are transposed to
        (expert, source) order by a permutation, and back after; within an expert the rows stay in source
        rank order, i.e. the global batch's token order.
        """
        R, L = self.size, self.n_local
        dest = None
        if R > 1 and L > 1:
            dest = _block_transpose(recv_RL, x_recv.shape[0])
            order = inverse_permutation(dest)
            x_grp = gather_rows(x_recv, order, dest)
        else:  # one source or one expert: already grouped
            x_grp = x_recv
        out_grp = bank.sized(x_grp, [sum(recv_RL_host[r * L + e] for r in range(R)) for e in range(L)])
        if dest is None:
            return out_grp
        return gather_rows(out_grp, dest, order)


def _compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The experts' compute dtype: autocast's when it is on, else the input's (as StackedExperts decides)."""
    if torch.is_autocast_enabled(like.device.type):
        return torch.get_autocast_dtype(like.device.type)
    return like.dtype


def _block_transpose(sizes_RL: torch.Tensor, total: int) -> torch.Tensor:
    """dest[i]: where row i of an (R, L)-block layout (row-major blocks of ``sizes_RL`` rows) goes in the
    (L, R)-block layout of the same blocks; computed on the device."""
    R, L = sizes_RL.shape
    flat = sizes_RL.reshape(-1)
    start_in = torch.cumsum(flat, 0) - flat
    col = sizes_RL.t().reshape(-1)
    start_out = (torch.cumsum(col, 0) - col).view(L, R).t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(R * L, device=flat.device), flat, output_size=total)
    return start_out[block] + torch.arange(total, device=flat.device) - start_in[block]


# -- sharding a model ----------------------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list[MoEFFN]:
    """Every MoE FFN of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def parallel_layers(model: nn.Module) -> list[tuple[MoEFFN, ExpertParallel]]:
    """(layer, its ExpertParallel) for every sharded MoE layer."""
    return [(m, m.expert_parallel) for m in moe_layers(model) if m.expert_parallel is not None]


def _check(model: nn.Module, size: int, world: int) -> list[MoEFFN]:
    if world % size:
        raise ConfigError(f"expert_parallel {size} does not divide the world size {world}; "
                          f"choose a divisor of {world}")
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("expert_parallel needs a model with MoE layers (ffn 'moe'); this one has none")
    for m in layers:
        if m.expert_parallel is not None:
            raise ConfigError(f"MoE layer {m.layer_index} is already expert-parallel; call shard_experts once")
        if m.kind in UNSUPPORTED_ROUTERS:
            raise ConfigError(f"expert_parallel needs token-choice routing, but layer {m.layer_index} uses "
                              f"moe_router '{m.kind}'; use topk, switch, noisy_topk, hash or lsh there")
        if m.n_experts % size:
            raise ConfigError(f"expert_parallel {size} does not divide the {m.n_experts} experts of layer "
                              f"{m.layer_index}; choose a divisor of {m.n_experts}")
    return layers


def shard_experts(model: nn.Module, ep: int | DeviceMesh, optimizer: torch.optim.Optimizer | None = None, *,
                  device: torch.device | str | None = None) -> int:
    """Keep only this rank's experts in every MoE layer and attach an :class:`ExpertParallel`; returns the count.

    ``ep``: the ep size (a (world/ep, ep) mesh is built with :func:`expert_mesh`) or a mesh with an ``ep``
    dimension. Every rank calls it, with the same full model (the weights are broadcast from rank 0 first, as
    DDP does for its own). The parameters keep their objects and names (``...ffn.bank.w_up``) and change
    shape to (E/ep, ...); an optimizer built before keeps working, and one whose state was loaded from a
    single-process checkpoint is sliced too when passed as ``optimizer``. The expert weights are also marked
    for DDP to ignore (they differ between ranks); :func:`reduce_expert_grads` must follow each step's backward.

    A model on the meta device (FSDP2's deferred initialisation, :mod:`condformer.parallel.meta_init`) only
    changes shape here (pass the ``device`` it will live on, for the mesh); its values arrive after sharding,
    from rank 0 (:func:`condformer.parallel.meta_init.materialize`).
    """
    device_type = torch.device(device).type if device is not None else _device_type(model)
    if device_type == "meta":
        raise ConfigError("the model is on the meta device: pass shard_experts the device it will live on "
                          "(device=...)")
    mesh = ep if isinstance(ep, DeviceMesh) else expert_mesh(int(ep), device_type)
    group, _ = _mesh_groups(mesh)
    layers = _check(model, dist.get_world_size(group), mesh.size())
    for m in layers:
        par = ExpertParallel(m.n_experts, mesh, m.layer_index)
        for name in EXPERT_WEIGHTS:
            p = getattr(m.bank, name)
            with torch.no_grad():
                full = p.detach().contiguous()
                if not full.is_meta:
                    dist.broadcast(full, src=0)  # replicas and shards must come from one set of weights
                p.data = full[par.first:par.first + par.n_local].clone()
        m.bank.n_experts = par.n_local
        m.expert_parallel = par
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    if optimizer is not None:
        shard_optimizer_state(model, optimizer)
    return len(layers)


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cpu" if p is None else p.device.type


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded expert weights (what DDP / FSDP2 must leave alone)."""
    ids = {id(p) for p in expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert weights of every expert-parallel layer (shared experts stay replicated: not here)."""
    return [getattr(m.bank, name) for m, _ in parallel_layers(model) for name in EXPERT_WEIGHTS]


# -- gradients ------------------------------------------------------------------------------------------------
def reduce_expert_grads(model: nn.Module) -> None:
    """Expert gradients as DDP leaves every other one: the mean over the W ranks' losses.

    Each is scaled by 1/W and summed over the ep groups holding the same experts (when world > ep). Call once
    per optimiser step after the last backward (with gradient accumulation: after the micro-batch DDP
    synchronises on), before clipping. Layers whose experts FSDP2 shards over those groups are left to it.
    """
    for m, par in parallel_layers(model):
        if par.fsdp_replicas:
            continue
        for name in EXPERT_WEIGHTS:
            p = getattr(m.bank, name)
            if not p.requires_grad:
                continue
            if p.grad is None:
                if par.replicas == 1:
                    continue
                p.grad = torch.zeros_like(p)  # every replica must join the collective, even one with no gradient
            if par.data_parallel > 1:
                p.grad.div_(par.data_parallel)
            if par.replicas > 1:
                dist.all_reduce(p.grad, group=par.replicate_group)


def clip_grad_norm_(model: nn.Module, parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) for a model with sharded experts: the same norm on every rank.

    Replicated gradients (averaged by DDP, or DTensor shards under FSDP2) count once; each rank's expert
    shards are summed over the ep group. A plain per-rank norm would differ between ranks and so clip the
    replicated weights differently: they would drift apart.
    """
    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in parameters if p.grad is not None]
    shared = [p for p in params if id(p) not in experts]
    local = [p for p in params if id(p) in experts]
    device = params[0].grad.device if params else torch.device("cpu")
    sq = _norm_sq(shared, device)
    layers = parallel_layers(model)
    expert_sq = _norm_sq(local, device)
    if layers:
        dist.all_reduce(expert_sq, group=layers[0][1].group)
    total = (sq + expert_sq).sqrt()
    for group in (shared, local):  # apart: foreach kernels refuse lists mixing DTensors and plain tensors
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _norm_sq(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """Squared L2 norm of the gradients in float32 or wider (float64 gradients keep float64)."""
    if not params:
        return torch.zeros((), device=device, dtype=torch.float32)
    n = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    full = getattr(n, "full_tensor", None)  # a DTensor (FSDP2-sharded gradients): the norm over all shards
    n = full() if full is not None else n
    return n.to(torch.promote_types(n.dtype, torch.float32)).square().to(device)


# -- shards: gathering them, slicing a single-process optimizer state, FSDP2 groups ---------------------------
def gather_shards(par: ExpertParallel, t: torch.Tensor) -> torch.Tensor:
    """A per-expert tensor of this rank's experts (L, ...) -> all E experts' (E, ...) (collective over ep)."""
    parts = [torch.empty_like(t) for _ in range(par.size)]
    dist.all_gather(parts, t.contiguous(), group=par.group)
    return torch.cat(parts)


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Slice expert optimizer state loaded in the single-process layout (E, ...) to this rank's experts.

    For resuming: ``load_optimizer`` fills the state with full tensors (``load_state_dict`` does not check
    shapes); the fused AdamW step needs them shaped like the local parameters.
    """
    for m, par in parallel_layers(model):
        for name in EXPERT_WEIGHTS:
            p = getattr(m.bank, name)
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.shape[0] == par.n_experts \
                        and value.shape[1:] == p.shape[1:] and par.n_local != par.n_experts:
                    state[key] = value[par.first:par.first + par.n_local].clone()


def split_expert_groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Move the expert weights of every param group into a twin group with the same settings (in place).

    Needed with FSDP2: its parameters are DTensors and the fused / foreach AdamW kernels refuse a group mixing
    DTensors with the plain expert shards. Call before the first step (no state yet). Under DDP it is not needed.
    """
    if optimizer.state:
        raise ConfigError("split_expert_groups must run before the optimizer's first step (it has state already)")
    experts = {id(p) for p in expert_parameters(model)}
    twins = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in experts]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in experts]
            twins.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
    for twin in twins:
        optimizer.add_param_group(twin)


# -- the benchmark helper ------------------------------------------------------------------------------------
def measure_all_to_all(model: nn.Module, step: Callable[[], Any], steps: int = 5, warmup: int = 2) -> dict[str, float]:
    """Share of a training step spent in the expert all-to-alls, averaged over steps and ranks (collective).

    ``step()`` runs one whole training step (forward, backward, optimiser). Timed: the count exchange, the
    dispatch and combine all-to-alls in the forward pass and their reverses in the backward pass, each
    waited for at both ends (so nothing overlaps while measuring). Returns seconds per step (``step_s``,
    ``all_to_all_s`` and each part), ``share`` = all_to_all_s / step_s, and pairs sent / received per step.
    """
    layers = parallel_layers(model)
    if not layers:
        raise ConfigError("measure_all_to_all needs an expert-parallel model; call shard_experts first")
    device = next(model.parameters()).device
    for _ in range(warmup):
        step()
    timers = [_Timer(device) for _ in layers]
    for (_, par), timer in zip(layers, timers, strict=True):
        par.timer = timer
    try:
        whole = _Timer(device)
        whole.start("step")
        for _ in range(steps):
            step()
        whole.stop("step")
    finally:
        for _, par in layers:
            par.timer = None
    parts: dict[str, float] = {}
    for t in timers:
        for k, v in t.seconds.items():
            parts[k] = parts.get(k, 0.0) + v
    keys = sorted(parts)
    values = [whole.seconds["step"], *(parts[k] for k in keys), sum(t.pairs_sent for t in timers),
              sum(t.pairs_received for t in timers)]
    mean = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    mean = (mean / dist.get_world_size() / steps).tolist()
    out = {"step_s": mean[0], **{f"{k}_s": v for k, v in zip(keys, mean[1:-2], strict=True)},
           "pairs_sent": mean[-2], "pairs_received": mean[-1]}
    out["all_to_all_s"] = sum(out[f"{k}_s"] for k in keys)
    out["share"] = out["all_to_all_s"] / max(out["step_s"], 1e-12)
    return out
