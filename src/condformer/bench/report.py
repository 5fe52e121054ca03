"""A :func:`~condformer.bench.run_bench` result as text: the table the CLI prints.

Rendering reads only the JSON-able result, so a saved result can be re-rendered, and the routing
statistics helpers are shared with anything else that summarises a result.
"""

from __future__ import annotations

import math
from typing import Any


def mean_routed_fraction(stats: dict[str, float]) -> float | None:
    """Mean over routed layers of their ``*routed_frac`` statistic; None for a model with none."""
    return mean_stat(stats, "routed_frac")


def mean_stat(stats: dict[str, float], suffix: str) -> float | None:
    """Mean over layers of the statistic ``layer{L}/...{suffix}``; None when no layer reports it."""
    values = [v for k, v in stats.items() if k.endswith(suffix)]
    return sum(values) / len(values) if values else None


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_bench(result: dict[str, Any]) -> str:
    """A small human-readable table of a :func:`run_bench` result, with the A/B comparison line."""
    names = list(result["models"])
    rows = [("model", "median ms/iter", "tokens/s", "peak MiB", "FLOPs/iter", "others cpu")]
    for tag, name in zip("AB", names, strict=False):  # "A: name", "B: name"
        m = result["models"][name]
        peak = m["peak_memory_bytes"]
        rows.append((
            f"{tag}: {name}",
            _fmt(m["median_s"] * 1e3, ".2f"),
            _fmt(m["tokens_per_s"], ",.0f"),
            "-" if peak is None else f"{peak / 2**20:.1f}",
            _si(m["flops_per_iter"]),
            _fmt(m["others_cpu_median"], ".2f"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"{result['mode']} | seq_len {result['seq_len']} | batch {result['batch_size']} | {result['device']} "
        f"{result['dtype']} | {result['repeats']} repeats | {result['machine']['cpu']}, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']}"
    ]
    for i, r in enumerate(rows):
        cells = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    n = result["disturbed"]
    if result["time_ratio"] is not None:
        lines.append(
            f"time ratio A/B = {result['time_ratio']:.2f} (speedup {result['speedup']:.2f}x), "
            f"FLOP ratio {_fmt(result['flop_ratio'], '.2f')}, efficiency {_fmt(result['efficiency'], '.2f')} of ideal; "
            f"{n} disturbed measurements"
        )
        if result.get("paired_speedup") is not None:
            lines.append(f"paired speedup (median of per-repeat ratios) {result['paired_speedup']:.2f}x")
        if result["memory_ratio"] is not None:
            lines.append(f"memory ratio A/B = {result['memory_ratio']:.2f}")
    else:
        lines.append(f"{n} disturbed measurements")
    for name in names:
        frac = mean_routed_fraction(result["models"][name].get("stats") or {})
        if frac is not None:
            lines.append(f"{name}: routed layers process {frac:.1%} of tokens on average")
        stats = result["models"][name].get("stats") or {}
        dropped, load = mean_stat(stats, "moe_dropped_frac"), mean_stat(stats, "moe_load_max")
        if dropped is not None:
            busiest = "" if load is None else f", busiest expert at {load:.2f}x the balanced load"
            lines.append(f"{name}: MoE layers drop {dropped:.1%} of expert assignments{busiest}")
        gen = result["models"][name].get("generation") or {}
        if gen.get("exit_mean_depth") is not None:
            lines.append(f"{name}: early exit at mean depth {gen['exit_mean_depth']:.2f} of "
                         f"{len(gen['exit_histogram'])} layers (tokens per depth {gen['exit_histogram']})")
        if gen.get("acceptance_rate") is not None:
            lines.append(f"{name}: self-speculative, {gen['acceptance_rate']:.1%} of drafts accepted, "
                         f"{gen['tokens_per_round']:.2f} tokens per full-depth pass")
    lines.extend(f"warning: {w}" for w in result.get("warnings", []))
    return "\n".join(lines)
