"""FSDP2 sharding (condformer.parallel.fsdp) against one process holding the whole model.

Reference: the same float64 model trained in this (pytest) process on the global batch of W*B rows; rank r
of W trains its rows [r*B, (r+1)*B). With equal rows per rank and losses that are means over tokens, the
mean of the ranks' gradients (what FSDP's reduce-scatter computes) is the global batch's gradient, so
losses, clipped-gradient norms, final weights and buffers must agree to float64 reduction-order error.
Each spawn runs several cases, so the process start-up (the dominant cost on two cores) is paid once.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tests.parallel.spawn import run_ranks
from torch.distributed.tensor import DTensor

from condformer.checkpoint import (
    MODEL_FILE,
    OPTIM_FILE,
    load_optimizer,
    load_weights,
    optimizer_from_flat,
    read_checkpoint,
    save_checkpoint,
)
from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.model import build_model
from condformer.optim import before_optimizer_step, make_optimizer
from condformer.parallel.fsdp import (
    NO_PROCESS_GROUP,
    clip_grad_norm,
    consolidate,
    full_model_state,
    full_optimizer_state,
    load_full_state,
    shard_model,
    shard_sizes,
)
from condformer.parallel.meta_init import build_on_meta, materialize
from helpers import perturb_

B, T, STEPS, VOCAB = 2, 16, 3, 64
# clipping below the gradient norm, so a wrongly reduced norm changes the update (Adam alone is scale-free)
TRAIN = TrainConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.05)
MOE = {"experts": 4, "top_k": 2, "capacity_factor": None, "balance_coef": 0.0, "z_coef": 1e-3, "aux_free_rate": 1e-2}
CASES: dict[str, dict[str, Any]] = {
    "dense": {},
    "blocks": {"layers": [LayerSpec(block="sasp", options={"value_matrix": True}), LayerSpec(block="parallel")]},
    # a predictor with a capacity ramp (a step counter), then the running-threshold router (a buffer)
    "mod": {"layers": [LayerSpec(router="mod", options={"capacity": 0.5, "anneal_steps": 2}),
                       LayerSpec(router="mod", options={"capacity": 0.25, "causal_router": "threshold"})]},
    "moe": {"layers": [LayerSpec(), LayerSpec(ffn="moe", options=MOE)]},
    # capacity that drops tokens and the Switch balance loss: global-batch statistics (balance_scope global)
    "moe_capacity": {"layers": [LayerSpec(), LayerSpec(ffn="moe", options={**MOE, "capacity_factor": 1.0,
                                                                           "balance_coef": 0.01})]},
    "altup": {"altup": AltUpConfig(k=2, variant="standard")},  # a 2d-wide embedding tied to the 2d-wide head
    "exits": {"exits": ExitConfig(curriculum="rotating")},  # exit norms unused at some steps
}


def case_cfg(name: str) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=VOCAB, **CASES[name])


def initial_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float64 weights moved off their initialisation (zero-init residual branches, unit norms, zero bias)."""
    torch.manual_seed(seed)
    model = perturb_(build_model(cfg).double(), 0.05, expert_bias=0.01)
    return {k: v.clone() for k, v in model.state_dict().items()}


def global_batches(seed: int, world: int, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (steps, world * B, T + 1), generator=g)
    return tokens[..., :-1], tokens[..., 1:]


