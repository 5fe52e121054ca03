"""The compute dial's search: the cheapest joint setting of a trained model's knobs within a quality tolerance.

For every setting of the grid (the product of each knob's values, :func:`knob_grid`) the model scores the run's
validation sequences with teacher forcing, and each sequence gets a loss in [0, 1] against the full-compute model
(the trained settings):

* ``agreement``: the share of its tokens whose most likely next token differs from the full model's;
* ``loss``: its relative increase in mean cross-entropy, (nll_setting - nll_full) / nll_full, an improvement
  counted as 0 and an increase past 100% as 1 (so the controlled risk bounds the mean relative increase from
  above wherever no sequence loses more than double).

The cost of a setting is the forward FLOPs per token that actually ran (``torch.utils.flop_counter`` on one
calibration batch: MoD's gathered tokens and MoE's chosen experts only, since the model computes nothing else).
The sequences are split at random into a calibration part, on which Learn-then-Test
(:mod:`condformer.dial.ltt`) certifies settings with risk <= the tolerance with probability >= 1 - delta, and a
disjoint holdout part on which the chosen setting's risk is observed and reported next to the tolerance.

Shapes: S settings, N sequences, B rows per batch, T tokens per row, V vocabulary.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from condformer.errors import CondformerError
from condformer.losses import IGNORE_INDEX

METRICS = ("loss", "agreement")
# the knobs the dial turns, each with the grid of values it tries (the trained value first: full compute)
DIAL_KNOBS = ("moe_top_k", "mod_threshold")
MOD_THRESHOLDS = (0.0, 0.5, 1.0, 2.0, 4.0)  # causal-decision logits: 0 is the trained decision, higher routes fewer


def knob_grid(model: torch.nn.Module, knobs: list[str] | None = None) -> list[dict[str, Any]]:
    """Every joint setting of the model's dial knobs (``knobs``: a subset to turn; None: all it has).

    The first setting is the full-compute one (each knob at its trained value)."""
    have = model.inference_settings()
    names = [k for k in DIAL_KNOBS if k in have] if knobs is None else list(knobs)
    for name in names:
        if name not in DIAL_KNOBS:
            raise CondformerError(f"unknown dial knob '{name}'; choose from: {', '.join(DIAL_KNOBS)}")
        if name not in have:
            raise CondformerError(f"this model has no '{name}' knob (its dial knobs: "
                                  f"{', '.join(k for k in DIAL_KNOBS if k in have) or 'none'})")
    if not names:
        raise CondformerError("this model has no knob the dial turns (MoE experts per token, MoD's decision "
                              "threshold); train a model with MoE or MoD layers")
    values = [_values(model, name) for name in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def _values(model: torch.nn.Module, name: str) -> list[Any]:
    if name == "moe_top_k":
        trained = max(getattr(m, "k", 1) for m in model.modules() if "moe_top_k" in getattr(m, "inference_knobs", ()))
        return list(range(trained, 0, -1))
    return list(MOD_THRESHOLDS)


@dataclass
class Scored:
    """One setting over the N sequences: its per-token mean NLL and argmax agreement, and its cost."""

    settings: dict[str, Any]
    nll_N: np.ndarray
    top1_tokens: list[torch.Tensor]  # per batch, (B, T) argmax ids
    flops_per_token: float


@torch.no_grad()
def score(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
          settings: dict[str, Any]) -> Scored:
    """The model's per-sequence mean NLL and argmax tokens under ``settings``, and its forward FLOPs per token."""
    model.set_inference(**settings)
    nll, top1 = [], []
    counter = FlopCounterMode(display=False)
    for i, (x_BT, y_BT) in enumerate(batches):
        if i == 0:  # the cost: the first batch's forward, counted as it runs (no second pass)
            with counter:
                logits_BTV = model(x_BT).logits.float()
        else:
            logits_BTV = model(x_BT).logits.float()
        mask_BT = y_BT != IGNORE_INDEX
        tok_nll_BT = torch.nn.functional.cross_entropy(
            logits_BTV.flatten(0, 1), y_BT.clamp(min=0).flatten(), reduction="none").view_as(y_BT)
        nll.append(((tok_nll_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)).cpu())
        top1.append(logits_BTV.argmax(-1).cpu())
    return Scored(dict(settings), torch.cat(nll).double().numpy(), top1,
                  counter.get_total_flops() / batches[0][0].numel())


def sequence_losses(scored: Scored, full: Scored, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    metric: str) -> np.ndarray:
    """(N,) losses in [0, 1] of one setting's sequences against the full-compute model's (module docstring)."""
    if metric == "loss":
        rel = (scored.nll_N - full.nll_N) / np.maximum(full.nll_N, 1e-12)
        return np.clip(rel, 0.0, 1.0)
    out = []
    for a_BT, b_BT, (_, y_BT) in zip(scored.top1_tokens, full.top1_tokens, batches, strict=True):
        mask_BT = (y_BT != IGNORE_INDEX).cpu()
        differ = ((a_BT != b_BT) & mask_BT).sum(1).double() / mask_BT.sum(1).clamp(min=1).double()
        out.append(differ)
    return torch.cat(out).numpy()


