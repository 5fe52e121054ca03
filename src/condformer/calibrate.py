"""Pick confidence-exit thresholds on validation data so that quality stays within a tolerance (CALM).

``condformer calibrate RUN --tolerance X`` measures the full-depth model on the run's fixed validation
batches, then searches per-exit thresholds that make tokens exit as early as possible while

- ``metric="loss"``: the validation loss rises by at most ``X`` relative to full depth (0.01 = 1%), or
- ``metric="agreement"``: at least ``1 - X`` of the tokens predict (argmax) what the full model predicts.

The search runs on one *aligned* pass (every token through every layer, each exit's confidence, loss and
argmax recorded), where a threshold vector's quality is a cheap gather: a shared threshold over a grid of
confidence quantiles first, then each exit's threshold lowered in turn while the estimate stays feasible.
The aligned pass ignores that exited tokens' states are copied upward (later tokens attend to the copies),
so the chosen thresholds are then **verified exactly** with the model's real early-exit forward; if that
misses the tolerance, the search is redone with a smaller budget. Reported numbers are the exact ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch

from condformer.errors import CondformerError
from condformer.routing.early_exit import confidence, target_log_likelihood

METRICS = ("loss", "agreement")


@dataclass
class Calibration:
    thresholds: list[float] | None  # None: no thresholds meet the tolerance (full depth)
    metric: str
    tolerance: float
    full_loss: float
    loss: float  # exact, with the thresholds
    agreement: float  # share of tokens whose prediction equals the full model's
    mean_depth: float
    n_layers: int
    histogram: list[int]  # tokens per depth 1..n_layers
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _aligned_pass(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per exit: confidence, target log-likelihood and argmax of every token, all layers computed."""
    exits = model.exits
    ctx = model._context(x, None, None, None)
    h = model.embed(x)
    conf, ll, pred = [], [], []
    for i, layer in enumerate(model.layers):
        h_prev, h = h, layer(h, ctx.for_layer(i))
        k = exits.exit_of_layer.get(i)
        if k is None:
            continue
        logits = exits.exit_logits(k, h, model)
        conf.append(confidence(exits.spec.confidence, logits, h, h_prev).flatten())
        ll.append(target_log_likelihood(logits, y).flatten())
        pred.append(logits.argmax(dim=-1).flatten())
    return {"conf": torch.stack(conf[:-1]), "ll": torch.stack(ll), "pred": torch.stack(pred)}


def _estimate(thr_E: torch.Tensor, a: dict[str, torch.Tensor], depths: torch.Tensor) -> tuple[float, float, float]:
    """(loss, agreement, mean depth) of thresholds on the aligned pass."""
    n_exits, n_tok = a["ll"].shape
    fire = a["conf"] > thr_E[:, None]
    fire = torch.cat([fire, torch.ones(1, n_tok, dtype=torch.bool, device=fire.device)])
    k = fire.to(torch.long).argmax(dim=0)
    loss = -a["ll"].gather(0, k[None])[0].mean()
    agree = (a["pred"].gather(0, k[None])[0] == a["pred"][-1]).float().mean()
    return float(loss), float(agree), float(depths[k].float().mean())


def calibrate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], tolerance: float,
              metric: str = "loss", grid: int = 64) -> Calibration:
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
    was_training = model.training
    model.eval()
    saved = exits.thresholds
    try:
        parts = [_aligned_pass(model, x, y) for x, y in batches]
        a = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        keep = torch.cat([(y != -100).flatten() for _, y in batches])
        a = {k: v[:, keep] for k, v in a.items()}
        depths = exits.depths.to(a["ll"].device)
        full_loss = float(-a["ll"][-1].mean())

        def ok(loss: float, agree: float, budget: float) -> bool:
            return loss <= full_loss * (1 + budget) if metric == "loss" else agree >= 1 - budget

        qs = torch.linspace(0, 1, grid + 1, dtype=a["conf"].dtype, device=a["conf"].device)
        values = torch.quantile(a["conf"].flatten()[:1_000_000].float(), qs.float()).to(a["conf"].dtype)
        never = a["conf"].max() + 1
        candidates = torch.cat([values, never[None]]).unique()
        n = exits.n_exits - 1
        budget, chosen, exact = tolerance, None, None
        for _ in range(8):
            thr = _search(a, depths, candidates, n, lambda lo, ag, b=budget: ok(lo, ag, b))
            if thr is None:
                break
            exact = exact_quality(model, batches, thr)
            if ok(exact["loss"], exact["agreement"], tolerance):
                chosen = thr
                break
            budget /= 2
        if chosen is None:
            exact = exact_quality(model, batches, None)
        return Calibration(thresholds=chosen, metric=metric, tolerance=tolerance, full_loss=exact["full_loss"],
                           loss=exact["loss"], agreement=exact["agreement"], mean_depth=exact["mean_depth"],
                           n_layers=exits.n_layers, histogram=exact["histogram"], tokens=exact["tokens"])
    finally:
        exits.thresholds = saved
        model.train(was_training)


def _search(a: dict[str, torch.Tensor], depths: torch.Tensor, candidates: torch.Tensor, n: int,
            feasible) -> list[float] | None:  # noqa: ANN001
    """The shallowest feasible shared threshold, then each exit's lowered in turn (two sweeps)."""
    dtype, device = a["conf"].dtype, a["conf"].device
    best, best_depth = None, float("inf")
    for v in candidates.tolist():
        thr = torch.full((n,), v, dtype=dtype, device=device)
        loss, agree, depth = _estimate(thr, a, depths)
        if feasible(loss, agree) and depth < best_depth:
            best, best_depth = thr, depth
    if best is None:
        return None
    for _ in range(2):
        for k in range(n):
            for v in candidates.tolist():
                if v >= float(best[k]):
                    continue
                trial = best.clone()
                trial[k] = v
                loss, agree, depth = _estimate(trial, a, depths)
                if feasible(loss, agree) and depth < best_depth:
                    best, best_depth = trial, depth
    return [float(v) for v in best]


@torch.no_grad()
def exact_quality(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  thresholds: list[float] | None) -> dict[str, Any]:
    """Loss, agreement with full depth and depths of the real early-exit forward (exited states copied upward)."""
    exits = model.exits
    saved, was_training = exits.thresholds, model.training
    model.eval()
    try:
        return _exact(model, batches, thresholds)
    finally:
        exits.thresholds = saved
        model.train(was_training)


def _exact(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
           thresholds: list[float] | None) -> dict[str, Any]:
    exits = model.exits
    tot_full, tot, agree, n_tok = 0.0, 0.0, 0.0, 0
    hist = [0] * exits.n_layers
    depth_sum = 0.0
    for x, y in batches:
        exits.thresholds = None
        full = model(x, y)
        exits.thresholds = thresholds
        out = model(x, y, trace=True)
        valid = y != -100
        m = int(valid.sum())
        tot_full += float(full.loss) * m
        tot += float(out.loss) * m
        agree += float(((out.logits.argmax(-1) == full.logits.argmax(-1)) & valid).sum())
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
    for v in values:
        q = exact_quality(model, batches, [v] * (exits.n_exits - 1))
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
