"""Activation checkpointing changes memory, never results: ``full`` and ``selective`` equal ``none`` bit for bit.

For every technique (dense, MoD with each causal router, MoE with capacity / noisy top-k / aux-loss-free /
null experts, AltUp, exits aligned / mixed / layer dropout, SAS and SAS-P blocks) a float64 model with every
weight and routing buffer perturbed runs two training steps (forward, backward, ``before_optimizer_step``,
SGD step) under each mode, and everything is compared exactly: losses, auxiliary losses, statistics (keys and
values), the live tally after the backward (where a recomputation with side effects would have added a loss
twice or replaced a statistic), every gradient, every buffer (MoD's threshold, MoE's expert bias), the
aux-loss-free load accumulators and the RNG state after the step. Mutation tests show these checks catch a
recomputation that records into the tally, moves state, or draws different random numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig
from condformer.context import Context, Tally
from condformer.model import build_model
from condformer.optim import before_optimizer_step
from condformer.parallel import activation_checkpoint as ac
from condformer.parallel.activation_checkpoint import apply_activation_checkpointing
from helpers import one_line_error, perturb_

from .spawn import run_ranks

F64 = torch.float64
V, T, B = 64, 16, 2
MOD = "mod"


def _mod(**o) -> LayerSpec:
    return LayerSpec(router=MOD, options={"capacity": 0.5, **o})


def _moe(**o) -> LayerSpec:
    return LayerSpec(ffn="moe", options={"experts": 4, "top_k": 2, **o})


# technique -> (ModelConfig fields, forward keyword arguments); 2-3 tiny layers each, one routed where it applies
CASES: dict[str, tuple[dict, dict]] = {
    "dense": ({}, {}),
    "parallel": ({"layers": [LayerSpec(block="parallel")]}, {}),
    "sas": ({"layers": [LayerSpec(block="sas", options={"value_matrix": True})]}, {}),
    "sasp": ({"layers": [LayerSpec(block="sasp")]}, {}),
    "mod_topk": ({"layers": [LayerSpec(), _mod(causal_router="none", eval_routing="topk")]}, {}),
    "mod_aux": ({"layers": [LayerSpec(), _mod(causal_router="aux")]}, {}),
    "mod_predictor": ({"layers": [LayerSpec(), _mod(causal_router="predictor")]}, {}),
    "mod_threshold": ({"layers": [LayerSpec(), _mod(causal_router="threshold", router_input="normed")]}, {}),
    "mod_ffn_anneal": ({"layers": [LayerSpec(), _mod(routed="ffn", anneal_steps=4, weighting="2sigmoid")]}, {}),
    "moe_capacity": ({"layers": [LayerSpec(), _moe(capacity_factor=1.0, importance_coef=0.01)]}, {}),
    "moe_noisy": ({"layers": [LayerSpec(), _moe(moe_router="noisy_topk", load_coef=0.01)]}, {}),
    "moe_aux_free": ({"layers": [LayerSpec(), _moe(aux_free_rate=0.01, capacity_factor=None)]}, {}),
    "moe_null": ({"layers": [LayerSpec(), _moe(null_experts=2, shared_experts=1)]}, {}),
    "moe_padded": ({"layers": [LayerSpec(), _moe(aux_free_rate=0.01)]}, {"padded": True}),
    "mode": ({"layers": [LayerSpec(), LayerSpec(router=MOD, ffn="moe", options={
        "capacity": 0.5, "causal_router": "threshold", "experts": 4, "top_k": 2, "aux_free_rate": 0.01})]}, {}),
    "altup": ({"altup": AltUpConfig(k=2), "tie_embeddings": True}, {}),
    "altup_gemma_mod": ({"altup": AltUpConfig(k=2, variant="recycled", coefficients="gemma"), "tie_embeddings": False,
                         "layers": [LayerSpec(), _mod(causal_router="predictor")]}, {}),
    "exits_aligned": ({"exits": ExitConfig(layers=[0, 1], halting="token")}, {}),
    "exits_mixed": ({"exits": ExitConfig(layers=[0, 1], training="mixed", mixed_samples=2),
                     "layers": [LayerSpec(), _moe(moe_router="noisy_topk", aux_free_rate=0.01)]}, {}),
    "exits_layer_dropout": ({"exits": ExitConfig(layers=[0, 1], layer_dropout=0.6),
                             "layers": [LayerSpec(), _moe(aux_free_rate=0.01), _mod(causal_router="threshold")]}, {}),
}


def _config(fields: dict) -> ModelConfig:
    n_layers = max(2, len(fields.get("layers", ())))  # one layer per spec (dense patterns: two layers)
    base = dict(vocab_size=V, max_seq_len=32, d_model=32, n_layers=n_layers, n_heads=2, d_ff=48)
    return ModelConfig(**{**base, **fields})


def _model(fields: dict, mode: str) -> torch.nn.Module:
    """A float64 model, every parameter and routing buffer moved off its initialisation (same for every mode)."""
    torch.manual_seed(0)
    model = perturb_(build_model(_config(fields)).to(F64), 0.05, expert_bias=0.05)  # the bias starts at zero
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("threshold"):
                buf.fill_(0.02)  # finite: the decision statistics read it, and each batch moves it
    apply_activation_checkpointing(model, mode)
    return model.train()


def _batch(step: int, padded: bool, seed: int = 100) -> dict:
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randint(0, V, (B, T), generator=g)
    kw = {"targets_BT": x.roll(-1, 1)}
    if padded:  # left padding in row 0: MoE's losses then keep real rows only
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, :3] = False
        kw.update(valid_BT=valid, targets_BT=kw["targets_BT"].masked_fill(~valid, -100))
    return {"tokens_BT": x, **kw}


def _train(fields: dict, forward_kw: dict, mode: str, steps: int = 2, seed: int = 100,
           prepare: Callable[[torch.nn.Module], object] | None = None) -> list[dict]:
    """Run ``steps`` training steps; record everything a recomputation could disturb, after each step.

    ``prepare``: called on the model before the optimizer is built (sharding its experts over ranks)."""
    model = _model(fields, mode)
    if prepare is not None:
        prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tallies: list[Tally] = []
    make_context = model.context

    def spying_context(*args, **kwargs) -> Context:
        ctx = make_context(*args, **kwargs)
        tallies.append(ctx.tally)
        return ctx

    model.context = spying_context
    records = []
    for step in range(steps):
        tallies.clear()
        torch.manual_seed(1000 + step)  # noisy top-k, layer dropout and mixed exits draw from the global RNG
        out = model(**_batch(step, forward_kw.get("padded", False), seed))
        out.train_loss.backward()
        (tally,) = tallies
        rec = {
            "loss": out.loss.detach(), "train_loss": out.train_loss.detach(), "aux_loss": out.aux_loss.detach(),
            "aux_losses": {k: v.detach() for k, v in out.aux_losses.items()}, "stats": dict(out.stats),
            "tally_losses": {k: v.detach() for k, v in tally.losses.items()}, "tally_stats": dict(tally.stats),
            "grads": {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None},
            "load_acc": {n: m._load_acc.clone() for n, m in model.named_modules()
                         if getattr(m, "_load_acc", None) is not None},
            "rng": torch.get_rng_state(),
        }
        before_optimizer_step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        records.append(rec)
    return records


def _full(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``; an FSDP2 (DTensor) gradient gathered from every rank's shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _same(a: object, b: object, where: str) -> None:
    """Exact equality of nested records: dicts with the same keys in the same order, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and bool(torch.isnan(a).eq(torch.isnan(b)).all())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), \
            f"{where}: differs by {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _compare(reference: list[dict], other: list[dict]) -> None:
    for step, (r, o) in enumerate(zip(reference, other, strict=True)):
        _same(r, o, f"step{step}")


