"""Expert parallelism (``condformer.parallel.expert_parallel``) against one process running the unsharded model.

A global batch is split by rows over W gloo ranks; each rank holds E/ep experts of every MoE layer. The
reference is one process (no process group) running the same float64 model, weights perturbed, on the
whole batch. Compared: each rank's logits, the mean over ranks of the loss and of every auxiliary loss,
the gradient of every parameter (replicated ones averaged over ranks as DDP does, experts gathered) for
every causal router, integrated MoDE's no-op experts, capacity (a keep mask over the global batch), and
ep < world (experts replicated over two ep groups). Then direct calls of ``ExpertParallel.dispatch``
(ids >= E not sent, a rank that receives nothing), a 2-rank DDP + AdamW training run against the
single-process trajectory, its checkpoint loaded by one process, a resume from the gathered optimizer
state, the all-to-all benchmark helper, and the one-line errors. Each group of checks runs in one spawn.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model
from tests.parallel.spawn import run_ranks

from condformer.config import LayerSpec, ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.model import Transformer, build_model
from condformer.optim import before_optimizer_step, make_optimizer
from condformer.parallel import expert_checkpoint as CK
from condformer.parallel import expert_parallel as EP
from condformer.routing.moe import dispatch

F64 = torch.float64
TOL = {"rtol": 0, "atol": 1e-10}
B_GLOBAL, T, V = 4, 8, 260
DENSE = {"capacity_factor": None}  # dropless in training
# the router cases: every causal token-choice router, no-op experts, capacity, shared fine-grained experts
CASES = {
    "topk": {"top_k": 2, "aux_free_rate": 0.01, **DENSE},  # + a perturbed aux-free bias in the selection
    "switch": {"moe_router": "switch", **DENSE},
    "noisy_topk": {"moe_router": "noisy_topk", "top_k": 2, "load_coef": 0.01, **DENSE},
    "hash": {"moe_router": "hash", **DENSE},
    "lsh": {"moe_router": "lsh", **DENSE},
    "null": {"top_k": 2, "null_experts": 2, **DENSE},  # integrated MoDE
    "capacity": {"top_k": 2, "capacity_factor": 1.0},  # tight: pairs are dropped
    "shared": {"top_k": 3, "shared_experts": 1, "expert_dim": 16, "importance_coef": 0.01, **DENSE},
}
# (ep, experts) per world size; world 4 with ep 2 holds every expert twice
SETUPS = {2: [(2, 4), (2, 8)], 4: [(4, 8), (4, 4), (2, 4)]}
SHORT = ("topk", "null", "capacity")  # the cases also run where a setup would otherwise repeat itself


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the model, its data, the noise ---------------------------------------------------------------------------
def _cfg(options: dict, experts: int, mlp: str = "gelu") -> ModelConfig:
    """Two layers: dense, then MoE (so the gradients of attention, norms, embeddings and head are checked too)."""
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=V, d_ff=64, init_std=0.1,
                       mlp=mlp, layers=[LayerSpec(), LayerSpec(ffn="moe", options={**options, "experts": experts})])


def _model(options: dict, experts: int, seed: int = 0) -> Transformer:
    """float64, every parameter and the aux-free bias perturbed; the router scaled up so tokens disagree."""
    mlp = "swiglu" if "shared_experts" in options else "gelu"
    torch.manual_seed(seed)
    model = build_model(_cfg(options, experts, mlp)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=F64))
            if name.endswith("router.weight"):
                p.mul_(4.0)
            if name.endswith("noise_weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.add_(0.05 * torch.randn(b.shape, generator=g, dtype=F64))
    return model


def _batch(seed: int = 0, b: int = B_GLOBAL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randint(0, V, (b, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _noise(n_total: int, seed: int = 0) -> torch.Tensor:
    """The noisy top-k router's N(0, 1) draws for the global batch's tokens (one MoE layer, one forward)."""
    return torch.randn(B_GLOBAL * T, n_total, generator=torch.Generator().manual_seed(200 + seed), dtype=F64)


@contextlib.contextmanager
def _fixed_noise(noise_NE: torch.Tensor):
    """The router's ``torch.randn_like`` returns the given draws: a rank and the reference see the same noise
    for the same token (the draws of a real run depend on the shape, so they could not agree)."""
    original = torch.randn_like

    def fake(like: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert like.shape == noise_NE.shape, (like.shape, noise_NE.shape)
        return noise_NE.to(like)

    torch.randn_like = fake
    try:
        yield
    finally:
        torch.randn_like = original


def _rows(rank: int, world: int) -> slice:
    b = B_GLOBAL // world
    return slice(rank * b, (rank + 1) * b)


def _run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None) -> dict:
    """One training forward and backward: logits, loss, each aux loss (gradients left in the parameters)."""
    model.train()
    with _fixed_noise(noise) if noise is not None else contextlib.nullcontext():
        o = model(x, y)
    o.train_loss.backward()
    return {"logits": o.logits.detach(), "loss": float(o.loss.detach()),
            "aux": {k: float(v.detach()) for k, v in o.aux_losses.items()}}


# -- the rank side ---------------------------------------------------------------------------------------------
def _layer_cases(rank: int, world: int, setups: list, cases: dict) -> dict:
    """Every (ep, experts, case): this rank's logits and losses, and the gradients as a DDP run would hold them."""
    x, y = _batch()
    rows = _rows(rank, world)
    out = {}
    meshes = {ep: EP.expert_mesh(ep) for ep in sorted({ep for ep, _ in setups})}  # built once: new groups cost
    for ep, experts in setups:
        for name, options in cases.items():
            if (ep, experts) != setups[0] and name not in SHORT:
                continue
            model = _model(options, experts)
            assert EP.shard_experts(model, meshes[ep]) == 1
            noise = None
            if options.get("moe_router") == "noisy_topk":
                n_total = experts + options.get("null_experts", 0)
                noise = _noise(n_total)[rows.start * T:rows.stop * T]
            r = _run(model, x[rows], y[rows], noise)
            EP.reduce_expert_grads(model)
            experts_ = set(EP.expert_parameter_names(model))
            full = CK.full_expert_state(model)  # the weights, gathered: must equal the unsharded ones
            grads = {}
            for n, p in model.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if n in experts_:
                    grads[n] = EP.gather_shards(EP.moe_layers(model)[0].expert_parallel, g)
                else:  # DDP's average
                    g = g.clone()
                    torch.distributed.all_reduce(g)
                    grads[n] = g / world
            out[(ep, experts, name)] = {**r, "grads": grads if rank == 0 else None,
                                        "weights": full if rank == 0 else None}
    return out


