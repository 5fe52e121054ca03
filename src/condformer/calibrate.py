"""Pick confidence-exit thresholds on validation data so that quality stays within a tolerance (CALM).

``condformer calibrate RUN --tolerance X`` measures the full-depth model on the run's fixed validation
batches, then searches per-exit thresholds that make tokens exit as early as possible while

- ``metric="loss"``: the validation loss rises by at most ``X`` relative to full depth (0.01 = 1%), or
- ``metric="agreement"``: at least ``1 - X`` of the tokens predict (argmax) what the full model predicts.

Among the thresholds that meet the tolerance it picks the cheapest to decode with, by the expected cost per
token in layers: the layers computed plus ``check_cost`` for every exit checked that did not fire (an exit
whose head is computed for nothing; the exit a token takes replaces the final head). So an exit that
rarely fires can be switched off (a null threshold) rather than checked for every token. ``check_cost``
defaults to the FLOP ratio of an exit head to a layer for one decoded token (0 for cosine confidence,
which needs no head to decide); on hardware where a check costs more (CPU decoding at batch 1 is bound by
per-operation overhead, not FLOPs) pass the measured ratio.

The search runs on one *aligned* pass (every token through every layer, each exit's confidence, loss and
argmax recorded), where a threshold vector's quality is a cheap gather: a shared threshold over a grid of
confidence quantiles first, then coordinate descent over each exit's threshold (a quantile or off).
The aligned pass ignores that exited tokens' states are copied upward (later tokens attend to the copies),
so the chosen thresholds are then **verified exactly** with the model's real early-exit forward; if that
misses the tolerance, the search is redone with a budget 15% smaller (or, if that finds nothing new, every
threshold is raised one quantile step) until it holds. Reported numbers are the exact ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch

from condformer.errors import CondformerError
from condformer.exits.halting import confidence
from condformer.exits.policies import RecordExits
from condformer.losses import IGNORE_INDEX, target_log_likelihood

METRICS = ("loss", "agreement")


@dataclass
class Calibration:
    thresholds: list[float | None] | None  # None: no thresholds meet the tolerance (full depth); None entry: off
    metric: str
    tolerance: float
    full_loss: float
    loss: float  # exact, with the thresholds
    agreement: float  # share of tokens whose prediction equals the full model's
    mean_depth: float
    n_layers: int
    histogram: list[int]  # tokens per depth 1..n_layers
    tokens: int
    check_cost: float = 0.0  # an exit check that does not fire, in layers
    cost: float = 0.0  # expected decode cost per token in layers, checks included (full depth: n_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _aligned_pass(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per exit: confidence, target log-likelihood and argmax of every token, all layers computed."""
    exits, heads = model.exits, model.exit_heads()
    record = RecordExits(exits.exit_of_layer, model.stream.readout, previous=exits.spec.confidence == "cosine")
    ctx = model.context(x)
    model.run(model.enter(x, ctx.positions_BT), ctx, policy=record)
    conf, ll, pred = [], [], []
    for k, r in enumerate(record.readouts):
        logits = heads.logits(k, r)
        r_prev = record.before[k] if record.before else r
        conf.append(confidence(exits.spec.confidence, logits, r, r_prev).flatten())
        ll.append(target_log_likelihood(logits, y).flatten())
        pred.append(logits.argmax(dim=-1).flatten())
    return {"conf": torch.stack(conf[:-1]), "ll": torch.stack(ll), "pred": torch.stack(pred)}


def exit_check_cost(cfg: Any) -> float:
    """An exit check that does not fire, in layers: head FLOPs over a layer's for one decoded token."""
    from condformer.flops import layer_forward_flops

    if cfg.exits.confidence == "cosine":
        return 0.0
    layer = sum(layer_forward_flops(cfg, i, 1) for i in range(cfg.n_layers)) / cfg.n_layers
    return 2 * cfg.d_model * cfg.vocab_size / layer


def decode_cost(histogram: list[int], exit_layers: list[int], thresholds: list[float | None] | None,
                check_cost: float) -> float:
    """Expected layers per token, checks included, from the depth histogram (``histogram[d-1]``: tokens at depth d)."""
    if thresholds is None:
        return sum((d + 0.0) * c for d, c in enumerate(histogram, start=1)) / max(sum(histogram), 1)
    enabled = [layer for layer, t in zip(exit_layers[:-1], thresholds, strict=True) if t is not None]
    total = sum(c * (d + check_cost * sum(1 for layer in enabled if layer + 1 < d))
                for d, c in enumerate(histogram, start=1))
    return total / max(sum(histogram), 1)