@pytest.fixture(scope="module")
def references() -> dict[str, list[dict]]:
    """Each technique's records without checkpointing, computed once per module."""
    return {}


def _reference(references: dict, case: str) -> list[dict]:
    if case not in references:
        references[case] = _train(*CASES[case], "none")
    return references[case]


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_changes_nothing(case: str, mode: str, references: dict) -> None:
    ref = _reference(references, case)
    _compare(ref, _train(*CASES[case], mode))
    # the checks have something to compare: losses and statistics were recorded, gradients reached layers
    assert ref[0]["stats"] or case in ("dense", "parallel", "sas", "sasp", "mod_topk")
    assert any(n.startswith("layers.") for n in ref[0]["grads"])


def test_the_cases_exercise_what_they_claim(references: dict) -> None:
    """The threshold moves, the aux-free bias and load move, noisy top-k draws: a comparison means something."""
    thr = _reference(references, "mod_threshold")
    assert not torch.equal(thr[0]["buffers"]["layers.1.threshold"], torch.tensor(0.02, dtype=F64))
    free = _reference(references, "moe_aux_free")
    (bias,) = [b for n, b in free[0]["buffers"].items() if n.endswith("expert_bias")]
    assert free[0]["load_acc"] and not torch.equal(bias, _model(CASES["moe_aux_free"][0], "none").layers[1].block.ffn
                                                    .expert_bias)
    drop = _reference(references, "exits_layer_dropout")
    assert any(k.endswith("exit_layer_kept") for k in drop[0]["stats"])
    aux = _reference(references, "mod_aux")
    assert "mod_aux_bce" in aux[0]["tally_losses"]