def _dispatch_cases(rank: int, world: int) -> dict:
    """Direct calls: ids >= E (no-op experts, padding, dropped pairs) are not sent and add zero; a rank whose
    experts get no pair at all; outputs and gradients against ``dispatch.dropless`` on the whole batch."""
    out = {}
    E, n_total, N, K = 4, 6, 12, 2
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(world * N, 32, dtype=F64, generator=g)
    ids = {"mixed": torch.randint(0, n_total + 1, (world * N, K), generator=g),  # n_total = padding / dropped
           "one_expert": torch.zeros(world * N, K, dtype=torch.long)}  # every other rank receives nothing
    ids["one_expert"][:, 1] = n_total
    gate_all = torch.rand(world * N, K, dtype=F64, generator=g)
    mesh = EP.expert_mesh(world)
    for name, expert_all in ids.items():
        model = _model({"top_k": 2, "null_experts": 2, **DENSE}, E)
        EP.shard_experts(model, mesh)
        ffn = EP.moe_layers(model)[0]
        par = ffn.expert_parallel
        rows = slice(rank * N, (rank + 1) * N)
        xr = x_all[rows].clone().requires_grad_(True)
        y = par.dispatch(xr, expert_all[rows], gate_all[rows], ffn.bank)
        sent = par.last_sent
        (y * torch.linspace(-1, 1, 32, dtype=F64)).sum().backward()
        EP.reduce_expert_grads(model)
        grads = {n: EP.gather_shards(par, getattr(ffn.bank, n).grad) for n in EP.EXPERT_WEIGHTS}
        out[name] = {"y": y.detach(), "x_grad": xr.grad, "sent": sent, "received": par.last_received,
                     "expected_sent": int((expert_all[rows] < E).sum()), "grads": grads}
    return out


