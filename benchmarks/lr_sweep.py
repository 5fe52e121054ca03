"""Peak learning-rate sweep at a study budget: the measurements behind ``condformer.learning_rates``.

Each (preset, rate) is trained with exactly the settings ``condformer compare`` uses for that budget (same
data, steps by the FLOP budget, warmup, evaluation windows), so the best rate per preset is the one the
study should train it at. Finished runs are kept and reused (``OUT/<preset>/lr<rate>/result.json``), so an
interrupted sweep resumes; one process at a time (``OMP_NUM_THREADS`` decides its threads).

    python benchmarks/lr_sweep.py --budget quick --presets tiny,tiny-mod --lrs 2e-3,4e-3,8e-3 --out runs/lr-sweep

Prints, and writes to ``OUT/sweep.json``, the final validation loss of every run and each preset's best rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from condformer.checkpoint import write_json_atomic
from condformer.compare import StudyConfig, _train_config
from condformer.presets import preset
from condformer.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="quick", help="a row of condformer.compare.BUDGETS")
    p.add_argument("--presets", required=True, help="comma-separated preset names")
    p.add_argument("--lrs", required=True, help="comma-separated peak learning rates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lr-sweep")
    args = p.parse_args()
    study = StudyConfig.from_budget(args.budget)
    out = Path(args.out)
    table: dict[str, dict[str, float]] = {}
    for name in args.presets.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            d = out / name / f"lr{lr:g}"
            done = d / "result.json"
            if done.is_file():
                val = json.loads(done.read_text())["val_loss"]
            else:
                tcfg = dataclasses.replace(_train_config(study, args.seed, lr), checkpoint_every=10**9)
                result = train(preset(name), tcfg, d, progress=False)
                val = result.val_loss
                write_json_atomic(done, {"preset": name, "lr": lr, "budget": args.budget, "seed": args.seed,
                                         "steps": result.steps, "val_loss": val, "elapsed_s": result.elapsed_s})
            table.setdefault(name, {})[f"{lr:g}"] = val
            print(f"{name:16s} lr {lr:<8g} val {val:.4f}", flush=True)
    best = {name: min(row, key=row.get) for name, row in table.items()}
    write_json_atomic(out / "sweep.json", {"budget": args.budget, "seed": args.seed, "val_loss": table, "best": best})
    for name, lr in best.items():
        print(f"best {name:16s} lr {lr} val {table[name][lr]:.4f}")


if __name__ == "__main__":
    main()
