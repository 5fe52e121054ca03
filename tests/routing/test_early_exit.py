"""Early exits (depth-adaptive Transformer, CALM, LayerSkip), the training side, against a naive float64 reference.

What is checked, group by group (the reference is ``early_exit_reference.py``: per-token, per-layer Python loops
that reuse only the model's embedding, layers, norms and heads):

1. aligned training: ``loss`` is the last exit's CE, ``objective`` the weighted mean of every exit's CE (uniform,
   increasing and custom weights; exits everywhere or at chosen layers; shared and separate heads; ignored
   targets), the ``layer{L}/exit_loss`` stats;
2. gradients of the objective equal the reference's, reach every exit norm and head and the shared head;
3. ``exit_depth_BT``: fixed per-token depths with exited states copied upward; one-line errors;
4. mixed training: the mean over M draws of the given-depth CE, draws reproduced by reseeding;
5. confidence exits at inference (softmax, gap, cosine) against a token-by-token policy, depth traces and stats;
6. halting: q for sequence / token / geometric, the four oracles, the halting loss, detaching, inference depths;
   left-padded batches (pooling and depth stats over real tokens only);
7. LayerSkip layer dropout: the rate, per-sample skipping reproduced draw by draw, nothing in eval;
8. FLOPs: closed form and FlopCounterMode;
9. config validation (one line each), round trips, presets;
10. training end to end: exit stats in the log, exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from condformer.config import (
    AltUpConfig,
    ExitConfig,
    LayerSpec,
    ModelConfig,
    TrainConfig,
)
from condformer.config_files import load_config_file, save_config_file
from condformer.errors import CondformerError, ConfigError
from condformer.flops import count_flops
from condformer.model import build_model
from condformer.presets import preset
from condformer.routing.early_exit import layer_dropout_rate, oracle_exits, set_exit_thresholds
from helpers import one_line_error

from . import early_exit_reference as R
from .fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)

D = 32
V = 260
N_LAYERS = 4
F64 = torch.float64
TOL64 = {"rtol": 0, "atol": 1e-10}
TOL32 = {"rtol": 0, "atol": 2e-6}  # the halting module's log q come out in float32
# the exit weights are normalised in float32 before the model is cast to float64 (w / sum(w) is not exact)
TOL_W = {"rtol": 1e-7, "atol": 1e-10}
TOL_W_GRAD = {"rtol": 1e-7, "atol": 2e-8}  # gradients sum many weighted terms (largest entries ~0.3)




# -- builders -------------------------------------------------------------------------------------
def _cfg(n_layers: int = N_LAYERS, init_std: float = 0.1, tie: bool = True, **exits) -> ModelConfig:
    return ModelConfig(d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=64, vocab_size=V, init_std=init_std,
                       tie_embeddings=tie, exits=ExitConfig(**exits))


@torch.no_grad()
def _model(n_layers: int = N_LAYERS, halting_std: float = 0.5, tie: bool = True, **exits):  # noqa: ANN202
    """A float64 model whose norms differ per exit (so reading the wrong norm shows) and whose halting module,
    if any, has spread-out logits."""
    model = build_model(_cfg(n_layers, tie=tie, **exits)).double()
    for norm in [*model.exits.norms, model.final_norm]:
        norm.weight.normal_(1.0, 0.3)
    if model.exits.halting is not None:
        model.exits.halting.weight.normal_(0.0, halting_std)
        model.exits.halting.bias.normal_(0.0, 0.5)
    return model


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


def _targets(B: int, T: int) -> torch.Tensor:
    y = _tokens(B, T)
    y[0, :3] = R.IGNORE
    y[-1, T - 2] = R.IGNORE
    return y


def _ref_weights(weights, ex: list[int]) -> list[float]:  # noqa: ANN001
    if weights == "uniform":
        return [1.0] * len(ex)
    if weights == "increasing":
        return [float(layer + 1) for layer in ex]
    return [float(w) for w in weights]


def _close(got: torch.Tensor, want: torch.Tensor, tol: dict = TOL64) -> None:
    torch.testing.assert_close(got, want.to(got.dtype), **tol)


def _stat(out, key: str) -> float:  # noqa: ANN001
    return float(out.stats[key])


def _depth_stats_match(out, depth_BT: torch.Tensor, ex: list[int]) -> None:  # noqa: ANN001
    d = depth_BT.flatten().tolist()
    assert _stat(out, "exit_avg_depth") == pytest.approx(sum(d) / len(d), abs=1e-6)
    for layer in ex:
        assert _stat(out, f"layer{layer}/exit_frac") == pytest.approx(d.count(layer + 1) / len(d), abs=1e-6)


CUSTOM = {None: [0.5, 0.0, 2.0, 1.5], (0, 2): [0.5, 2.0, 1.5]}


# -- 1. aligned training ----------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["uniform", "increasing", "custom"])
@pytest.mark.parametrize("layers", [None, [0, 2]])
@pytest.mark.parametrize("head", ["shared", "separate"])
@torch.no_grad()
def test_aligned_training_matches_reference(head, layers, weights):
    ex = R.exit_layers(N_LAYERS, layers)
    w_cfg = CUSTOM[None if layers is None else tuple(layers)] if weights == "custom" else weights
    model = _model(head=head, layers=layers, weights=w_cfg).train()
    x, y = _tokens(3, 10), _targets(3, 10)
    out = model(x, y)
    w = _ref_weights(w_cfg, ex)
    objective, ces, last_logits = R.aligned(model, x, y, layers, w)
    _close(out.objective, objective, TOL_W)
    _close(out.loss, ces[-1])
    _close(out.logits, last_logits)
    _close(out.train_loss, out.objective)  # no auxiliary loss without halting
    assert out.aux_losses == {}
    keys = sorted(k for k in out.stats if k.endswith("/exit_loss"))
    assert keys == sorted(f"layer{layer}/exit_loss" for layer in ex)
    for layer, ce in zip(ex, ces, strict=True):
        assert _stat(out, f"layer{layer}/exit_loss") == pytest.approx(float(ce), abs=1e-10)
    # controls: the exits disagree, so the weighting matters and the objective is not the last loss
    assert max(float(c) for c in ces) - min(float(c) for c in ces) > 1e-3
    if weights != "uniform":
        assert abs(float(out.objective) - float(sum(ces) / len(ces))) > 1e-5


@torch.no_grad()
def test_ignored_targets_are_excluded():
    model = _model(layers=[0, 2]).train()
    x, y = _tokens(2, 10), _targets(2, 10)
    out = model(x, y)
    # the ignored positions may hold anything: only the valid ones are averaged
    y2 = y.clone()
    out_all = model(x, torch.where(y2 == R.IGNORE, torch.zeros_like(y2), y2))
    for layer in (0, 2, 3):
        assert abs(_stat(out, f"layer{layer}/exit_loss") - _stat(out_all, f"layer{layer}/exit_loss")) > 1e-6
    # per exit: the mean over valid tokens only, by hand
    hs = R.full_states(model, x)
    for k, layer in enumerate((0, 2, 3)):
        logp = R.exit_logits(model, k, hs[layer + 1]).log_softmax(-1)
        valid = y != R.IGNORE
        want = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0][valid].mean()
        assert _stat(out, f"layer{layer}/exit_loss") == pytest.approx(float(want), abs=1e-10)


@torch.no_grad()
def test_eval_without_thresholds_is_the_full_forward():
    model = _model(layers=[0, 2]).eval()
    x, y = _tokens(2, 12), _targets(2, 12)
    out = model(x, y)
    hs = R.full_states(model, x)
    want = R.exit_logits(model, 2, hs[-1])
    _close(out.logits, want)
    _close(out.loss, R.cross_entropy(want, y))
    assert out.objective is None
    # and it is the dense twin carrying the same weights
    dense = build_model(dataclasses.replace(model.cfg, exits=None)).double()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("exits.") for k in unexpected)
    _close(dense.eval()(x).logits, out.logits)


# -- 2. gradients -----------------------------------------------------------------------------------
def _grads(model) -> dict:  # noqa: ANN001
    g = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return g


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_aligned_gradients_match_reference_and_reach_every_exit(head, tie):
    model = _model(head=head, layers=[0, 2], weights=[1.0, 2.0, 3.0], tie=tie).train()
    x, y = _tokens(2, 10), _targets(2, 10)
    model(x, y).train_loss.backward()
    got = _grads(model)
    R.aligned(model, x, y, [0, 2], [1.0, 2.0, 3.0])[0].backward()
    want = _grads(model)
    assert got.keys() == want.keys()
    for n in got:
        if want[n] is None:
            assert got[n] is None or not got[n].any(), n
        else:
            torch.testing.assert_close(got[n], want[n], **TOL_W_GRAD, msg=n)
    for k in range(2):
        assert got[f"exits.norms.{k}.weight"].abs().max() > 0
        if head == "separate":
            assert got[f"exits.heads.{k}.weight"].abs().max() > 0
    lm_head = "embed.weight" if tie else "head.weight"
    assert got[lm_head].abs().max() > 0 and got["final_norm.weight"].abs().max() > 0
    # control: weights (0, 0, 1) train only the last exit; the exit norms and heads get nothing
    zero = _model(head=head, layers=[0, 2], weights=[0.0, 0.0, 1.0], tie=tie).train()
    zero.load_state_dict(model.state_dict())
    out = zero(x, y)
    _close(out.objective, out.loss)
    out.train_loss.backward()
    # the shared head's gradient then lacks the exits' share
    assert (zero.head.weight.grad - got[lm_head]).abs().max() > 1e-6
    for k in range(2):
        g = zero.exits.norms[k].weight.grad
        assert g is None or not g.any()
        if head == "separate":
            g = zero.exits.heads[k].weight.grad
            assert g is None or not g.any()


# -- 3. given depths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layers", [None, [0, 2]])
@pytest.mark.parametrize("head", ["shared", "separate"])
@torch.no_grad()
def test_given_depths_match_reference(head, layers, mode):
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(head=head, layers=layers).train(mode == "train")
    B, T = 3, 12
    x, y = _tokens(B, T), _targets(B, T)
    depths = torch.tensor([layer + 1 for layer in ex])
    depth = depths[torch.randint(0, len(ex), (B, T))]
    depth[:, 0] = 1  # the first tokens exit at once: everything after them attends to copies
    out = model(x, y, exit_depth_BT=depth, trace=True)
    want = R.given_depth(model, x, depth, layers)
    _close(out.logits, want)
    _close(out.loss, R.cross_entropy(want, y))
    assert torch.equal(out.traces["exit_depth"], depth)
    _depth_stats_match(out, depth, ex)
    # control: computing every state at full depth (no copies) gives other logits
    wrong = R.given_depth(model, x, depth, layers, copy_up=False)
    assert (wrong - out.logits).abs().max() > 1e-6
    # the full depth everywhere is the plain forward
    full = model(x, exit_depth_BT=torch.full((B, T), N_LAYERS))
    _close(full.logits, R.exit_logits(model, len(ex) - 1, R.full_states(model, x)[-1]))


@pytest.mark.parametrize("bad", [0, 2, 5])
@torch.no_grad()
def test_given_depth_not_an_exit_is_a_one_line_error(bad):
    model = _model(layers=[0, 2]).eval()  # exit depths 1, 3, 4
    depth = torch.full((2, 6), 3)
    depth[1, 4] = bad
    msg = one_line_error(lambda: model(_tokens(2, 6), exit_depth_BT=depth), CondformerError)
    assert "[1, 3, 4]" in msg and str(bad) in msg


def test_given_depth_on_a_dense_model_is_refused():
    dense = build_model(dataclasses.replace(_cfg(), exits=None))
    with pytest.raises(ValueError, match="exits"):
        dense(_tokens(1, 4), exit_depth_BT=torch.full((1, 4), 4))


# -- 4. mixed training -------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("head", ["shared", "separate"])
def test_mixed_training_is_the_mean_over_sampled_depths(head, M):
    layers = [0, 2]
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(head=head, layers=layers, training="mixed", mixed_samples=M).train()
    B, T = 2, 10
    x, y = _tokens(B, T), _targets(B, T)
    torch.manual_seed(123)
    out = model(x, y)
    torch.manual_seed(123)
    draws = [torch.randint(0, len(ex), (B, T)) for _ in range(M)]
    depths = torch.tensor([layer + 1 for layer in ex])
    logits = [R.given_depth(model, x, depths[k], layers) for k in draws]
    want = sum(R.cross_entropy(lg, y) for lg in logits) / M
    _close(out.objective, want)
    # Output.loss is the last layer's, as for aligned training (not the mixed objective)
    full = R.given_depth(model, x, torch.full((B, T), N_LAYERS), layers)
    _close(out.loss, R.cross_entropy(full, y))
    assert (out.loss - out.objective).abs() > 1e-6
    _close(out.logits, logits[-1])
    assert all(len(set(k.flatten().tolist())) == len(ex) for k in draws)  # every exit drawn
    # gradients: those of the reference's mean
    out.train_loss.backward()
    got = _grads(model)
    want.backward()
    ref = _grads(model)
    for n in got:
        if ref[n] is not None:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-10, msg=n)
    assert got["exits.norms.0.weight"].abs().max() > 0
    # control: other draws, another loss
    torch.manual_seed(124)
    with torch.no_grad():
        assert abs(float(model(x, y).loss) - float(want)) > 1e-6


@torch.no_grad()
def test_mixed_trainings_last_layer_pass_leaves_no_trace():
    """The extra full-depth pass for ``Output.loss`` adds no statistics, no auxiliary loss and no
    aux-loss-free load: an MoE layer counts the choices of the M sampled passes only."""
    M, B, T = 2, 2, 10
    moe = LayerSpec(ffn="moe", options={"experts": 4, "top_k": 2, "aux_free_rate": 0.01, "capacity_factor": None})
    cfg = dataclasses.replace(_cfg(training="mixed", mixed_samples=M), layers=[LayerSpec(), moe])
    model = build_model(cfg).double().train()
    out = model(_tokens(B, T), _targets(B, T))
    ffn = model.layers[1].block.ffn
    assert float(ffn._load_acc.sum()) == M * B * T * 2
    balance = [k for k in out.aux_losses if k.startswith("moe")]
    assert balance and out.stats  # the sampled passes did report


# -- 5. confidence exits at inference -------------------------------------------------------------------
def _thresholds_between_quantiles(model, x: torch.Tensor, layers, kind: str, quantiles: list[float]  # noqa: ANN001
                                  ) -> tuple[list[float], list[list[float]]]:
    """One threshold per exit before the last: the midpoint of two neighbouring full-depth confidences."""
    ex = R.exit_layers(N_LAYERS, layers)
    hs = R.full_states(model, x)
    B, T = x.shape
    out, all_confs = [], []
    for k, layer in enumerate(ex[:-1]):
        confs = sorted(R.confidence(kind, R.exit_logits(model, k, hs[layer + 1][b, t]), hs[layer + 1][b, t],
                                    hs[layer][b, t]) for b in range(B) for t in range(T))
        j = int(len(confs) * quantiles[min(k, len(quantiles) - 1)])
        out.append((confs[j - 1] + confs[j]) / 2)
        all_confs.append(confs)
    return out, all_confs


def _check_decisions(model, x, y, layers, stop, thresholds=None, margin=1e-9):  # noqa: ANN001, ANN202
    ex = R.exit_layers(N_LAYERS, layers)
    out = model(x, y, trace=True)
    want, depth, info = R.decide(model, x, layers, stop)
    if thresholds is not None:  # no reference score within rounding of its threshold
        for k, scores in info["scores"].items():
            assert min(abs(s - thresholds[k]) for s in scores) > margin
    assert torch.equal(out.traces["exit_depth"], depth)
    _close(out.logits, want)
    _close(out.loss, R.cross_entropy(want, y))
    _depth_stats_match(out, depth, ex)
    return depth


@pytest.mark.parametrize(("head", "layers"), [("shared", None), ("separate", [0, 2]), ("shared", [1, 2])])
@pytest.mark.parametrize("kind", ["softmax", "gap", "cosine"])
@torch.no_grad()
def test_confidence_exits_match_reference(kind, head, layers):
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(head=head, layers=layers, confidence=kind).eval()
    B, T = 2, 12
    x, y = _tokens(B, T), _targets(B, T)
    thresholds, confs = _thresholds_between_quantiles(model, x, layers, kind, [0.7, 0.5])
    set_exit_thresholds(model, thresholds)
    depth = _check_decisions(model, x, y, layers, R.confidence_policy(kind, thresholds), thresholds)
    assert len(set(depth.flatten().tolist())) >= 3  # the depths are mixed
    # control: lowering the first threshold past one more confidence makes one more token exit there
    j = int(len(confs[0]) * 0.7)
    lower = [(confs[0][j - 2] + confs[0][j - 1]) / 2, *thresholds[1:]]
    set_exit_thresholds(model, lower)
    depth2 = _check_decisions(model, x, y, layers, R.confidence_policy(kind, lower), lower)
    first = ex[0] + 1
    assert int((depth2 == first).sum()) == int((depth == first).sum()) + 1


@torch.no_grad()
def test_extreme_and_configured_thresholds():
    layers = [0, 2]
    model = _model(layers=layers).eval()
    x = _tokens(2, 10)
    hs = R.full_states(model, x)
    full = R.exit_logits(model, 2, hs[-1])
    set_exit_thresholds(model, math.inf)  # a scalar applies to every exit; nothing is that confident
    assert model.exits.thresholds == [math.inf, math.inf]
    out = model(x, trace=True)
    _close(out.logits, full)
    assert bool((out.traces["exit_depth"] == N_LAYERS).all())
    set_exit_thresholds(model, -1.0)  # everything exits at the first exit
    out = model(x, trace=True)
    assert bool((out.traces["exit_depth"] == 1).all())
    _close(out.logits, R.exit_logits(model, 0, hs[1]))
    set_exit_thresholds(model, None)
    _close(model(x).logits, full)
    # thresholds from the config act like set_exit_thresholds
    thresholds, _ = _thresholds_between_quantiles(model, x, layers, "softmax", [0.6, 0.5])
    configured = build_model(_cfg(layers=layers, thresholds=thresholds)).double().eval()
    configured.load_state_dict(model.state_dict())
    set_exit_thresholds(model, thresholds)
    a, b = model(x, trace=True), configured(x, trace=True)
    _close(a.logits, b.logits)
    assert torch.equal(a.traces["exit_depth"], b.traces["exit_depth"])
    assert len(set(a.traces["exit_depth"].flatten().tolist())) >= 2


def test_set_exit_thresholds_errors_are_one_line():
    model = _model(layers=[0, 2])
    msg = one_line_error(lambda: set_exit_thresholds(model, [0.5]), CondformerError)
    assert "2" in msg and "1" in msg
    dense = build_model(dataclasses.replace(_cfg(), exits=None))
    one_line_error(lambda: set_exit_thresholds(dense, 0.5), CondformerError)
    halting = _model(layers=[0, 2], halting="token")
    one_line_error(lambda: set_exit_thresholds(halting, 0.5), CondformerError)
    set_exit_thresholds(halting, None)  # clearing is fine


# -- 6. halting ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sequence", "token", "geometric"])
@torch.no_grad()
def test_halting_distributions_match_formulas(kind):
    layers = [0, 2]
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(layers=layers, halting=kind)
    halting = model.exits.halting
    W, bias = halting.weight.detach(), halting.bias.detach()
    assert W.shape[0] == (len(ex) - 1 if kind == "geometric" else len(ex))
    x = _tokens(3, 9)
    hs = R.full_states(model, x)
    if kind == "geometric":
        states = [hs[layer + 1] for layer in ex]
        got = halting.log_q_geometric(states)
        want = torch.tensor(R.q_geometric(W, bias, states), dtype=F64)
        _close(got.exp(), want, TOL32)
        # control: chi reads each exit's own state
        swapped = halting.log_q_geometric([states[1], states[0], states[2]])
        assert (swapped - got).abs().max() > 1e-4
    elif kind == "token":
        got = halting.log_q_first(hs[1], None)
        want = torch.tensor(R.log_q_token(W, bias, hs[1]), dtype=F64)
        _close(got, want, TOL32)
    else:
        valid = torch.ones(3, 9, dtype=torch.bool)
        valid[0, :4] = False
        valid[2, 8] = False
        got = halting.log_q_first(hs[1], valid)
        want = torch.tensor(R.log_q_sequence(W, bias, hs[1], valid), dtype=F64)
        _close(got, want, TOL32)
        got_all = halting.log_q_first(hs[1], None)
        _close(got_all, torch.tensor(R.log_q_sequence(W, bias, hs[1], None), dtype=F64), TOL32)
        assert (got_all - got)[0].abs().max() > 1e-4  # control: padding is left out of the mean
    assert torch.isfinite(got).all()
    _close(got.exp().sum(-1), torch.ones(got.shape[:-1], dtype=F64), TOL32)


ORACLES = ["likelihood", "smoothed", "correctness", "smoothed_correctness"]


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("kind", ORACLES)
def test_oracle_matches_naive_loop(kind, per_sequence, lam):
    B, T, E = 3, 9, 4
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False
    valid[2, 5] = False
    ll = -3 * torch.rand(B, T, E, dtype=F64) * valid[..., None]
    ll[1, :, 2] = ll[1, :, 1]  # duplicate exits: ties go to the shallower one
    correct = torch.rand(B, T, E) < 0.4
    correct[..., 3] = correct[..., 1]
    depths = torch.tensor([1, 2, 4, 5])
    sigma = 2.0
    got = oracle_exits(ll, correct, depths, valid, kind, lam, sigma, per_sequence)
    want = R.oracle(ll.tolist(), correct.to(F64).tolist(), depths.tolist(), valid.tolist(), kind, lam, sigma,
                    per_sequence)
    if per_sequence:
        assert got.tolist() == want
    else:
        mask = valid.tolist()
        assert [[g for g, v in zip(gr, vr, strict=True) if v] for gr, vr in zip(got.tolist(), mask, strict=True)] == \
            [[w for w, v in zip(wr, vr, strict=True) if v] for wr, vr in zip(want, mask, strict=True)]
        assert len({w for row in want for w in row}) >= 2  # not a constant oracle
    # control: a huge depth penalty always picks the shallowest exit
    big = oracle_exits(ll, correct, depths, valid, kind, 1e3, sigma, per_sequence)
    assert not big.any()


def test_oracle_ties_go_to_the_shallower_exit():
    B, T, E = 2, 5, 4
    valid = torch.ones(B, T, dtype=torch.bool)
    depths = torch.tensor([1, 2, 3, 4])
    same = torch.full((B, T, E), -1.0, dtype=F64)
    correct = torch.ones(B, T, E, dtype=torch.bool)
    for kind in ORACLES:
        for per_sequence in (False, True):
            assert not oracle_exits(same, correct, depths, valid, kind, 0.0, 1.0, per_sequence).any()
    ll = same.clone()
    ll[..., 2] = ll[..., 3] = 0.0  # exits 2 and 3 tie at the top
    assert bool((oracle_exits(ll, correct, depths, valid, "likelihood", 0.0, 1.0, False) == 2).all())
    correct[..., :2] = False  # exits 2 and 3 both correct
    assert bool((oracle_exits(ll, correct, depths, valid, "correctness", 0.0, 1.0, True) == 2).all())


def _halting_reference(model, x, y, layers, kind, oracle_kind, lam, sigma):  # noqa: ANN001, ANN202
    """(halting loss, mean oracle depth) by hand."""
    ex = R.exit_layers(N_LAYERS, layers)
    hs = R.full_states(model, x)
    logits = [R.exit_logits(model, k, hs[layer + 1]) for k, layer in enumerate(ex)]
    B, T = y.shape
    lls = [R.log_likelihoods(lg, y) for lg in logits]
    cors = [R.correctness(lg, y) for lg in logits]
    ll = [[[lls[n][b][t] for n in range(len(ex))] for t in range(T)] for b in range(B)]
    cor = [[[cors[n][b][t] for n in range(len(ex))] for t in range(T)] for b in range(B)]
    valid = (y != R.IGNORE).tolist()
    depths = [layer + 1 for layer in ex]
    per_sequence = kind == "sequence"
    orc = R.oracle(ll, cor, depths, valid, oracle_kind, lam, sigma, per_sequence)
    W, bias = model.exits.halting.weight.detach(), model.exits.halting.bias.detach()
    if per_sequence:  # every prefix's pooled state is trained towards the sequence's oracle exit
        lq = R.log_q_sequence(W, bias, hs[1], None)
        pairs = [(b, t) for b in range(B) for t in range(T) if valid[b][t]]
        nll = [-lq[b][t][orc[b]] for b, t in pairs]
        return sum(nll) / len(pairs), sum(depths[o] for o in orc) / B, orc
    if kind == "token":
        lq = R.log_q_token(W, bias, hs[1])
    else:
        q = R.q_geometric(W, bias, [hs[layer + 1] for layer in ex])
        lq = [[[math.log(v) for v in qt] for qt in qb] for qb in q]
    pairs = [(b, t) for b in range(B) for t in range(T) if valid[b][t]]
    loss = sum(-lq[b][t][orc[b][t]] for b, t in pairs) / len(pairs)
    return loss, sum(depths[orc[b][t]] for b, t in pairs) / len(pairs), orc


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("kind", ["sequence", "token", "geometric"])
@torch.no_grad()
def test_halting_loss_matches_reference(kind, oracle):
    layers = [0, 2]
    ex = R.exit_layers(N_LAYERS, layers)
    alpha, lam, sigma = 0.3, 0.05, 2.0
    model = _model(layers=layers, halting=kind, oracle=oracle, oracle_lambda=lam, oracle_sigma=sigma,
                   halting_alpha=alpha).train()
    B, T = 3, 10
    x = _tokens(B, T)
    # targets that some exits get right, so that correctness oracles are not constant
    hs = R.full_states(model, x)
    y = _targets(B, T)
    for b in range(B):
        for t in range(T):
            if (b + t) % 2 and y[b, t] != R.IGNORE:
                k = (b * T + t) % len(ex)
                y[b, t] = int(R.exit_logits(model, k, hs[ex[k] + 1][b, t]).argmax())
    out = model(x, y)
    loss, depth, orc = _halting_reference(model, x, y, layers, kind, oracle, lam, sigma)
    assert float(out.aux_losses["exit_halting"]) == pytest.approx(alpha * loss, abs=2e-6)
    assert _stat(out, "exit_halting_loss") == pytest.approx(loss, abs=2e-6)
    assert _stat(out, "exit_oracle_depth") == pytest.approx(depth, abs=1e-6)
    _close(out.train_loss, out.objective + out.aux_losses["exit_halting"], TOL32)
    flat = orc if kind == "sequence" else [o for row, v in zip(orc, (y != R.IGNORE).tolist(), strict=True)
                                           for o, ok in zip(row, v, strict=True) if ok]
    assert len(set(flat)) >= 2  # the oracle is not constant
    # control: a heavier depth penalty moves the oracle, and the loss with it
    other, _, orc2 = _halting_reference(model, x, y, layers, kind, oracle, lam + 10.0, sigma)
    assert orc2 != orc
    assert abs(float(out.aux_losses["exit_halting"]) - alpha * other) > 1e-4


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("kind", ["sequence", "token", "geometric"])
def test_halting_detach_stops_gradients_into_the_layers(kind, detach):
    model = _model(layers=[0, 2], halting=kind, halting_detach=detach).train()
    x, y = _tokens(2, 8), _targets(2, 8)
    model(x, y).aux_losses["exit_halting"].backward()
    halting = model.exits.halting
    assert halting.weight.grad.abs().max() > 0 and halting.bias.grad.abs().max() > 0
    layer_grads = [p.grad for p in model.layers.parameters()]
    if detach:
        assert all(g is None or not g.any() for g in layer_grads)
        assert model.embed.weight.grad is None or not model.embed.weight.grad.any()
    else:
        assert any(g is not None and g.abs().max() > 0 for g in layer_grads)
    # the halting loss never trains the exit heads (the oracle is a target)
    for norm in model.exits.norms:
        assert norm.weight.grad is None or not norm.weight.grad.any()


@pytest.mark.parametrize("layers", [None, [1, 2]])
@pytest.mark.parametrize("kind", ["sequence", "token", "geometric"])
@torch.no_grad()
def test_halting_inference_matches_reference(kind, layers):
    ex = R.exit_layers(N_LAYERS, layers)
    tau = 0.6
    B, T = (6, 6) if kind == "sequence" else (2, 10)
    model = _model(layers=layers, halting=kind, halting_tau=tau, halting_std=2.0).eval()
    x, y = _tokens(B, T), _targets(B, T)
    W, bias = model.exits.halting.weight.detach(), model.exits.halting.bias.detach()
    hs = R.full_states(model, x)

    def argmax_with_margin(lq: list[float]) -> int:
        s = sorted(lq, reverse=True)
        assert s[0] - s[1] > 1e-5  # float32 log q: no near ties
        return lq.index(s[0])

    if kind == "geometric":
        def stop(k, lg, h, h_prev, b, t):  # noqa: ANN001, ANN202
            chi = R.sigmoid(R.dot(W[k], h) + float(bias[k]))
            return chi > tau, chi
        thresholds = [tau] * (len(ex) - 1)
    else:
        if kind == "token":
            plan = [[argmax_with_margin(q) for q in row] for row in R.log_q_token(W, bias, hs[1])]
        else:
            plan = [[argmax_with_margin(q) for q in row] for row in R.log_q_sequence(W, bias, hs[1], None)]

        def stop(k, lg, h, h_prev, b, t):  # noqa: ANN001, ANN202
            return plan[b][t] == k, 0.5
        thresholds = None
    depth = _check_decisions(model, x, y, layers, stop, thresholds, margin=1e-5)  # chi is float32
    assert len(set(depth.flatten().tolist())) >= 2  # the depths are mixed
    if kind != "geometric":  # planned depths are given depths
        _close(model(x, exit_depth_BT=depth).logits, R.given_depth(model, x, depth, layers))


@torch.no_grad()
def test_padded_batches():
    """Left-padded rows: sequence halting pools only real tokens, depth stats average only real tokens."""
    layers = [0, 2]
    ex = R.exit_layers(N_LAYERS, layers)
    B, T = 3, 10
    x, y = _tokens(B, T), _targets(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :4] = False
    valid[2, :3] = False
    y[~valid] = R.IGNORE
    # training: the halting loss of sequence halting pools the valid first-layer states
    model = _model(layers=layers, halting="sequence", oracle_lambda=0.05).train()
    out = model(x, y, valid_BT=valid)
    hs = R.full_states(model, x, valid)
    logits = [R.exit_logits(model, k, hs[layer + 1]) for k, layer in enumerate(ex)]
    _close(out.loss, R.cross_entropy(logits[-1], y))
    lls = [R.log_likelihoods(lg, y) for lg in logits]
    ll = [[[lls[n][b][t] for n in range(len(ex))] for t in range(T)] for b in range(B)]
    orc = R.oracle(ll, ll, [layer + 1 for layer in ex], (y != R.IGNORE).tolist(), "likelihood", 0.05, 1.0, True)
    W, bias = model.exits.halting.weight.detach(), model.exits.halting.bias.detach()
    lq = R.log_q_sequence(W, bias, hs[1], valid)
    real = (y != R.IGNORE).tolist()
    pairs = [(b, t) for b in range(B) for t in range(T) if real[b][t]]
    want = sum(-lq[b][t][orc[b]] for b, t in pairs) / len(pairs)
    assert _stat(out, "exit_halting_loss") == pytest.approx(want, abs=2e-6)
    # inference: confidence exits on the padded batch, stats over the real tokens only
    model = _model(layers=layers).eval()
    thresholds, _ = _thresholds_between_quantiles(model, x, layers, "softmax", [0.6, 0.5])
    set_exit_thresholds(model, thresholds)
    out = model(x, y, valid_BT=valid, trace=True)
    want, depth, _ = R.decide(model, x, layers, R.confidence_policy("softmax", thresholds), valid)
    assert torch.equal(out.traces["exit_depth"][valid], depth[valid])
    _close(out.logits[valid], want[valid])
    real = depth[valid].tolist()
    assert len(set(real)) >= 2
    assert _stat(out, "exit_avg_depth") == pytest.approx(sum(real) / len(real), abs=1e-6)
    for layer in ex:
        assert _stat(out, f"layer{layer}/exit_frac") == pytest.approx(real.count(layer + 1) / len(real), abs=1e-6)
    assert abs(_stat(out, "exit_avg_depth") - float(depth.double().mean())) > 1e-6  # padding would change it


# -- 7. LayerSkip layer dropout ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 8])
def test_layer_dropout_rate(n_layers):
    p_max = 0.3
    for layer in range(n_layers):
        want = p_max * (math.exp(layer * math.log(2) / (n_layers - 1)) - 1) if n_layers > 1 else 0.0
        assert layer_dropout_rate(p_max, layer, n_layers) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert layer_dropout_rate(p_max, 0, n_layers) == 0.0
    if n_layers > 1:
        assert layer_dropout_rate(p_max, n_layers - 1, n_layers) == pytest.approx(p_max, rel=1e-12)
        rates = [layer_dropout_rate(p_max, i, n_layers) for i in range(n_layers)]
        assert rates == sorted(rates)


@pytest.mark.parametrize("head", ["shared", "separate"])
@torch.no_grad()
def test_layer_dropout_in_aligned_training_matches_reference(head):
    layers, p_max = [0, 2], 0.7
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(layers=layers, head=head, layer_dropout=p_max).train()
    B, T = 3, 8
    x, y = _tokens(B, T), _targets(B, T)
    w = [1.0] * len(ex)
    seen_drop = seen_keep = seen_change = False
    for seed in range(4):
        torch.manual_seed(seed)
        out = model(x, y)
        torch.manual_seed(seed)
        keeps = R.draw_keeps(B, N_LAYERS, p_max)
        objective, ces, last = R.aligned_with_dropout(model, x, y, layers, w, keeps)
        _close(out.objective, objective, TOL_W)
        _close(out.loss, ces[-1])
        _close(out.logits, last)
        for layer, ce in zip(ex, ces, strict=True):
            assert _stat(out, f"layer{layer}/exit_loss") == pytest.approx(float(ce), abs=1e-10)
        for i, keep in enumerate(keeps):
            if keep is None:
                assert f"layer{i}/exit_layer_kept" not in out.stats
            else:
                assert _stat(out, f"layer{i}/exit_layer_kept") == pytest.approx(sum(keep) / B, abs=1e-7)
                seen_drop |= not all(keep)
                seen_keep |= any(keep)
        no_drop = R.aligned(model, x, y, layers, w)[0]
        seen_change |= abs(float(no_drop) - float(objective)) > 1e-6
    assert seen_drop and seen_keep and seen_change


@torch.no_grad()
def test_layer_dropout_in_mixed_training_matches_reference():
    layers, p_max, M = [0, 2], 0.6, 2
    ex = R.exit_layers(N_LAYERS, layers)
    model = _model(layers=layers, layer_dropout=p_max, training="mixed", mixed_samples=M).train()
    B, T = 3, 8
    x, y = _tokens(B, T), _targets(B, T)
    depths = torch.tensor([layer + 1 for layer in ex])
    torch.manual_seed(7)
    out = model(x, y)
    torch.manual_seed(7)
    total, dropped = 0.0, 0
    for _ in range(M):  # the model draws a sample's exits, then its layers' keeps
        k = torch.randint(0, len(ex), (B, T))
        keeps = R.draw_keeps(B, N_LAYERS, p_max)
        dropped += sum(not v for keep in keeps if keep is not None for v in keep)
        total = total + R.cross_entropy(R.given_depth(model, x, depths[k], layers, keeps=keeps), y)
    assert dropped > 0
    _close(out.objective, total / M)


@torch.no_grad()
def test_stochastic_layer_dropout_rates_and_no_dropout_in_eval():
    p_max = 0.5
    model = _model(layers=None, layer_dropout=p_max).train()
    x, y = _tokens(16, 2), _tokens(16, 2)
    kept = {i: 0.0 for i in range(1, N_LAYERS)}
    n = 60
    for _ in range(n):
        out = model(x, y)
        for i in kept:
            kept[i] += _stat(out, f"layer{i}/exit_layer_kept") / n
    for i, k in kept.items():  # 960 samples a layer: a standard error under 0.016
        assert k == pytest.approx(1 - layer_dropout_rate(p_max, i, N_LAYERS), abs=0.06)
    model.eval()
    depth = torch.randint(1, N_LAYERS + 1, x.shape)
    state = torch.get_rng_state()
    out = model(x, y)
    given = model(x, y, exit_depth_BT=depth)
    set_exit_thresholds(model, _thresholds_between_quantiles(model, x, None, "softmax", [0.5])[0])
    decided = model(x, y, trace=True)
    assert len(set(decided.traces["exit_depth"].flatten().tolist())) >= 2
    assert torch.equal(torch.get_rng_state(), state)  # no draws at all
    for o in (out, given, decided):
        assert not any(k.endswith("exit_layer_kept") for k in o.stats)
    _close(out.logits, R.exit_logits(model, N_LAYERS - 1, R.full_states(model, x)[-1]))
    _close(given.logits, R.given_depth(model, x, depth, None))


# -- 8. FLOPs ---------------------------------------------------------------------------------------------
def _mv_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ARG001
    return 2 * a_shape[0] * a_shape[1]


def _measured(model, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> int:  # noqa: ANN001
    """Forward FLOPs; matrix-vector products (the geometric halting logits) counted too."""
    mapping = {torch.ops.aten.mv: _mv_flops}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False,
                                                                         custom_mapping=mapping) as counter:
        model(tokens, targets)
    return counter.get_total_flops()


FLOP_CASES = [
    dict(layers=None), dict(layers=[0, 2]), dict(head="separate"), dict(head="separate", layers=[1]),
    dict(halting="token"), dict(halting="geometric", layers=[0, 2]), dict(halting="sequence"),
    dict(training="mixed", mixed_samples=3), dict(training="mixed", mixed_samples=2, head="separate"),
]


@pytest.mark.parametrize("T", [16, 40])
@pytest.mark.parametrize("case", FLOP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_flops_closed_form(case, T):
    cfg = _cfg(**case)
    dense = dataclasses.replace(cfg, exits=None)
    n_exits = len(R.exit_layers(N_LAYERS, case.get("layers")))
    base = count_flops(dense, T).forward_flops
    heads = 2 * T * D * V * (n_exits - 1)
    halting = case.get("halting", "none")
    rows = {"none": 0, "geometric": n_exits - 1}.get(halting, n_exits)
    # halting projects one (sequence: prefix-pooled) state per token
    aligned = base + heads + 2 * T * D * rows
    report = count_flops(cfg, T)
    if case.get("training") == "mixed":  # separate heads: every exit's head on every token, then a selection
        extra = heads if case.get("head") == "separate" else 0
        # M sampled passes, plus one full-depth pass without gradients for the last layer's loss
        assert report.forward_flops == case["mixed_samples"] * (base + extra) + base
        assert report.train_flops == 3 * case["mixed_samples"] * (base + extra) + base
    else:
        assert report.forward_flops == aligned
        assert report.train_flops == 3 * report.forward_flops
    assert count_flops(cfg, T, training=False).forward_flops == aligned  # every exit a token may pass
    assert report.per_layer == count_flops(dense, T).per_layer


@pytest.mark.parametrize("case", [dict(layers=None), dict(layers=[0, 2]), dict(head="separate"),
                                  dict(head="separate", layers=[1]), dict(halting="token"),
                                  dict(halting="geometric", layers=[0, 2]), dict(training="mixed", mixed_samples=2)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@torch.no_grad()
def test_flops_match_flop_counter_in_training(case):
    T = 16
    cfg = _cfg(**case)
    model = build_model(cfg).train()
    dense_cfg = dataclasses.replace(cfg, exits=None)
    dense = build_model(dense_cfg).train()
    x, y = _tokens(1, T), _tokens(1, T)
    measured, measured_dense = _measured(model, x, y), _measured(dense, x, y)
    assert measured_dense == count_flops(dense_cfg, T).forward_flops  # attention counted alike
    assert measured == count_flops(cfg, T).forward_flops
    n_exits = len(R.exit_layers(N_LAYERS, case.get("layers")))
    if case.get("training") != "mixed" and "halting" not in case:
        assert measured - measured_dense == 2 * T * D * V * (n_exits - 1)


def test_flops_of_sequence_halting_match_flop_counter():
    T = 16
    cfg = _cfg(halting="sequence")
    assert _measured(build_model(cfg).train(), _tokens(1, T), _tokens(1, T)) == count_flops(cfg, T).forward_flops


def test_flops_of_mixed_training_with_separate_heads_match_flop_counter():
    T = 16
    cfg = _cfg(head="separate", training="mixed", mixed_samples=2)
    assert _measured(build_model(cfg).train(), _tokens(1, T), _tokens(1, T)) == count_flops(cfg, T).forward_flops


# -- 9. config -------------------------------------------------------------------------------------------
INVALID = [
    (dict(layers=[4]), "exits.layers"), (dict(layers=[-1]), "exits.layers"), (dict(layers=[True]), "exits.layers"),
    (dict(layers=[1.0]), "exits.layers"), (dict(layers=[3]), "exits.layers"), (dict(layers=[]), "exits.layers"),
    (dict(head="tied"), "exits.head"), (dict(training="random"), "exits.training"),
    (dict(weights="decreasing"), "exits.weights"), (dict(weights=[1.0, 1.0]), "exits.weights"),
    (dict(weights=[1.0, -1.0, 1.0, 1.0]), "exits.weights"), (dict(weights=[0.0, 0.0, 0.0, 0.0]), "exits.weights"),
    (dict(weights=[1.0, True, 1.0, 1.0]), "exits.weights"), (dict(layers=[0], weights=[1.0, 1.0, 1.0]),
                                                             "exits.weights"),
    (dict(mixed_samples=0), "exits.mixed_samples"), (dict(mixed_samples=1.5), "exits.mixed_samples"),
    (dict(mixed_samples=True), "exits.mixed_samples"),
    (dict(layer_dropout=1.0), "exits.layer_dropout"), (dict(layer_dropout=-0.1), "exits.layer_dropout"),
    (dict(halting="poisson"), "exits.halting"), (dict(oracle="bleu"), "exits.oracle"),
    (dict(oracle_lambda=-1.0), "exits.oracle_lambda"), (dict(oracle_sigma=0.0), "exits.oracle_sigma"),
    (dict(halting_alpha=-0.1), "exits.halting_alpha"),
    (dict(halting_tau=0.0), "exits.halting_tau"), (dict(halting_tau=1.0), "exits.halting_tau"),
    (dict(confidence="entropy"), "exits.confidence"),
    (dict(thresholds=[0.5]), "exits.thresholds"), (dict(thresholds=[0.5, "a", 0.5]), "exits.thresholds"),
    (dict(thresholds=[0.5, 0.5, 0.5], halting="token"), "exits.thresholds"),
]


@pytest.mark.parametrize(("exits", "fragment"), INVALID, ids=[f"{i}-{f}" for i, (_, f) in enumerate(INVALID)])
def test_invalid_exit_config_is_a_one_line_error(exits, fragment):
    cfg = _cfg(**exits)
    msg = one_line_error(cfg.validate)
    assert fragment in msg, msg
    one_line_error(lambda: build_model(cfg))


def test_exits_compose_with_altup_and_an_encoder_is_refused():
    # AltUp + exits was refused before the one layer loop; it builds now (its behaviour: tests/test_composition.py)
    ModelConfig(d_model=D, n_layers=2, n_heads=2, altup=AltUpConfig(), exits=ExitConfig()).validate()
    msg = one_line_error(ModelConfig(d_model=D, n_layers=2, n_heads=2, kind="encoder", exits=ExitConfig()).validate)
    assert "decoder" in msg


@pytest.mark.parametrize("field", ["oracle_lambda", "halting_alpha"])
def test_nan_halting_numbers_are_refused(field):
    one_line_error(_cfg(halting="token", **{field: float("nan")}).validate)


def test_dict_errors_are_one_line():
    d = _cfg().to_dict()
    d["exits"]["thresholds_"] = [0.5]
    assert "thresholds_" in one_line_error(lambda: ModelConfig.from_dict(d))
    d = _cfg().to_dict()
    d["exits"]["layers"] = "0,1"
    assert "exits.layers" in one_line_error(lambda: ModelConfig.from_dict(d))
    d = _cfg().to_dict()
    d["exits"] = [1, 2]
    assert "exits" in one_line_error(lambda: ModelConfig.from_dict(d))


def test_round_trips(tmp_path: Path):
    cfg = _cfg(layers=[0, 2], head="separate", training="aligned", weights=[1.0, 2.0, 3.0], mixed_samples=2,
               layer_dropout=0.1, halting="geometric", oracle="smoothed_correctness", oracle_lambda=0.2,
               oracle_sigma=3.0, halting_alpha=0.5, halting_detach=False, halting_tau=0.7, confidence="gap")
    cfg.validate()
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.exits, ExitConfig)
    cfg2 = _cfg(layers=[1], thresholds=[0.25])
    for suffix in ("json", "yaml"):
        for c in (cfg, cfg2):
            path = tmp_path / f"c.{suffix}"
            save_config_file(path, c)
            assert load_config_file(path)[0] == c
    # integers in a file become floats where the field is a float
    d = cfg2.to_dict()
    d["exits"]["oracle_lambda"] = 1
    assert ModelConfig.from_dict(d).exits.oracle_lambda == 1.0


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_exit_presets(size):
    cfg = preset(f"{size}-exit")
    assert cfg.exits == ExitConfig()
    twin = preset(size)
    assert dataclasses.replace(cfg, exits=None, name=size) == twin
    assert cfg.exits.exit_layers(cfg.n_layers) == list(range(cfg.n_layers))
    assert count_flops(cfg, 32).forward_flops == (count_flops(twin, 32).forward_flops
                                                  + 2 * 32 * cfg.d_model * cfg.vocab_size * (cfg.n_layers - 1))


def test_mixed_training_trains_the_halting_module_or_is_refused():
    cfg = _cfg(layers=[0, 2], training="mixed", halting="token")
    try:
        cfg.validate()
    except ConfigError:
        return
    model = build_model(cfg).train()
    out = model(_tokens(2, 8), _tokens(2, 8))
    assert "exit_halting" in out.aux_losses
    out.train_loss.backward()
    assert model.exits.halting.weight.grad is not None and model.exits.halting.weight.grad.abs().max() > 0


# -- 10. training end to end ----------------------------------------------------------------------------
@pytest.fixture
def token_data(code_corpus: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from condformer.data import prepare_data

    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    return prepare_data(str(code_corpus), "byte", 0.05)


def _tiny_exit(**exits) -> ModelConfig:
    cfg = preset("tiny-exit")
    cfg = dataclasses.replace(cfg, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                              exits=dataclasses.replace(cfg.exits, **exits))
    return cfg.validate()


def _train_cfg(corpus: Path) -> TrainConfig:
    return TrainConfig(data=str(corpus), max_steps=6, seq_len=16, batch_size=2, eval_every=3, eval_batches=1,
                       log_every=1, warmup_steps=1, checkpoint_every=1000, tensorboard=False)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _interrupted_and_straight(mc: ModelConfig, corpus: Path, data, tmp_path: Path):  # noqa: ANN001, ANN202
    from condformer.train import train

    a = train(mc, _train_cfg(corpus), tmp_path / "a", progress=False, data=data)
    part = train(mc, _train_cfg(corpus), tmp_path / "b", progress=False, stop_after=3, data=data)
    assert part.steps == 3
    b = train(mc, _train_cfg(corpus), tmp_path / "b", progress=False, resume=True, data=data)
    return a, b


def test_training_logs_exit_losses_and_resumes_exactly(code_corpus: Path, token_data, tmp_path: Path):
    a, b = _interrupted_and_straight(_tiny_exit(), code_corpus, token_data, tmp_path)
    rows = [r for r in _log(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert {"layer0/exit_loss", "layer1/exit_loss"} <= r.keys()
        assert r["layer1/exit_loss"] == pytest.approx(r["loss"], rel=1e-6)  # the last exit is the loss
        assert r["layer0/exit_loss"] != r["layer1/exit_loss"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    strip = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in _log(tmp_path / "a")] == \
        [{k: v for k, v in r.items() if k not in strip} for r in _log(tmp_path / "b")]


@pytest.mark.parametrize("exits", [dict(layer_dropout=0.5), dict(training="mixed")],
                         ids=["layer_dropout", "mixed"])
def test_random_exit_training_resumes_exactly(exits, code_corpus: Path, token_data, tmp_path: Path):
    a, b = _interrupted_and_straight(_tiny_exit(**exits), code_corpus, token_data, tmp_path)
    assert a.train_loss == b.train_loss