def _bad_inputs(rank: int, world: int) -> dict:
    def msg(fn) -> str:
        try:
            fn()
        except ConfigError as e:
            return str(e)
        return "no error"

    sharded = _model({"top_k": 2, **DENSE}, 4)
    EP.shard_experts(sharded, world)
    return {
        "world": msg(lambda: EP.shard_experts(_model({"top_k": 2, **DENSE}, 6), 3)),
        "experts": msg(lambda: EP.shard_experts(_model({"top_k": 2, **DENSE}, 3), 2)),
        "expert_choice": msg(lambda: EP.shard_experts(
            _model({"moe_router": "expert_choice", "allow_noncausal": True}, 4), 2)),
        "twice": msg(lambda: EP.shard_experts(sharded, world)),
        "dense": msg(lambda: EP.shard_experts(build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2,
                                                                      vocab_size=V, max_seq_len=32)), 2)),
    }


def _world_checks(rank: int, world: int, out_dir: str) -> dict:
    out = {"layers": _layer_cases(rank, world, SETUPS[world], CASES), "dispatch": _dispatch_cases(rank, world),
           "bad": _bad_inputs(rank, world)}
    if world == 2:  # the training runs share the 2-rank spawn (starting processes is most of a spawn's cost)
        out.update(_train_ranks(rank, world, out_dir))
    else:
        out["fsdp_replicas"] = _fsdp_replicas_run(rank, world, out_dir)
    return out


def _spawn(world: int, tmp_path_factory) -> tuple[list[dict], str]:
    out_dir = tmp_path_factory.mktemp(f"ep{world}")
    return run_ranks(_world_checks, world, out_dir, str(out_dir), timeout_s=300), str(out_dir)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> tuple[list[dict], str]:
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> tuple[list[dict], str]:
    return _spawn(4, tmp_path_factory)


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def world_results(request) -> tuple[int, list[dict]]:
    return request.param, request.getfixturevalue(f"world{request.param}")[0]


# -- the reference side ------------------------------------------------------------------------------------------
def _reference(options: dict, experts: int) -> dict:
    model = _model(options, experts)
    x, y = _batch()
    noise = _noise(experts + options.get("null_experts", 0)) if options.get("moe_router") == "noisy_topk" else None
    r = _run(model, x, y, noise)
    r["grads"] = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    r["weights"] = {n: p.detach() for n, p in model.named_parameters()}
    return r


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_one_process(world_results, case: str) -> None:
    """Outputs, loss, aux losses and every gradient equal one process on the global batch, for each setup."""
    world, results = world_results
    checked = 0
    for ep, experts in SETUPS[world]:
        key = (ep, experts, case)
        if key not in results[0]["layers"]:
            continue
        checked += 1
        ref = _reference(CASES[case], experts)
        ranks = [r["layers"][key] for r in results]
        for rank, got in enumerate(ranks):
            torch.testing.assert_close(got["logits"], ref["logits"][_rows(rank, world)], **TOL)
        assert sum(g["loss"] for g in ranks) / world == pytest.approx(ref["loss"], abs=1e-12, rel=0)
        assert set(ranks[0]["aux"]) == set(ref["aux"])
        assert ref["aux"] or CASES[case].get("moe_router") in ("hash", "lsh")  # learned routers add aux losses
        for name, value in ref["aux"].items():
            # the balance losses compute in float32 (routing/moe/losses.py), whatever the model's dtype
            assert sum(g["aux"][name] for g in ranks) / world == pytest.approx(value, abs=0, rel=1e-6), name
        grads = ranks[0]["grads"]
        assert set(grads) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert grads[name].shape == g.shape, name
            where = f"{name} (ep {ep}, {experts} experts)"
            torch.testing.assert_close(grads[name], g, **TOL, msg=lambda m, w=where: f"{w}: {m}")
        for name, w in ranks[0]["weights"].items():
            torch.testing.assert_close(w, ref["weights"][name], rtol=0, atol=0)
        moe = [n for n in grads if ".ffn.bank." in n]
        assert len(moe) == 2 and all(grads[n].abs().sum() > 0 for n in moe)  # the experts were trained
    assert checked