@dataclass
class DialResult:
    """What ``condformer dial`` found: the grid, and per tolerance the certified cheapest setting."""

    metric: str
    delta: float
    method: str
    n_calibration: int
    n_holdout: int
    grid: list[dict[str, Any]] = field(default_factory=list)
    tolerances: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "delta": self.delta, "method": self.method,
                "n_calibration": self.n_calibration, "n_holdout": self.n_holdout, "grid": self.grid,
                "tolerances": self.tolerances}


def tolerance_key(eps: float) -> str:
    """How a tolerance is named in ``dial.json`` (and matched by ``--tolerance``): its shortest float repr."""
    return repr(float(eps))


def run_dial(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], tolerances: list[float],
             delta: float, *, metric: str = "loss", knobs: list[str] | None = None, method: str = "fixed_sequence",
             holdout_fraction: float = 1 / 3, seed: int = 0,
             progress: Callable[[int, int], None] | None = None) -> DialResult:
    """Score the grid on ``batches`` and certify, for each tolerance, the cheapest setting (module docstring)."""
    from condformer.dial.ltt import select

    if metric not in METRICS:
        raise CondformerError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    if not tolerances:
        raise CondformerError("give at least one --tolerance")
    for eps in tolerances:
        if not 0 < eps < 1:
            raise CondformerError(f"a tolerance must be in (0, 1) (0.01 = 1%), got {eps}")
    if not 0 < holdout_fraction < 1:
        raise CondformerError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    grid = knob_grid(model, knobs)
    saved = model.inference_settings()
    was_training = model.training
    model.eval()
    try:
        scored = []
        for i, settings in enumerate(grid):
            scored.append(score(model, batches, settings))
            if progress is not None:
                progress(i + 1, len(grid))
    finally:
        model.set_inference(**{k: v for k, v in saved.items() if k in grid[0]})
        model.train(was_training)
    full = scored[0]
    losses_SN = np.stack([sequence_losses(s, full, batches, metric) for s in scored])
    n = losses_SN.shape[1]
    n_hold = int(round(n * holdout_fraction))
    if n_hold < 1 or n - n_hold < 2:
        raise CondformerError(f"{n} validation sequences are too few to calibrate and check; use more --batches")
    perm = np.random.default_rng(seed).permutation(n)
    calib, hold = perm[n_hold:], perm[:n_hold]
    cost = [s.flops_per_token for s in scored]
    result = DialResult(metric, delta, method, len(calib), len(hold))
    for s, row in zip(scored, losses_SN, strict=True):
        result.grid.append({"settings": s.settings, "flops_per_token": s.flops_per_token,
                            "flops_ratio": s.flops_per_token / full.flops_per_token,
                            "calibration_risk": float(row[calib].mean()), "holdout_risk": float(row[hold].mean()),
                            "mean_nll": float(s.nll_N.mean())})
    for eps in tolerances:
        sel = select(losses_SN[:, calib], cost, eps, delta, method=method, seed=seed)
        entry: dict[str, Any] = {"tolerance": eps, "settings": None, "certified": sel.certified}
        if sel.index is not None:
            g = result.grid[sel.index]
            entry.update(settings=g["settings"], flops_ratio=g["flops_ratio"], holdout_risk=g["holdout_risk"],
                         calibration_risk=g["calibration_risk"], p_value=sel.pvalues.get(sel.index))
        result.tolerances[tolerance_key(eps)] = entry
    return result


def pareto_plot(result: DialResult, path: Any) -> Any:
    """Risk (holdout) against FLOPs per token for every setting, the chosen ones marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [g["flops_ratio"] for g in result.grid]
    ys = [g["holdout_risk"] for g in result.grid]
    ax.scatter(xs, ys, s=14, color="0.5", label="grid (holdout)")
    for key, t in result.tolerances.items():
        if t["settings"] is not None:
            ax.scatter([t["flops_ratio"]], [t["holdout_risk"]], s=40, marker="*", label=f"eps {key}")
            ax.axhline(t["tolerance"], lw=0.6, ls=":", color="0.3")
    ax.set_xlabel("forward FLOPs per token / full compute")
    ax.set_ylabel(f"risk ({result.metric}) on the holdout split")
    ax.set_title(f"compute dial (delta {result.delta})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # atomic, as dial.json: a reader sees the old plot or the new
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def read_tolerance(run_dir: Any, eps: float) -> dict[str, Any]:
    """The settings ``condformer dial`` certified for tolerance ``eps`` in ``run_dir`` (one-line errors)."""
    import json

    path = Path(run_dir) / "dial.json"
    if not path.is_file():
        raise CondformerError(f"'{run_dir}' has no dial.json; run condformer dial {run_dir} --tolerance {eps} first")
    try:
        dial = json.loads(path.read_text(encoding="utf-8"))
        entries = dial["tolerances"]
    except (ValueError, KeyError, TypeError) as e:
        raise CondformerError(f"'{path}' is not a dial file ({e}); run condformer dial again") from None
    entry = entries.get(tolerance_key(eps))
    if entry is None:
        have = ", ".join(sorted(entries, key=float)) or "none"
        raise CondformerError(f"tolerance {eps} was not calibrated for this run (calibrated: {have}); run "
                              f"condformer dial {run_dir} --tolerance {eps}")
    if entry.get("settings") is None:
        raise CondformerError(f"no setting met tolerance {eps} with the run's guarantee (delta {dial.get('delta')}); "
                              f"run at full compute or choose a larger tolerance")
    return dict(entry["settings"])