# -- mutations: a recomputation with side effects is caught -----------------------------------------------
def _recomputation_without(flag: str):  # noqa: ANN202
    """A Context.recomputation that forgets one of its two duties (the mutation under test)."""
    import contextlib

    @contextlib.contextmanager
    def mutated(self: Context):
        if flag == "tally":  # moves no state, but records into the tally
            before = self.accumulate
            self.accumulate = False
            try:
                yield
            finally:
                self.accumulate = before
        else:  # records nothing, but moves state again
            self.tally.recomputing = True
            try:
                yield
            finally:
                self.tally.recomputing = False

    return mutated


@pytest.mark.parametrize("case,flag", [("mod_aux", "tally"), ("mod_threshold", "tally"),
                                       ("mod_threshold", "accumulate"), ("moe_aux_free", "accumulate"),
                                       ("exits_mixed", "accumulate")])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_side_effects_of_the_recomputation_are_caught(case: str, flag: str, mode: str, references: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _reference(references, case)
    monkeypatch.setattr(Context, "recomputation", _recomputation_without(flag))
    # under selective, torch's own check may fire first: a recomputation that runs ops the forward did not
    # (adding to an existing tally loss) has no saved entry for them
    with pytest.raises(AssertionError if mode == "full" else (AssertionError, RuntimeError)):
        _compare(ref, _train(*CASES[case], mode))


@pytest.mark.parametrize("case", ["moe_noisy", "exits_mixed"])
def test_a_recomputation_with_fresh_random_numbers_is_caught(case: str, references: dict,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``preserve_rng_state`` noisy top-k draws new noise when recomputed: other routing, other grads."""
    ref = _reference(references, case)
    real = ac.checkpoint

    def without_rng(*args, **kwargs):  # noqa: ANN202
        return real(*args, **{**kwargs, "preserve_rng_state": False})

    monkeypatch.setattr(ac, "checkpoint", without_rng)
    with pytest.raises((AssertionError, RuntimeError)):  # RuntimeError: torch's own metadata check may fire first
        _compare(ref, _train(*CASES[case], "full"))


# -- collectives inside a layer run again in the recomputation, on every rank ------------------------------
GLOBAL_BATCH = {"layers": [_moe(capacity_factor=1.0, balance_coef=0.1, importance_coef=0.1),
                           _mod(causal_router="threshold"), _moe(aux_free_rate=0.01, balance_coef=0.1)]}
EXPERT_PARALLEL = {"layers": [LayerSpec(), _moe(capacity_factor=None, aux_free_rate=0.01)]}
# AltUp included: its reported coefficients are copies, not views of the gathered weights FSDP2 frees
SHARDED = {"layers": [_moe(capacity_factor=1.0, aux_free_rate=0.01), _mod(causal_router="threshold")],
           "altup": AltUpConfig(k=2), "tie_embeddings": True}


def _pairs_sent(fields: dict, mode: str, seed: int, prepare: Callable[[torch.nn.Module], object]) -> list[int]:
    """Pairs each expert-parallel layer counted as sent over one forward + backward (the benchmark's counters)."""
    from condformer.parallel.expert_parallel import _Timer

    model = _model(fields, mode)
    prepare(model)
    layers = [m.expert_parallel for m in model.modules() if getattr(m, "expert_parallel", None) is not None]
    for par in layers:
        par.timer = _Timer(torch.device("cpu"))
    model(**_batch(0, False, seed)).train_loss.backward()
    return [par.timer.pairs_sent for par in layers]


def _modes_on_a_rank(rank: int, world: int) -> dict:
    """On this rank's own rows, ``full`` and ``selective`` equal ``none`` while the layers communicate:

    * global-batch statistics: MoE capacity and balance and MoD's threshold all-reduce / all-gather over both ranks;
    * expert parallelism: the experts are sharded over both ranks and tokens travel by all-to-all, with split
      sizes from a host sync (ranks that disagreed in the recomputation would hang or fail);
    * FSDP2: each layer's weights are all-gathered before it runs, in the forward and again in the recomputation
      (gradients compared as full tensors: every rank's shard).

    Returns how many collectives each mode's backward pass ran (recomputations communicate again)."""
    from condformer.parallel.expert_parallel import shard_experts
    from condformer.parallel.fsdp import shard_model

    seed = 100 + 10 * rank  # each rank its own rows
    ref = _train(GLOBAL_BATCH, {}, "none", seed=seed)
    for mode in ("full", "selective"):
        _compare(ref, _train(GLOBAL_BATCH, {}, mode, seed=seed))

    def shard(model: torch.nn.Module) -> None:
        shard_experts(model, world)

    ref = _train(EXPERT_PARALLEL, {}, "none", seed=seed, prepare=shard)
    sent_none = _pairs_sent(EXPERT_PARALLEL, "none", seed, shard)
    for mode in ("full", "selective"):
        _compare(ref, _train(EXPERT_PARALLEL, {}, mode, seed=seed, prepare=shard))
        # the recomputation moves the pairs again but does not count them twice
        assert _pairs_sent(EXPERT_PARALLEL, mode, seed, shard) == sent_none

    def fsdp(model: torch.nn.Module) -> None:
        shard_model(model, precision="fp32")

    ref = _train(SHARDED, {}, "none", seed=seed, prepare=fsdp)
    for mode in ("full", "selective"):
        _compare(ref, _train(SHARDED, {}, mode, seed=seed, prepare=fsdp))
    collectives = {}
    for mode in ("none", "full", "selective"):
        ops = _backward_ops(mode, GLOBAL_BATCH, seed=seed)
        collectives[mode] = sum(n for k, n in ops.items() if k.startswith(("allreduce", "allgather", "all_gather")))
    return collectives


def test_layer_collectives_are_rerun_in_step_on_every_rank(tmp_path) -> None:  # noqa: ANN001
    for collectives in run_ranks(_modes_on_a_rank, 2, tmp_path):
        assert collectives["none"] == 0 < collectives["full"] == collectives["selective"], collectives


# -- when checkpointing applies ---------------------------------------------------------------------------
def _count_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = ac.checkpoint

    def counting(*args, **kwargs):  # noqa: ANN202
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ac, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_only_training_with_gradients_checkpoints(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_checkpoints(monkeypatch)
    model = _model(CASES["exits_layer_dropout"][0], mode)
    x = _batch(0, False)["tokens_BT"]
    model(x, x).train_loss.backward()
    trained = calls[0]
    assert trained >= model.cfg.n_layers  # every layer, some twice (layer dropout's rows, exits)
    with torch.no_grad():
        model(x, x)
    model.eval()
    model(x, x)
    with torch.no_grad():
        model(x, x)
    assert calls[0] == trained
    apply_activation_checkpointing(model.train(), "none")
    model(x, x).train_loss.backward()
    assert calls[0] == trained


def test_unknown_mode_is_a_one_line_error() -> None:
    model = _model({}, "none")
    msg = one_line_error(lambda: apply_activation_checkpointing(model, "some"))
    assert "activation_checkpointing" in msg and "selective" in msg
    assert model.activation_checkpointing == "none"


def test_recomputation_scope_restores_its_flags_after_an_error() -> None:
    ctx = Context(positions_BT=torch.arange(4)[None], causal=True)
    with pytest.raises(KeyError), ctx.recomputation():
        assert ctx.tally.recomputing and not ctx.accumulate
        sub = ctx.subset(torch.tensor([[0, 2]]))
        assert not sub.accumulate and sub.tally is ctx.tally  # derived contexts inherit both
        ctx.tally.loss("x", torch.ones(()))
        ctx.tally.stat(0, "s", 1.0)
        raise KeyError("torch ends a recomputation with an exception when it stops early")
    assert not ctx.tally.recomputing and ctx.accumulate
    assert ctx.tally.losses == {} and ctx.tally.stats == {}
    quiet = dataclasses.replace(ctx, accumulate=False)
    with quiet.recomputation():
        pass
    assert quiet.accumulate is False  # a side pass stays quiet


# -- what checkpointing saves -----------------------------------------------------------------------------
def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps from the forward outside checkpointed regions (checkpoint's own hooks sit inside)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, x)
    out.train_loss.backward()
    return total[0]


def test_full_checkpointing_keeps_fewer_activations() -> None:
    fields = {"n_layers": 4, "layers": [LayerSpec(), _moe()]}
    x = _batch(0, False)["tokens_BT"]
    kept = {mode: _saved_bytes(_model(fields, mode), x) for mode in ("none", "full")}
    assert kept["full"] < 0.5 * kept["none"], kept


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.__name__.split(".")[0]
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str, fields: dict | None = None, seed: int = 100) -> dict[str, int]:
    """How often each aten (or c10d) op runs in the backward pass of one training step."""
    model = _model({"mlp": "gelu"} if fields is None else fields, mode)
    loss = model(**_batch(0, False, seed)).train_loss
    with _OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_selective_keeps_matmuls_and_recomputes_pointwise_ops() -> None:
    """In the backward, ``full`` runs the layers' matmuls again, ``selective`` only their cheap ops."""
    ops = {mode: _backward_ops(mode) for mode in ("none", "full", "selective")}
    matmuls = {mode: sum(n for k, n in c.items() if k in ("mm", "addmm", "bmm")) for mode, c in ops.items()}
    attention = {mode: sum(n for k, n in c.items() if k.startswith("_scaled_dot_product")) for mode, c in ops.items()}
    assert matmuls["full"] > matmuls["none"] and attention["full"] > attention["none"], (matmuls, attention)
    assert matmuls["selective"] == matmuls["none"] and attention["selective"] == attention["none"]
    assert ops["selective"].get("gelu", 0) > ops["none"].get("gelu", 0)  # the activation is recomputed
    assert ops["selective"].get("rsqrt", 0) > ops["none"].get("rsqrt", 0)  # and the RMS norms


def test_selective_policy_never_keeps_random_or_dropout_ops() -> None:
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = CheckpointPolicy.MUST_SAVE
    assert ac.selective_policy(None, aten.mm.default) == save
    assert ac.selective_policy(None, aten.gelu.default) != save
    assert ac.selective_policy(None, aten.normal_.default) != save
    q = torch.zeros(1, 1, 2, 2)
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert ac.selective_policy(None, sdpa, q, q, q) == save
    assert ac.selective_policy(None, sdpa, q, q, q, 0.1) != save
    assert ac.selective_policy(None, sdpa, q, q, q, dropout_p=0.1) != save
    assert "aten.mm.default" in ac.saved_op_names()


# -- torch.compile ----------------------------------------------------------------------------------------
@pytest.mark.compile
def test_compiled_checkpointed_layers_match_eager() -> None:
    """Under torch.compile (fullgraph) the recomputation is the compiled backward's: side effects happen once.

    ``selective`` only: its ``context_fn`` is the part compile is particular about, and a cold compile costs 10-20 s
    here; ``full`` under compile is the same call without it."""
    torch._dynamo.reset()
    fields = {"layers": [_mod(causal_router="threshold"), _moe(aux_free_rate=0.01, capacity_factor=None)]}
    eager, compiled = _model(fields, "none"), _model(fields, "selective")
    batch = _batch(0, False)
    ref = eager(**batch)
    ref.train_loss.backward()
    out = torch.compile(compiled, backend="aot_eager", fullgraph=True)(**batch)
    out.train_loss.backward()
    torch.testing.assert_close(out.train_loss, ref.train_loss, rtol=1e-12, atol=1e-12)
    assert list(out.aux_losses) == list(ref.aux_losses) and list(out.stats) == list(ref.stats)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(compiled.layers[0].threshold, eager.layers[0].threshold, rtol=1e-12, atol=0)
    assert torch.equal(compiled.layers[1].block.ffn._load_acc, eager.layers[1].block.ffn._load_acc)
