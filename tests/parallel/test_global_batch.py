"""World-size invariance: W ranks x B rows train exactly like one process x W*B rows.

Each rank runs a float64 model (MoE layers with capacity, balance, importance, z-losses; a MoD layer with the
threshold router) on its rows of a global batch; the gradients are averaged over ranks as DDP does. Outputs,
auxiliary losses, logged statistics, gradients of every parameter and the MoD boundary must equal one process
on the whole batch. The ``micro_batch`` scope (each rank's rows alone) is the control: it must differ, or the
test could not tell global statistics from local ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from condformer.config import LayerSpec, ModelConfig
from condformer.model import build_model
from condformer.parallel.global_batch import MICRO_BATCH, GlobalBatch, batch_scope
from condformer.routing.moe import dispatch
from helpers import perturb_

from .spawn import run_ranks

B, T, V = 2, 12, 64  # rows per rank, tokens per row, vocabulary

CASES = {
    "capacity-position": {"capacity_factor": 1.0, "balance_coef": 0.1, "importance_coef": 0.1},
    "capacity-score": {"capacity_factor": 0.75, "drop_policy": "score", "balance_coef": 0.1},
    "switch-capacity": {"moe_router": "switch", "capacity_factor": 1.0, "balance_coef": 0.1},
    "dropless-balance": {"capacity_factor": None, "balance_coef": 0.1, "importance_coef": 0.1,
                         "balance_convention": "hf"},
    "null-experts": {"null_experts": 2, "capacity_factor": 1.0, "balance_coef": 0.1},
    "hash-capacity": {"moe_router": "hash", "capacity_factor": 0.75},
}


def _model(options: dict, scope: str) -> torch.nn.Module:
    torch.manual_seed(1)
    moe = {"experts": 4, "z_coef": 0.01, "balance_scope": scope, **options}
    layers = [LayerSpec(ffn="moe", options=moe),
              LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "threshold"}),
              LayerSpec(ffn="moe", options=moe)]
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=32, vocab_size=V, d_ff=64, init_std=0.3,
                      layers=layers)
    return perturb_(build_model(cfg).double()).train()


def _batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, V, (world * B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> dict:
    """One forward + backward; gradients averaged over ranks (DDP's rule); everything a step produces."""
    out = model(x, y)
    out.train_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in out.stats.items()}
    aux = {k: v.detach().double() for k, v in out.aux_losses.items()}
    if world > 1:  # per-token means (the z-loss) are means over ranks, as the engine's gradient average makes them
        for t in [*grads.values(), *stats.values(), *aux.values()]:
            dist.all_reduce(t)
            t /= world
    threshold = model.layers[1].threshold.clone()
    return {"logits": out.logits.detach(), "aux": {k: float(v) for k, v in aux.items()},
            "grads": grads, "stats": {k: float(v) for k, v in stats.items()}, "threshold": float(threshold)}


def _rank(rank: int, world: int, options: dict, scope: str) -> dict:
    x, y = _batch(world)
    rows = slice(rank * B, (rank + 1) * B)
    return _step(_model(options, scope), x[rows], y[rows], world)


def _single(options: dict, world: int) -> dict:
    x, y = _batch(world)
    return _step(_model(options, "global"), x, y, 1)


def _compare(ranks: list[dict], ref: dict) -> None:
    logits = torch.cat([r["logits"] for r in ranks])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-10)
    for r in ranks:
        assert r["aux"].keys() == ref["aux"].keys()
        for k, v in ref["aux"].items():
            assert r["aux"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k  # routers' losses are float32
        for k, v in ref["grads"].items():
            torch.testing.assert_close(r["grads"][k], v, rtol=1e-9, atol=1e-11, msg=k)
        assert r["stats"].keys() == ref["stats"].keys()
        for k, v in ref["stats"].items():
            assert r["stats"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        assert r["threshold"] == pytest.approx(ref["threshold"], rel=1e-6)  # a float32 buffer


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process(tmp_path: Path, case: str) -> None:
    ranks = run_ranks(_rank, 2, tmp_path, CASES[case], "global")
    _compare(ranks, _single(CASES[case], 2))


def test_four_ranks_equal_one_process(tmp_path: Path) -> None:
    options = CASES["capacity-position"]
    ranks = run_ranks(_rank, 4, tmp_path, options, "global")
    _compare(ranks, _single(options, 4))


@pytest.mark.parametrize("case", ["capacity-position", "dropless-balance"])
def test_micro_batch_scope_differs(tmp_path: Path, case: str) -> None:
    """The control: each rank's own capacity and balance statistics do not reproduce the one-process step."""
    ranks = run_ranks(_rank, 2, tmp_path, CASES[case], "micro_batch")
    with pytest.raises(AssertionError):
        _compare(ranks, _single(CASES[case], 2))


def _sum_grad(rank: int, world: int) -> tuple[float, list[float]]:
    """A loss of a global sum: the same value on every rank, and DDP-averaged gradients equal the true ones."""
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    local = w * (rank + 1)
    total = GlobalBatch().sum(local)
    loss = (total ** 2).sum()
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    return float(loss), (grad / world).tolist()


def test_global_sum_value_and_gradient(tmp_path: Path) -> None:
    results = run_ranks(_sum_grad, 2, tmp_path)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = ((w * 1 + w * 2) ** 2).sum()
    loss.backward()
    for value, grad in results:
        assert value == pytest.approx(float(loss.detach()))
        assert grad == pytest.approx(w.grad.tolist())


def test_one_process_scope_is_the_identity() -> None:
    assert batch_scope("global") is MICRO_BATCH
    with pytest.raises(ValueError, match="batch scope"):
        batch_scope("everything")


@pytest.mark.parametrize("policy", ["position", "score"])
def test_capacity_keep_matches_with_capacity(policy: str) -> None:
    """The keep mask decided without computing equals the one the capacity dispatch computes."""
    from condformer.routing.moe.experts import StackedExperts

    torch.manual_seed(3)
    N, K, E = 40, 2, 4
    bank = StackedExperts(E, 8, 16, False, 0.2, 2, "none").double()
    x = torch.randn(N, 8, dtype=torch.float64)
    expert = torch.stack([torch.randperm(E + 1)[:K] for _ in range(N)])  # id E: a no-op pair
    gate = torch.rand(N, K, dtype=torch.float64)
    _, kept = dispatch.with_capacity(x, expert, gate, bank, 7, policy)
    torch.testing.assert_close(dispatch.capacity_keep(expert, gate, E, 7, policy), kept)