def test_dispatch_sends_only_real_pairs(world_results) -> None:
    """Ids >= E (no-op experts, padding, dropped pairs) stay home and add zero; an idle rank computes nothing."""
    world, results = world_results
    E, D = 4, 32
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(world * 12, D, dtype=F64, generator=g)
    ids = {"mixed": torch.randint(0, 7, (world * 12, 2), generator=g),
           "one_expert": torch.zeros(world * 12, 2, dtype=torch.long)}
    ids["one_expert"][:, 1] = 6
    gate_all = torch.rand(world * 12, 2, dtype=F64, generator=g)
    for name, expert_all in ids.items():
        bank = EP.moe_layers(_model({"top_k": 2, "null_experts": 2, **DENSE}, E))[0].bank
        x = x_all.clone().requires_grad_(True)
        y = dispatch.dropless(x, expert_all, gate_all, bank, grouped=True)
        (y * torch.linspace(-1, 1, D, dtype=F64)).sum().backward()
        for rank, r in enumerate(results):
            got = r["dispatch"][name]
            rows = slice(rank * 12, (rank + 1) * 12)
            assert got["sent"] == got["expected_sent"]
            torch.testing.assert_close(got["y"], y.detach()[rows], **TOL)
            torch.testing.assert_close(got["x_grad"], x.grad[rows], **TOL)
            for w in EP.EXPERT_WEIGHTS:
                # reduce_expert_grads scales expert gradients by 1/W (DDP's average over ranks)
                torch.testing.assert_close(got["grads"][w], getattr(bank, w).grad / world, **TOL)
        received = [r["dispatch"][name]["received"] for r in results]
        assert sum(received) == sum(r["dispatch"][name]["sent"] for r in results)
        if name == "one_expert":  # expert 0 lives on rank 0: everyone else computes on zero rows
            assert received[0] == world * 12 and received[1:] == [0] * (world - 1)
        else:  # the batch has no-op ids (E..5) and padding ids (6) to leave out
            assert ((expert_all >= E) & (expert_all < 6)).any() and (expert_all == 6).any()


def test_bad_input_one_line(world_results) -> None:
    world, results = world_results
    bad = results[0]["bad"]
    assert bad["world"] == f"expert_parallel 3 does not divide the world size {world}; choose a divisor of {world}"
    assert bad["experts"] == "expert_parallel 2 does not divide the 3 experts of layer 1; choose a divisor of 3"
    assert "token-choice" in bad["expert_choice"] and "expert_choice" in bad["expert_choice"]
    assert "already" in bad["twice"] and "none" in bad["dense"]
    assert all("\n" not in m and m != "no error" for m in bad.values())


def test_no_process_group_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        EP.expert_mesh(2)
    assert "torchrun" in str(err.value) and "\n" not in str(err.value)


# -- training: DDP for the replicated weights, experts sharded, against one process at batch W*B -------------
TRAIN = {"top_k": 2, "aux_free_rate": 0.01, "z_coef": 0.01, **DENSE}
TRAIN_CFG = TrainConfig(lr=3e-2, weight_decay=0.1)
STEPS, CLIP = 3, 0.05  # the clip is active: the norm must be the global one


class _Steps:
    """The trainer's step under expert parallelism: backward, replica sum, global-norm clip, AdamW."""

    def __init__(self, wrapped: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int,
                 world: int) -> None:
        self.wrapped, self.model, self.opt, self.rank, self.world = wrapped, model, opt, rank, world
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.losses: list[float] = []
        self.norms: list[float] = []

    def __call__(self, s: int) -> None:
        x, y = _batch(s, B_GLOBAL)
        rows = _rows(self.rank, self.world)
        o = self.wrapped(x[rows], y[rows])
        o.train_loss.backward()
        EP.reduce_expert_grads(self.model)
        self.norms.append(float(EP.clip_grad_norm_(self.model, self.trained, CLIP)))
        before_optimizer_step(self.model)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss = o.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        self.losses.append(float(loss) / self.world)


def _ddp_run(rank: int, world: int, out_dir: str) -> dict:
    """DDP for the replicated weights; a safetensors checkpoint gathered to the single-process layout; a resume."""
    from torch.nn.parallel import DistributedDataParallel

    model = _model(TRAIN, 4)
    opt = make_optimizer(model, TRAIN_CFG)  # built before sharding: the parameters keep their objects
    EP.shard_experts(model, world)
    step = _Steps(DistributedDataParallel(model), model, opt, rank, world)
    for s in range(STEPS):
        step(s)
    trajectory = {"losses": list(step.losses), "norms": list(step.norms)}  # the benchmark below steps on
    with CK.gathered_experts(model, opt):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        full_state = {n: t.clone() for n, t in model.state_dict().items()}
        state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
        if rank == 0:
            save_model(model, f"{out_dir}/model.safetensors")
        full_opt = opt.state_dict()
        full_opt = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in full_opt["state"].items()},
                    "param_groups": full_opt["param_groups"]}
    # resume: a fresh full model loads the gathered weights and optimizer state, then shards them
    fresh = _model(TRAIN, 4, seed=5)
    fresh.load_state_dict(full_state)
    opt2 = make_optimizer(fresh, TRAIN_CFG)
    opt2.load_state_dict(full_opt)
    EP.shard_experts(fresh, world, optimizer=opt2)
    resumed = True
    for p, q in zip(EP.expert_parameters(model), EP.expert_parameters(fresh), strict=True):
        resumed &= torch.equal(p, q) and p.shape[0] == 2
        for k in ("exp_avg", "exp_avg_sq"):
            resumed &= torch.equal(opt.state[p][k], opt2.state[q][k])
    bench = EP.measure_all_to_all(model, lambda: step(STEPS), steps=2, warmup=1)
    return {**trajectory, "weights": weights, "state": state, "resumed": resumed, "bench": bench}


