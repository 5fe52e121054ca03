"""``report.md`` and the CLI's summary, rendered from ``results.json`` alone.

Rendering takes nothing but the results dict, so every number in the report is one of results.json and a
saved study can be re-rendered without rerunning anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from condformer.compare.config import EXIT_TOLERANCE


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_report(results: dict[str, Any]) -> str:
    """``report.md`` from ``results`` alone, so every number in it is one of results.json."""
    study, runs, bench = results["study"], results["runs"], results["bench"]
    dense = results["dense"]
    lines = [
        "# isoFLOP study",
        "",
        f"Budget {study['budget_flops']:.4g} training FLOPs per run on `{study['data']}`, sequences of "
        f"{study['seq_len']} tokens, batch {study['batch_size']}, {study['seeds']} seed(s); speed measured "
        f"against `{dense}` in the same process ({results['machine'].get('cpu') or results['machine']}).",
        "",
        "| preset | params | train FLOPs/token | forward FLOPs/token | peak lr | steps | budget used | val loss | "
        + " | ".join(f"{m} speedup (ideal)" for m in study["bench_modes"]) + " |",
        "| --- " * (8 + len(study["bench_modes"])) + "|",
    ]
    for name in results["presets"]:
        r = runs[name]
        loss = _fmt(r["val_loss"], ".4f") + (f" ± {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")
        cells = [f"`{name}`", f"{r['params']:,}", f"{r['train_flops_per_token']:.4g}",
                 f"{r['forward_flops_per_token']:.4g}", _fmt(r.get("lr"), ".3g"), str(r["steps"]),
                 f"{r['budget_used']:.4f}", loss]
        for mode in study["bench_modes"]:
            b = bench.get(name, {}).get(mode)
            cells.append("1 (baseline)" if name == dense else
                         f"{_fmt(b['speedup'], '.3f')} ({_fmt(b['ideal_speedup'], '.3f')})" if b else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Speedup = dense time / model time per iteration (median); ideal = 1 / FLOP ratio. Each preset "
              "trains at its own peak learning rate (`condformer.learning_rates`, from measured sweeps) unless "
              "the study sets one.", ""]
    exits = [(n, runs[n]["exits"]) for n in results["presets"] if runs[n].get("exits")]
    if exits:
        lines += ["## Early exit", "",
                  f"Confidence thresholds calibrated after training on the validation batches (seed 0) so that the "
                  f"loss rises by at most {EXIT_TOLERANCE:.0%} over the same model at full depth (exited states "
                  f"copied upward, measured exactly).", "",
                  "| preset | thresholds | loss at full depth | loss with exits | agreement | mean depth | "
                  "tokens per depth |", "| --- " * 7 + "|"]
        for name, e in exits:
            thr = "none (full depth)" if e["thresholds"] is None else ", ".join(
                "off" if t is None else f"{t:.3f}" for t in e["thresholds"])
            lines.append(f"| `{name}` | {thr} | {e['full_loss']:.4f} | {e['loss']:.4f} "
                         f"({e['loss'] / e['full_loss'] - 1:+.2%}) | {e['agreement']:.1%} | "
                         f"{e['mean_depth']:.2f} of {e['n_layers']} | {e['histogram']} |")
        lines.append("")
    per_class = [(n, e) for n, a in results["analysis"].items() for e in a["layers"] if "per_class" in e]
    if per_class:
        classes = list(per_class[0][1]["per_class"])
        lines += ["## Where each model spends compute, per token class", "",
                  "Share of the tokens of each class that a routed layer computed, on validation windows "
                  "(`*_routed`: the token went through the block or FFN; `*_expert`: the share of its k "
                  "choices that reached a real expert, not a no-op or a drop).", "",
                  "| preset | layer | " + " | ".join(classes) + " |", "| --- " * (2 + len(classes)) + "|"]
        for name, e in per_class:
            cells = [_fmt(e["per_class"][c], ".3f") for c in classes]
            lines.append(f"| `{name}` | {e['layer']} {e['trace']} | " + " | ".join(cells) + " |")
        lines.append("")
    experts = [(n, e) for n, a in results["analysis"].items() for e in a["layers"] if "experts_per_class" in e]
    for name, e in experts:
        n_exp = len(e["expert_load"])
        lines += [f"### `{name}` layer {e['layer']}: which experts each token class uses", "",
                  "Share of the class's expert choices per expert (no-ops and drops excluded).", "",
                  "| class | " + " | ".join(f"e{i}" for i in range(n_exp)) + " |", "| --- " * (1 + n_exp) + "|"]
        for c, shares in e["experts_per_class"].items():
            if shares is not None:
                lines.append(f"| {c} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
        lines.append("")
    routed = [(n, e) for n, a in results["analysis"].items() for e in a["layers"]]
    if routed:
        lines += ["## Routing on validation windows", "", "| preset | layer | computed share | expert load |",
                  "| --- | --- | --- | --- |"]
        for name, e in routed:
            load = " ".join(f"{v:.2f}" for v in e.get("expert_load", [])) or "-"
            lines.append(f"| `{name}` | {e['layer']} {e['trace']} | {e['computed_frac']:.3f} | {load} |")
        lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""]
        for title, path in results["plots"].items():
            lines += [f"![{title}]({path})", ""]
    return "\n".join(lines) + "\n"


def render_summary(results: dict[str, Any], out: str | Path) -> str:
    """The few lines ``condformer compare`` prints: loss and speedups per preset, and where the report is."""
    dense, lines = results["dense"], []
    for name in results["presets"]:
        r = results["runs"][name]
        parts = [f"{name:<16} val loss {r['val_loss']:.4f}"]
        if r["val_loss_std"] is not None:
            parts.append(f"± {r['val_loss_std']:.4f}")
        parts.append(f"({r['steps']} steps)")
        for mode, b in results["bench"].get(name, {}).items():
            parts.append(f"{mode} speedup {_fmt(b['speedup'], '.2f')} (ideal {_fmt(b['ideal_speedup'], '.2f')})")
        if r.get("exits"):
            e = r["exits"]
            parts.append(f"early exit: mean depth {e['mean_depth']:.2f}/{e['n_layers']} at "
                         f"{e['loss'] / e['full_loss'] - 1:+.2%} loss")
        if name == dense:
            parts.append("baseline")
        lines.append("  ".join(parts))
    lines.append(f"report: {Path(out) / 'report.md'}")
    return "\n".join(lines)