def fresh(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(cfg).double()
    model.load_state_dict(state)
    return model.train()


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x_SBT: torch.Tensor,
                y_SBT: torch.Tensor) -> dict[str, list[float]]:
    """The trainer's step: backward, clip, rank-mean loss, before_optimizer_step hooks, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    world = dist.get_world_size() if dist.is_initialized() else 1
    losses, norms = [], []
    for x_BT, y_BT in zip(x_SBT, y_SBT, strict=True):
        out = model(x_BT, y_BT)
        out.train_loss.backward()
        norms.append(float(clip_grad_norm(params, TRAIN.grad_clip)))
        loss = out.loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / world)
        before_optimizer_step(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": losses, "norm": norms}


def rows(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:, rank * B:(rank + 1) * B]


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


# -- trajectories ------------------------------------------------------------------------------------
def _fsdp_trajectories(rank: int, world: int, inputs: dict[str, tuple]) -> dict[str, dict]:
    out = {}
    for name, (state, x, y) in inputs.items():
        model = shard_model(fresh(case_cfg(name), state))
        result = train_steps(model, make_optimizer(model, TRAIN), rows(x, rank), rows(y, rank))
        out[name] = {**result, "buffers": buffers(model), "full": full_model_state(model)}
        # deferred initialisation: a meta structure on every rank, the values on rank 0 only
        meta = build_on_meta(case_cfg(name)).double()
        shard_model(meta, device="cpu")
        materialize(meta, "cpu", fresh(case_cfg(name), state) if rank == 0 else None)
        result = train_steps(meta, make_optimizer(meta, TRAIN), rows(x, rank), rows(y, rank))
        out[name]["meta"] = {**result, "buffers": buffers(meta), "full": full_model_state(meta)}
    return out


def _reference(name: str, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    model = fresh(case_cfg(name), state)
    result = train_steps(model, make_optimizer(model, TRAIN), x, y)
    return {**result, "buffers": buffers(model), "state": model.state_dict()}


def _close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def trajectories(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    world = request.param
    inputs = {name: (initial_state(case_cfg(name), seed=i), *global_batches(100 + i, world))
              for i, name in enumerate(CASES)}
    t0 = time.perf_counter()
    results = run_ranks(_fsdp_trajectories, world, tmp_path_factory.mktemp(f"fsdp{world}"), inputs)
    print(f"{world} ranks x {len(CASES)} cases: {time.perf_counter() - t0:.1f} s")
    refs = {name: {**_reference(name, *inputs[name]), "initial": inputs[name][0]} for name in CASES}
    return world, {name: ([r[name] for r in results], refs[name]) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_follows_single_process_trajectory(trajectories: tuple[int, dict], name: str) -> None:
    world, by_case = trajectories
    ranks, ref = by_case[name]
    for rank, got in enumerate(ranks):
        _close(got["loss"], ref["loss"])  # every rank sees the global mean
        _close(got["norm"], ref["norm"])  # the global gradient norm, clipping applied to every shard
        _close(got["buffers"], ref["buffers"])  # expert_bias, step counters: the same on every rank
        assert (got["full"] == {}) == (rank != 0)
    full, state = ranks[0]["full"], ref["state"]
    assert list(full) == list(state)
    _close(full, state)
    moved = [k for k, v in ref["initial"].items() if v.is_floating_point() and not torch.equal(v, state[k])]
    assert len(moved) > len(state) // 2  # the steps did train


@pytest.mark.parametrize("name", list(CASES))
def test_a_model_built_on_meta_and_filled_from_rank_0_follows_the_same_trajectory(
        trajectories: tuple[int, dict], name: str) -> None:
    """No rank holds the whole model on its device: every rank shards a meta-device structure, rank 0 alone holds
    an unsharded copy, and ``materialize`` fills the shards (unsaved buffers recomputed): the same training."""
    _, by_case = trajectories
    ranks, ref = by_case[name]
    for got in ranks:
        meta = got["meta"]
        _close(meta["loss"], ref["loss"])
        _close(meta["norm"], ref["norm"])
        _close(meta["buffers"], ref["buffers"])  # rotary frequencies and exit weights included
    _close(ranks[0]["meta"]["full"], ref["state"])


# -- consolidated state and checkpoints ----------------------------------------------------------------
def ck_cfg() -> ModelConfig:
    """A tied 2d-wide embedding and head (AltUp), an expert bias (buffer) and a capacity ramp whose step counter
    keeps a Python mirror that loading must refresh on every rank (else step 3 routes another k)."""
    mod = LayerSpec(router="mod", options={"capacity": 0.25, "anneal_steps": 4})
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=VOCAB,
                       altup=AltUpConfig(k=2, variant="standard"), layers=[mod, LayerSpec(ffn="moe", options=MOE)])


def _ck_state(rank: int, world: int, x: torch.Tensor, y: torch.Tensor, state: dict, run: str, single_run: str) -> dict:
    """Two FSDP steps, the consolidated state (saved as the trainer would), a reload into a fresh sharded model,
    and a resume from the single-process checkpoint ``single_run``; each then takes step 3."""
    cfg = ck_cfg()
    model = shard_model(fresh(cfg, state))
    opt = make_optimizer(model, TRAIN)
    train_steps(model, opt, rows(x[:2], rank), rows(y[:2], rank))
    model_sd, optim_sd = full_model_state(model), full_optimizer_state(model, opt)
    full, full_opt = consolidate(model, opt)
    if rank == 0:
        save_checkpoint(Path(run), 2, full, full_opt, {}, cfg, TRAIN)
    step3 = train_steps(model, opt, rows(x[2:], rank), rows(y[2:], rank))

    reloaded = shard_model(fresh(cfg, initial_state(cfg, seed=99)))  # other weights: all must be overwritten
    reloaded_opt = make_optimizer(reloaded, TRAIN)
    load_full_state(reloaded, reloaded_opt, model_sd, optim_sd)  # rank 0's dicts, broadcast
    reloaded_step3 = train_steps(reloaded, reloaded_opt, rows(x[2:], rank), rows(y[2:], rank))

    # a single-process checkpoint (its tied head stored once): weights read by rank 0 and broadcast, the
    # optimiser state read by every rank
    ck = read_checkpoint(single_run)
    resumed = shard_model(fresh(cfg, initial_state(cfg, seed=98)))
    resumed_opt = make_optimizer(resumed, TRAIN)
    load_full_state(resumed, None, load_file(str(ck.path / MODEL_FILE)) if rank == 0 else {}, None)
    load_full_state(resumed, resumed_opt, None, optimizer_from_flat(*_flat(ck)), from_rank0=False)
    resumed_step3 = train_steps(resumed, resumed_opt, rows(x[2:], rank), rows(y[2:], rank))
    return {"model_sd": model_sd, "optim_sd": optim_sd, "step3": step3, "reloaded_step3": reloaded_step3,
            "resumed_step3": resumed_step3, "reloaded_buffers": buffers(reloaded), "full": full_model_state(model),
            "reloaded_full": full_model_state(reloaded), "resumed_full": full_model_state(resumed)}


def _flat(ck: Any) -> tuple[dict, dict]:
    return load_file(str(ck.path / OPTIM_FILE)), ck.state["optimizer"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg, root = ck_cfg(), tmp_path_factory.mktemp("fsdp_ck")
    state = initial_state(cfg, seed=7)
    x, y = global_batches(7, 2)
    ref = fresh(cfg, state)
    ref_opt = make_optimizer(ref, TRAIN)
    train_steps(ref, ref_opt, x[:2], y[:2])
    save_checkpoint(root / "single", 2, ref, ref_opt, {}, cfg, TRAIN)
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_osd = copy.deepcopy(ref_opt.state_dict())  # its tensors are the optimiser's own, which step 3 changes
    ref_step3 = train_steps(ref, ref_opt, x[2:], y[2:])
    ranks = run_ranks(_ck_state, 2, root, x, y, state, str(root / "fsdp"), str(root / "single"))
    return {"cfg": cfg, "ranks": ranks, "ref_sd": ref_sd, "ref_osd": ref_osd, "ref_step3": ref_step3,
            "ref_final": ref.state_dict(), "run": root / "fsdp", "x": x, "y": y}


def test_full_model_state_equals_single_process_state_dict(checkpoints: dict) -> None:
    got, ref = checkpoints["ranks"][0]["model_sd"], checkpoints["ref_sd"]
    assert list(got) == list(ref)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    _close(got, ref)
    assert got["head.weight"] is got["embed.weight"]  # one tensor, as in the unsharded model
    assert checkpoints["ranks"][1]["model_sd"] == {}


def test_full_optimizer_state_has_the_single_process_layout(checkpoints: dict) -> None:
    got, ref = checkpoints["ranks"][0]["optim_sd"], checkpoints["ref_osd"]
    assert got["param_groups"] == ref["param_groups"]
    assert sorted(got["state"]) == sorted(ref["state"])
    for i, st in ref["state"].items():
        assert sorted(got["state"][i]) == sorted(st)
        _close({k: torch.as_tensor(v) for k, v in got["state"][i].items()},
               {k: torch.as_tensor(v) for k, v in st.items()})


def test_reloaded_fsdp_model_takes_the_same_next_step(checkpoints: dict) -> None:
    for r in checkpoints["ranks"]:
        _close(r["reloaded_step3"], r["step3"])
        _close(r["reloaded_step3"], checkpoints["ref_step3"])
        _close(r["reloaded_buffers"]["layers.1.block.ffn.expert_bias"],
               checkpoints["ref_final"]["layers.1.block.ffn.expert_bias"])
    _close(checkpoints["ranks"][0]["reloaded_full"], checkpoints["ranks"][0]["full"])
    _close(checkpoints["ranks"][0]["full"], checkpoints["ref_final"])


def test_fsdp_checkpoint_resumes_in_one_process(checkpoints: dict) -> None:
    cfg, x, y = checkpoints["cfg"], checkpoints["x"], checkpoints["y"]
    ck = read_checkpoint(checkpoints["run"])
    model = build_model(cfg).double()
    load_weights(ck, model)  # strict names: a tie stored twice or an FSDP-prefixed name would fail here
    optimizer = make_optimizer(model, TRAIN)
    load_optimizer(ck, optimizer)
    _close(train_steps(model, optimizer, x[2:], y[2:]), checkpoints["ref_step3"])
    _close(model.state_dict(), checkpoints["ref_final"])


def test_single_process_checkpoint_resumes_under_fsdp(checkpoints: dict) -> None:
    for r in checkpoints["ranks"]:
        _close(r["resumed_step3"], checkpoints["ref_step3"])
    _close(checkpoints["ranks"][0]["resumed_full"], checkpoints["ref_final"])


# -- policies, sizes, errors ---------------------------------------------------------------------------
def _watch_dtypes(model: torch.nn.Module) -> dict[str, Any]:
    """(dtype, is a DTensor) of each watched weight while its module runs, hooked in before sharding.

    The attention reads its layer's gathered bf16 weights; the top-k router (read in its forward) and the
    expert-choice router (read through ``logits``, a method FSDP must be told about) their own fp32 ones.
    """
    seen: dict[str, Any] = {}

    def record(key: str, w: torch.Tensor) -> None:
        seen[key] = (w.dtype, isinstance(w, DTensor))

    attn, topk = model.layers[0].block.attn, model.layers[0].block.ffn.router
    attn.register_forward_pre_hook(lambda m, args: record("attn", m.qkv.weight))
    for i, layer in enumerate(model.layers):  # the context every layer's attention gets: one memo for all
        layer.block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"memo{i}", id(args[1].memo)))
    topk.register_forward_pre_hook(lambda m, args: record("topk_router", m.weight))
    chooser = model.layers[1].block.ffn.router
    plain_logits = chooser.logits

    def logits(x_ND: torch.Tensor) -> torch.Tensor:
        record("expert_choice_router", chooser.weight)
        return plain_logits(x_ND)
    chooser.logits = logits
    return seen


def bf16_cfg() -> ModelConfig:
    ec = {"experts": 4, "moe_router": "expert_choice", "allow_noncausal": True, "balance_coef": 0.0}
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=VOCAB,
                       layers=[LayerSpec(ffn="moe", options=MOE), LayerSpec(ffn="moe", options=ec)])


def _misc(rank: int, world: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cfg = bf16_cfg()
    # bf16 compute, fp32 routers, fp32 gradient reduction
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = _watch_dtypes(model)
    shard_model(model, precision="bf16")
    loss = model(rows(x, rank)[0], rows(y, rank)[0])
    loss.train_loss.backward()
    out["bf16_one_memo"] = seen.pop("memo0") == seen.pop("memo1")
    out["bf16_seen"] = dict(seen)
    out["bf16_grad_dtypes"] = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    out["bf16_param_dtypes"] = {p.dtype for p in model.parameters()}
    # each rank's gradient is bf16; their mean, reduced in fp32, needs bits bf16 does not have
    g = model.layers[0].block.attn.qkv.weight.grad.to_local()
    out["bf16_mean_in_fp32"] = bool((g != g.bfloat16().float()).any())
    out["bf16_loss"] = float(loss.loss)
    torch.manual_seed(0)
    out["fp32_loss"] = float(shard_model(build_model(cfg), precision="auto")(rows(x, rank)[0], rows(y, rank)[0]).loss)
    # reshard_after_forward: what a layer holds between its forward and the backward
    for reshard in (True, False):
        torch.manual_seed(0)
        m = shard_model(build_model(case_cfg("dense")), reshard_after_forward=reshard)
        o = m(rows(x, rank)[0], rows(y, rank)[0])
        out[f"sharded_after_forward_{reshard}"] = isinstance(m.layers[0].block.attn.qkv.weight, DTensor)
        o.loss.backward()
    # what each rank stores
    m = shard_model(build_model(case_cfg("dense")))
    opt = make_optimizer(m, TRAIN)
    train_steps(m, opt, rows(x[:1], rank), rows(y[:1], rank))
    out["sizes"] = shard_sizes(m, opt)
    try:
        shard_model(m)
    except ConfigError as e:
        out["twice"] = str(e)
    return out


@pytest.fixture(scope="module")
def misc(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    x, y = global_batches(3, 2, steps=1)
    return run_ranks(_misc, 2, tmp_path_factory.mktemp("fsdp_misc"), x, y)


def test_bf16_policy_keeps_routers_and_gradients_fp32(misc: list[dict]) -> None:
    for r in misc:
        assert r["bf16_seen"] == {"attn": (torch.bfloat16, False), "topk_router": (torch.float32, False),
                                  "expert_choice_router": (torch.float32, False)}
        assert r["bf16_grad_dtypes"] == {torch.float32} and r["bf16_param_dtypes"] == {torch.float32}
        assert r["bf16_mean_in_fp32"]
        assert r["bf16_one_memo"]  # FSDP cast no inputs: a cast rebuilds each layer's Context and its memo
        assert r["bf16_loss"] != r["fp32_loss"] and abs(r["bf16_loss"] - r["fp32_loss"]) < 0.05


def test_reshard_after_forward_is_passed_through(misc: list[dict]) -> None:
    for r in misc:
        assert r["sharded_after_forward_True"] and not r["sharded_after_forward_False"]


def test_each_of_two_ranks_holds_about_half(misc: list[dict]) -> None:
    sizes = [r["sizes"] for r in misc]
    full = build_model(case_cfg("dense")).num_params(non_embedding=False) * 4  # tied head counted once
    assert all(s.full_param_bytes == full for s in sizes)
    assert sum(s.local_param_bytes for s in sizes) == full
    assert all(0.4 < s.param_fraction < 0.6 for s in sizes)
    # AdamW: two moments per parameter element, sharded alike, and a float32 step count per parameter per rank
    n_params = len(list(build_model(case_cfg("dense")).parameters()))
    assert sum(s.local_optim_bytes for s in sizes) == 2 * full + 2 * n_params * 4


def test_sharding_twice_is_a_one_line_error(misc: list[dict]) -> None:
    assert "sharded already" in misc[0]["twice"] and "\n" not in misc[0]["twice"]


def test_without_a_process_group_a_one_line_error(tiny_cfg: Any) -> None:
    assert not dist.is_initialized()
    with pytest.raises(ConfigError) as e:
        shard_model(build_model(tiny_cfg()))
    assert str(e.value) == NO_PROCESS_GROUP and "torchrun --nproc_per_node" in str(e.value)


def test_offload_on_cpu_is_a_one_line_error(tiny_cfg: Any) -> None:
    with pytest.raises(ConfigError, match="this model is on cpu already: drop the offload option"):
        shard_model(build_model(tiny_cfg()), offload=True)


def test_unknown_precision_is_a_one_line_error(tiny_cfg: Any) -> None:
    with pytest.raises(ConfigError, match="unknown FSDP precision 'fp16'; choose one of: auto, bf16, fp32"):
        shard_model(build_model(tiny_cfg()), precision="fp16")


# -- torch.compile -------------------------------------------------------------------------------------
def _compiled(rank: int, world: int, state: dict, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    torch._dynamo.reset()
    model = shard_model(fresh(case_cfg("dense"), state))
    step = torch.compile(model)
    opt = make_optimizer(model, TRAIN)
    losses = []
    for x_BT, y_BT in zip(rows(x, rank), rows(y, rank), strict=True):
        out = step(x_BT, y_BT)
        out.train_loss.backward()
        clip_grad_norm(model.parameters(), TRAIN.grad_clip)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.compile
def test_compiled_fsdp_model_trains_like_eager(tmp_path: Path) -> None:
    state = initial_state(case_cfg("dense"))
    x, y = global_batches(5, 2, steps=2)
    ref = fresh(case_cfg("dense"), state)
    expected = train_steps(ref, make_optimizer(ref, TRAIN), x, y)["loss"]
    for losses in run_ranks(_compiled, 2, tmp_path, state, x, y):
        torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-8)