def _fsdp_run(rank: int, world: int, out_dir: str) -> dict:
    """FSDP2 (``fully_shard`` over the world) for the replicated weights, experts left to expert parallelism;
    a DCP checkpoint with the experts as DTensor views, loaded back into a fresh (unwrapped) EP model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(TRAIN, 4)
    EP.shard_experts(model, world)
    mesh = init_device_mesh("cpu", (world,))
    ignored = set(EP.expert_parameters(model))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored & set(layer.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    opt = make_optimizer(model, TRAIN_CFG)
    EP.split_expert_groups(opt, model)  # fused AdamW refuses groups mixing DTensors and plain shards
    step = _Steps(model, model, opt, rank, world)
    for s in range(STEPS):
        step(s)
    sd = get_model_state_dict(model)
    sd.update(CK.expert_dtensors(model))
    dcp.save(sd, checkpoint_id=f"{out_dir}/dcp")
    fresh = _model(TRAIN, 4, seed=5)
    EP.shard_experts(fresh, world)
    sd = fresh.state_dict()
    sd.update(CK.expert_dtensors(fresh))
    dcp.load(sd, checkpoint_id=f"{out_dir}/dcp")  # in place, into the shards
    loaded = all(torch.equal(p, q) for p, q in zip(EP.expert_parameters(model), EP.expert_parameters(fresh),
                                                   strict=True))
    return {"losses": step.losses, "norms": step.norms, "dcp_loaded": loaded}


def _fsdp_replicas_run(rank: int, world: int, out_dir: str) -> dict:
    """4 ranks, ep 2: ``shard_model`` gives each pair of ranks holding the same experts an FSDP2 group that splits
    them in two (dim 1), the rest over all four ranks; the trainer's step (full activation checkpointing: the
    bank is gathered again in the recomputation); a DCP checkpoint loaded into a fresh 4-rank model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    from condformer.parallel import fsdp
    from condformer.parallel.activation_checkpoint import apply_activation_checkpointing

    def build(seed: int) -> torch.nn.Module:
        model = _model(TRAIN, 4, seed=seed)
        apply_activation_checkpointing(model, "full")
        EP.shard_experts(model, EP.expert_mesh(2))
        return fsdp.shard_model(model)

    model = build(0)
    opt = make_optimizer(model, TRAIN_CFG)
    EP.split_expert_groups(opt, model)
    experts = EP.expert_parameters(model)
    layout = [(type(p).__name__, tuple(p.shape), tuple(p.to_local().shape)) for p in experts]
    step = _Steps(model, model, opt, rank, world)
    for s in range(STEPS):
        step(s)
    sizes = fsdp.shard_sizes(model, opt)
    sd = get_model_state_dict(model)
    sd.update(CK.expert_dtensors(model))
    dcp.save(sd, checkpoint_id=f"{out_dir}/dcp-replicas")
    fresh = build(5)
    sd = get_model_state_dict(fresh)
    sd.update(CK.expert_dtensors(fresh))
    dcp.load(sd, checkpoint_id=f"{out_dir}/dcp-replicas")  # in place, into FSDP's shards of the experts
    loaded = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(experts, EP.expert_parameters(fresh),
                                                                         strict=True))
    return {"losses": step.losses, "norms": step.norms, "layout": layout, "dtensor": isinstance(experts[0], DTensor),
            "expert_bytes": sum(p.to_local().numel() * p.element_size() for p in experts),
            "param_bytes": sizes.local_param_bytes, "loaded": loaded}


def _train_ranks(rank: int, world: int, out_dir: str) -> dict:
    return {"ddp": _ddp_run(rank, world, out_dir), "fsdp": _fsdp_run(rank, world, out_dir)}