def _estimate(thr_E: torch.Tensor, a: dict[str, torch.Tensor], depths: torch.Tensor,
              check_cost: float) -> tuple[float, float, float, float]:
    """(loss, agreement, mean depth, decode cost) of thresholds on the aligned pass (inf: the exit is off)."""
    n_exits, n_tok = a["ll"].shape
    fire = a["conf"] > thr_E[:, None]
    fire = torch.cat([fire, torch.ones(1, n_tok, dtype=torch.bool, device=fire.device)])
    k = fire.to(torch.long).argmax(dim=0)
    loss = -a["ll"].gather(0, k[None])[0].mean()
    agree = (a["pred"].gather(0, k[None])[0] == a["pred"][-1]).float().mean()
    checked_before = torch.cat([thr_E.new_zeros(1), torch.isfinite(thr_E).to(thr_E.dtype).cumsum(0)])
    depth = depths[k].to(thr_E.dtype)
    cost = (depth + check_cost * checked_before[k]).mean()
    return float(loss), float(agree), float(depth.mean()), float(cost)


def calibrate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], tolerance: float,
              metric: str = "loss", grid: int = 64, check_cost: float | None = None) -> Calibration:
    """Thresholds for ``model``'s confidence exits on ``batches`` of (inputs, targets); see the module docstring."""
    exits = getattr(model, "exits", None)
    if exits is None:
        raise CondformerError("this model has no early exits; calibrate a run trained with an exit preset "
                              "(e.g. tiny-exit)")
    if exits.halting is not None:
        raise CondformerError("this model's depth comes from its halting module; calibrate tunes confidence "
                              "thresholds (train with exits.halting 'none')")
    if metric not in METRICS:
        raise CondformerError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    if not 0 <= tolerance < 1:
        raise CondformerError(f"--tolerance must be in [0, 1) (0.01 = 1%), got {tolerance}")
    if not batches:
        raise CondformerError("calibration needs at least one validation batch")
    if check_cost is None:
        check_cost = exit_check_cost(model.cfg)
    if isinstance(check_cost, bool) or not isinstance(check_cost, (int, float)) or not check_cost >= 0:
        raise CondformerError(f"--check-cost must be a number >= 0 (layers per exit check), got {check_cost}")
    was_training = model.training
    model.eval()
    saved = exits.thresholds
    try:
        parts = [_aligned_pass(model, x, y) for x, y in batches]
        a = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        keep = torch.cat([(y != IGNORE_INDEX).flatten() for _, y in batches])
        a = {k: v[:, keep] for k, v in a.items()}
        depths = exits.depths.to(a["ll"].device)
        full_loss = float(-a["ll"][-1].mean())

        def ok(loss: float, agree: float, budget: float) -> bool:
            return loss <= full_loss * (1 + budget) if metric == "loss" else agree >= 1 - budget

        qs = torch.linspace(0, 1, grid + 1, dtype=a["conf"].dtype, device=a["conf"].device)
        values = torch.quantile(a["conf"].flatten()[:1_000_000].float(), qs.float()).to(a["conf"].dtype)
        off = torch.tensor([float("inf")], dtype=values.dtype, device=values.device)
        candidates = torch.cat([values, off]).unique()
        n = exits.n_exits - 1
        budget, chosen, exact = tolerance, None, None
        # the aligned estimate ignores that later tokens attend to exited tokens' copied states, so the exact
        # check can fail: then search again with a budget 15% smaller, or, when that finds nothing new (an
        # estimate can sit at its bound, e.g. 100% agreement), raise every threshold one quantile step
        ladder = sorted(candidates.tolist())
        reference = full_depth_reference(model, batches)
        tried: set[tuple] = set()
        thr = _search(a, depths, candidates, n, lambda lo, ag, b=budget: ok(lo, ag, b), check_cost)
        for _ in range(32):
            if thr is None:
                break
            tried.add(tuple(thr))
            exact = exact_quality(model, batches, thr, reference)
            if ok(exact["loss"], exact["agreement"], tolerance):
                chosen = thr
                break
            budget *= 0.85
            nxt = _search(a, depths, candidates, n, lambda lo, ag, b=budget: ok(lo, ag, b), check_cost)
            thr = nxt if nxt is not None and tuple(nxt) not in tried else _raise(thr, ladder)
        if chosen is None:
            exact = exact_quality(model, batches, None, reference)
        cost = decode_cost(exact["histogram"], exits.exit_layers, chosen, check_cost)
        return Calibration(thresholds=chosen, metric=metric, tolerance=tolerance, full_loss=exact["full_loss"],
                           loss=exact["loss"], agreement=exact["agreement"], mean_depth=exact["mean_depth"],
                           n_layers=exits.n_layers, histogram=exact["histogram"], tokens=exact["tokens"],
                           check_cost=check_cost, cost=cost)
    finally:
        exits.thresholds = saved
        model.train(was_training)


