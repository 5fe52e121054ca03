"""The study's PNG plots, drawn from the results dict with matplotlib's object API (no global pyplot state).

matplotlib is optional (the ``plot`` extra): without it a study still writes its results and report, just
without figures, which is why everything here sits behind one import guard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """PNG plots next to the report; {title: file name}. Empty (with no error) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    plots: dict[str, str] = {}

    def save(fig: Any, file: str, title: str) -> None:
        FigureCanvasAgg(fig)
        tmp = out / f".{file}.tmp.png"
        fig.savefig(tmp, dpi=110)
        tmp.replace(out / file)
        plots[title] = file

    runs, names = results["runs"], results["presets"]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        for i, seed in enumerate(runs[name]["seeds"]):
            pts = seed["curve"]
            ax.plot([p["train_flops"] for p in pts], [p["val_loss"] for p in pts], marker="o", ms=3,
                    label=name if i == 0 else None, color=f"C{names.index(name)}", alpha=1.0 if i == 0 else 0.5)
    ax.set(xlabel="training FLOPs", ylabel="validation loss (nats/token)", title="validation loss vs training FLOPs")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_flops.png", "validation loss vs training FLOPs")

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        r = runs[name]
        ax.errorbar([r["forward_flops_per_token"]], [r["val_loss"]], yerr=[r["val_loss_std"] or 0], fmt="o",
                    color=f"C{i}", label=name, capsize=3)
    ax.set(xlabel="forward FLOPs per token", ylabel="final validation loss", title="final loss vs forward FLOPs")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_forward_flops.png", "final loss vs forward FLOPs per token")

    for mode in results["study"]["bench_modes"]:
        pts = [(n, b[mode]) for n, b in results["bench"].items() if mode in b and b[mode]["speedup"]]
        if not pts:
            continue
        fig = Figure(figsize=(5.5, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for n, b in pts:
            i = names.index(n)
            ax.scatter([b["ideal_speedup"]], [b["speedup"]], color=f"C{i}", label=n)
        lo = min(min(b["ideal_speedup"], b["speedup"]) for _, b in pts) * 0.9
        hi = max(max(b["ideal_speedup"], b["speedup"]) for _, b in pts) * 1.1
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="speedup = 1 / FLOP ratio")
        ax.set(xlabel="ideal speedup (1 / FLOP ratio)", ylabel="measured speedup vs dense",
               title=f"measured speedup vs FLOP ratio ({mode})")
        ax.legend(fontsize=8)
        save(fig, f"speedup_{mode}.png", f"measured speedup vs FLOP ratio ({mode})")

    exits = [(n, runs[n]["exits"]) for n in names if runs[n].get("exits")]
    if exits:
        fig = Figure(figsize=(5.5, 1.6 + 1.8 * len(exits)), layout="constrained")
        for k, (n, e) in enumerate(exits):
            ax = fig.add_subplot(len(exits), 1, k + 1)
            total = max(sum(e["histogram"]), 1)
            ax.bar(range(1, len(e["histogram"]) + 1), [c / total for c in e["histogram"]], color=f"C{names.index(n)}")
            ax.set(xlabel="exit depth (layers computed)", ylabel="share of tokens",
                   title=f"{n}: mean depth {e['mean_depth']:.2f}, loss {e['loss'] / e['full_loss'] - 1:+.2%}")
        save(fig, "exit_depth.png", "early-exit depth histogram")

    loads = [(n, e) for n, a in results["analysis"].items() for e in a["layers"] if "expert_load" in e]
    if loads:
        fig = Figure(figsize=(6.5, 1.2 + 1.4 * len(loads)), layout="constrained")
        for k, (n, e) in enumerate(loads):
            ax = fig.add_subplot(len(loads), 1, k + 1)
            ax.bar(range(len(e["expert_load"])), e["expert_load"], color=f"C{names.index(n)}")
            ax.set(ylabel="share", title=f"{n} layer {e['layer']} expert load")
        save(fig, "expert_load.png", "expert load")

    coefs = [(n, a["altup"]) for n, a in results["analysis"].items() if a["altup"]]
    if coefs:
        fig = Figure(figsize=(6.5, 3.2 * len(coefs)), layout="constrained")
        for k, (n, layers) in enumerate(coefs):
            ax = fig.add_subplot(len(coefs), 1, k + 1)
            K = len(layers[0]["g"])
            for a in range(K):
                ax.plot([e["layer"] for e in layers], [e["g"][a] for e in layers], marker="o", label=f"g{a}")
                for b in range(K):
                    ax.plot([e["layer"] for e in layers], [e["p"][a][b] for e in layers], ls="--", marker=".",
                            label=f"p{a}{b}")
            ax.set(xlabel="layer", ylabel="coefficient", title=f"{n}: AltUp coefficients")
            ax.legend(fontsize=7, ncol=3)
        save(fig, "altup_coefficients.png", "AltUp coefficients")

    from condformer.inspection import plot_routing

    for n, a in results["analysis"].items():
        if a.get("heatmap"):
            path = plot_routing(a["heatmap"], out / f"routing_{n}.png")
            plots[f"routing heatmap: {n}"] = path.name
    return plots