def _train_reference() -> dict:
    model = _model(TRAIN, 4)
    opt = make_optimizer(model, TRAIN_CFG)
    trained = [p for p in model.parameters() if p.requires_grad]
    losses, norms = [], []
    for s in range(STEPS):
        x, y = _batch(s, B_GLOBAL)
        o = model(x, y)
        o.train_loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(trained, CLIP)))
        before_optimizer_step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(o.loss.detach()))
    return {"losses": losses, "norms": norms, "model": model, "opt": opt}


def test_training_follows_one_process(world2) -> None:
    """2 ranks, sharded experts + AdamW + clipping + aux-free bias, the rest under DDP and under FSDP2: the
    single-process trajectory at the global batch; the gathered safetensors checkpoint and the DCP one load in
    one process; a resume from the gathered one restores the shards and their optimizer state."""
    results, out_dir = world2
    tmp_path = Path(out_dir)
    ref = _train_reference()
    assert all(n > CLIP for n in ref["norms"])  # clipping was active: the norm must be the global one
    for r in results:
        for run in ("ddp", "fsdp"):
            assert r[run]["losses"] == pytest.approx(ref["losses"], abs=1e-10, rel=0), run
            assert r[run]["norms"] == pytest.approx(ref["norms"], abs=1e-10, rel=0), run
        assert r["ddp"]["resumed"] and r["fsdp"]["dcp_loaded"]
    ddp = results[0]["ddp"]
    names = dict(ref["model"].named_parameters())
    for name, w in ddp["weights"].items():
        torch.testing.assert_close(w, names[name].detach(), rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        for k, v in ddp["state"][name].items():
            torch.testing.assert_close(v, ref["opt"].state[names[name]][k], rtol=0, atol=1e-10)
    reference = ref["model"].state_dict()
    bias = "layers.1.block.ffn.expert_bias"
    assert reference[bias].abs().sum() > 0  # the aux-free bias moved
    loaded = _model(TRAIN, 4, seed=9)
    load_model(loaded, str(tmp_path / "model.safetensors"))  # names and shapes of a single-process model
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    import torch.distributed.checkpoint as dcp

    from_dcp = _model(TRAIN, 4, seed=9).state_dict()
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(from_dcp, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for name, t in from_dcp.items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    # the all-to-all benchmark helper (no timing assertions): every part reported, a share of the step
    bench = ddp["bench"]
    parts = [k for k in bench if k.endswith("_s") and k not in ("step_s", "all_to_all_s")]
    assert sorted(parts) == ["combine_backward_s", "combine_forward_s", "counts_s", "dispatch_backward_s",
                             "dispatch_forward_s"]
    assert all(math.isfinite(v) and v >= 0 for v in bench.values())
    assert 0 < bench["share"] <= 1 and bench["pairs_sent"] == B_GLOBAL // 2 * T * 2  # N*K pairs per rank
    assert results[1]["ddp"]["bench"] == bench  # averaged over the ranks


def test_fsdp_splits_replicated_experts_and_follows_one_process(world4) -> None:
    """4 ranks, ep 2 (each expert on two ranks): FSDP2 splits every expert weight between the two ranks holding
    it, so a rank keeps a quarter of the experts (half the ep shard); training with full activation checkpointing
    follows one process at the global batch (losses and clipped norms: the expert gradients are the mean over
    all four ranks' losses), and the DCP checkpoint loads into a fresh sharded model and into one process."""
    results, out_dir = world4
    ref = _train_reference()
    E, D, F = 4, 32, 64  # TRAIN's bank: 4 experts of d_model 32, d_ff 64 (gelu)
    for r in results:
        run = r["fsdp_replicas"]
        assert run["dtensor"] and run["loaded"]
        assert run["layout"] == [("DTensor", (E // 2, D, F), (E // 2, D // 2, F)),
                                 ("DTensor", (E // 2, F, D), (E // 2, F // 2, D))]
        assert run["expert_bytes"] == 2 * E * D * F * 8 // 4  # w_up and w_down, float64, a quarter each
        assert run["losses"] == pytest.approx(ref["losses"], abs=1e-10, rel=0)
        assert run["norms"] == pytest.approx(ref["norms"], abs=1e-10, rel=0)
    import torch.distributed.checkpoint as dcp

    reference = ref["model"].state_dict()
    from_dcp = _model(TRAIN, 4, seed=9).state_dict()
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(from_dcp, checkpoint_id=str(Path(out_dir) / "dcp-replicas"), no_dist=True)
    for name, t in from_dcp.items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