def _search(a: dict[str, torch.Tensor], depths: torch.Tensor, candidates: torch.Tensor, n: int,
            feasible, check_cost: float) -> list[float | None] | None:  # noqa: ANN001
    """The cheapest feasible thresholds: from the best shared one (or from every exit off, which is full depth and
    always feasible), coordinate descent (up to four sweeps) over each exit's threshold among the candidates
    (inf: off). None when the result is every exit off."""
    dtype, device = a["conf"].dtype, a["conf"].device
    best = torch.full((n,), float("inf"), dtype=dtype, device=device)
    best_cost = _estimate(best, a, depths, check_cost)[3]
    for v in candidates.tolist():
        thr = torch.full((n,), v, dtype=dtype, device=device)
        loss, agree, _, cost = _estimate(thr, a, depths, check_cost)
        if feasible(loss, agree) and cost < best_cost:
            best, best_cost = thr, cost
    for _ in range(4):
        improved = False
        for k in range(n):
            for v in candidates.tolist():
                trial = best.clone()
                trial[k] = v
                loss, agree, _, cost = _estimate(trial, a, depths, check_cost)
                if feasible(loss, agree) and cost < best_cost - 1e-12:
                    best, best_cost, improved = trial, cost, True
        if not improved:
            break
    if not bool(torch.isfinite(best).any()):
        return None
    return [float(v) if v != float("inf") else None for v in best.tolist()]


def _raise(thresholds: list[float | None], values: list[float]) -> list[float | None] | None:
    """Every threshold one candidate higher (past the highest: that exit off); None when every exit is off."""
    out = [None if t is None else next((v for v in values if v > t and v != float("inf")), None) for t in thresholds]
    return None if all(t is None for t in out) else out


@torch.no_grad()
def exact_quality(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  thresholds: list[float | None] | None,
                  full: list[tuple[float, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Loss, agreement with full depth and depths of the real early-exit forward (exited states copied upward).

    ``full``: :func:`full_depth_reference` of the same batches, when the caller checks several thresholds.
    """
    exits = model.exits
    saved, was_training = exits.thresholds, model.training
    model.eval()
    try:
        if full is None:
            full = full_depth_reference(model, batches)
        return _exact(model, batches, thresholds, full)
    finally:
        exits.thresholds = saved
        model.train(was_training)


@torch.no_grad()
def full_depth_reference(model: torch.nn.Module,
                         batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[float, torch.Tensor]]:
    """(loss, argmax per token) of each batch at full depth: what exact checks compare against."""
    exits = model.exits
    saved, was_training = exits.thresholds, model.training
    model.eval()
    exits.thresholds = None
    try:
        out = []
        for x, y in batches:
            o = model(x, y)
            out.append((float(o.loss), o.logits.argmax(-1)))
        return out
    finally:
        exits.thresholds = saved
        model.train(was_training)


def _exact(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
           thresholds: list[float | None] | None, full: list[tuple[float, torch.Tensor]]) -> dict[str, Any]:
    exits = model.exits
    exits.thresholds = thresholds
    tot_full, tot, agree, n_tok = 0.0, 0.0, 0.0, 0
    hist = [0] * exits.n_layers
    depth_sum = 0.0
    for (x, y), (full_loss, full_pred) in zip(batches, full, strict=True):
        out = model(x, y, trace=True)
        valid = y != IGNORE_INDEX
        m = int(valid.sum())
        tot_full += full_loss * m
        tot += float(out.loss) * m
        agree += float(((out.logits.argmax(-1) == full_pred) & valid).sum())
        depth = out.traces.get("exit_depth", torch.full_like(y, exits.n_layers))[valid]
        depth_sum += float(depth.float().sum())
        hist = [h + int((depth == d + 1).sum()) for d, h in enumerate(hist)]
        n_tok += m
    return {"full_loss": tot_full / n_tok, "loss": tot / n_tok, "agreement": agree / n_tok,
            "mean_depth": depth_sum / n_tok, "histogram": hist, "tokens": n_tok}


@torch.no_grad()
def depth_quality_curve(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        points: int = 12) -> dict[str, Any]:
    """Exact loss and mean depth for shared thresholds at quantiles of the exits' confidences."""
    exits = model.exits
    if exits.halting is not None:
        raise CondformerError("the depth-quality curve is for confidence exits; this model uses a halting module")
    was_training = model.training
    model.eval()
    try:
        conf = torch.cat([_aligned_pass(model, x, y)["conf"].flatten() for x, y in batches])
    finally:
        model.train(was_training)
    qs = torch.linspace(0, 1, points, dtype=torch.float32)
    values = torch.quantile(conf[:1_000_000].float(), qs).unique().tolist()
    out, full_loss, tokens = [], None, 0
    reference = full_depth_reference(model, batches)
    for v in values:
        q = exact_quality(model, batches, [v] * (exits.n_exits - 1), reference)
        full_loss, tokens = q["full_loss"], q["tokens"]
        out.append({"threshold": v, "mean_depth": q["mean_depth"], "loss": q["loss"], "agreement": q["agreement"]})
    return {"points": out, "full_loss": full_loss, "tokens": tokens}


def validation_batches(data: Any, model_cfg: Any, train_cfg: Any, n_batches: int,
                       device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's fixed validation batches (those ``evaluate`` scores), moved to ``device``."""
    from condformer.train import EVAL_SEED, make_batch

    fixed = dataclasses.replace(train_cfg, seed=EVAL_SEED)
    out = []
    for i in range(n_batches):
        x, y = make_batch(data, model_cfg, fixed, "val", i, 0, 1)
        out.append((x.to(device), y.to(device)))
    return out
