"""Table of benchmarks/blocks_quality.sh: validation loss per step, each preset at its best learning rate.

Usage: python benchmarks/blocks_table.py runs/blocks-quality
The baseline is the preset with the shortest name, which the others extend (``tiny``, ``tiny-bert``, ``deep``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(run: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip())
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def main(out: Path) -> None:
    runs: dict[str, dict[float, dict[int, float]]] = {}
    for result in sorted(out.glob("*-lr*.json")):
        name, lr = result.stem.rsplit("-lr", 1)
        runs.setdefault(name, {})[float(lr)] = curve(out / result.stem)
    if not runs:
        raise SystemExit(f"no finished runs in {out}")
    best = {name: min(by_lr, key=lambda lr: by_lr[lr][max(by_lr[lr])]) for name, by_lr in runs.items()}
    base = min(runs, key=len)
    base_curve = runs[base][best[base]]
    steps = sorted(base_curve)
    print("| preset | final val loss per peak lr | best lr | " + " | ".join(f"step {s}" for s in steps)
          + f" | vs `{base}` at {steps[-1]} |")
    print("| --- " * (len(steps) + 4) + "|")
    for name, by_lr in runs.items():
        lr = best[name]
        c = by_lr[lr]
        sweep = ", ".join(f"{x:g}: {by_lr[x][max(by_lr[x])]:.3f}" for x in sorted(by_lr))
        gap = c[steps[-1]] / base_curve[steps[-1]] - 1
        print(f"| `{name}` | {sweep} | {lr:g} | " + " | ".join(f"{c.get(s, float('nan')):.3f}" for s in steps)
              + f" | {gap:+.1%} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/blocks-quality"))
