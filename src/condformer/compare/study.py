"""The study loop: train every preset to the budget, benchmark it against dense, analyse it, write the outputs.

This is the part with side effects (training, timing, files); the pieces it composes live in their own
modules (:mod:`~condformer.compare.config`, :mod:`~condformer.compare.analysis`,
:mod:`~condformer.compare.report`, :mod:`~condformer.compare.plots`). Why a study is resumable and how it
refuses other settings is in the :mod:`condformer.compare` package docstring.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from condformer.compare.analysis import _analyse
from condformer.compare.config import EXIT_TOLERANCE, StudyConfig, run_dir
from condformer.compare.plots import make_plots
from condformer.compare.report import render_report
from condformer.errors import CondformerError


def run_study(cfg: StudyConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study into ``out_dir``; return the results (also in ``out_dir/results.json``)."""
    from tqdm.auto import tqdm

    from condformer.checkpoint import write_json_atomic
    from condformer.presets import preset
    from condformer.train import plan_steps

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = cfg.resolved()
    train_cfgs = {(name, s): _train_config(cfg, s, cfg.lr_of(name)) for _, name in entries for s in range(cfg.seeds)}
    steps = {k: plan_steps(preset(k[0]), t, 1)[0] for k, t in train_cfgs.items()}
    n_bench = (len(entries) - 1) * len(cfg.bench_modes)
    total = sum(steps.values()) + n_bench + len(entries)  # training steps, benchmarks, analyses
    runs: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc="study", unit="step", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for label, name in entries:
            seeds = []
            for s in range(cfg.seeds):
                bar.set_description(f"train {name} seed {s}")
                seeds.append(_run(cfg, name, s, train_cfgs[(name, s)], out, bar.update))
            runs[name] = _summarise_runs(label, name, seeds, cfg)
        bench: dict[str, dict[str, Any]] = {}
        dense_name = entries[0][1]
        for _, name in entries[1:]:
            for mode in cfg.bench_modes:
                bar.set_description(f"bench {name} {mode}")
                bench.setdefault(name, {})[mode] = _bench(cfg, name, dense_name, mode, out)
                bar.update(1)
        analysis: dict[str, dict[str, Any]] = {}
        for _, name in entries:
            bar.set_description(f"analyse {name}")
            analysis[name] = _analyse(cfg, name, out)
            bar.update(1)
    results = {
        "study": dataclasses.asdict(cfg),
        "dense": dense_name,
        "presets": [name for _, name in entries],
        "runs": runs,
        "bench": bench,
        "analysis": analysis,
        "machine": _machine(),
        "plots": {},
    }
    results["plots"] = make_plots(results, out)
    write_json_atomic(out / "results.json", results)
    tmp = out / ".report.md.tmp"
    tmp.write_text(render_report(results), encoding="utf-8")
    tmp.replace(out / "report.md")  # atomic: an interrupted study never leaves half a report
    return results


def _train_config(cfg: StudyConfig, seed: int, lr: float) -> Any:
    from condformer.config import TrainConfig

    return TrainConfig(data=cfg.data, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=lr,
                       warmup_steps=cfg.warmup_steps, budget_flops=cfg.budget_flops, eval_every=cfg.eval_every,
                       eval_batches=cfg.eval_batches, seed=seed, device=cfg.device, tensorboard=False,
                       checkpoint_every=cfg.eval_every, keep_checkpoints=1).validate()  # a killed run loses little


def _run(cfg: StudyConfig, name: str, seed: int, tcfg: Any, out: Path, advance: Callable[[int], Any]) -> dict:
    """Train one run, or reuse it when ``result.json`` says it finished with the same settings.

    ``advance(n)`` reports n finished training steps (the study's progress bar).
    """
    from condformer.checkpoint import read_checkpoint, resolve_checkpoint, write_json_atomic
    from condformer.flops import count_flops
    from condformer.presets import preset
    from condformer.train import train

    d = run_dir(out, name, seed)
    key = cfg.run_key(name, seed)
    done = d / "result.json"
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.get("key") != key:
            raise CondformerError(f"'{d}' holds a run with other settings ({_diff(saved.get('key'), key)}); "
                                  f"pass another --out or delete that run")
        advance(saved["steps"])
        return saved
    resume = resolve_checkpoint(d) is not None
    result = train(preset(name), tcfg, d, resume=resume, progress=False, on_step=lambda: advance(1))
    mcfg = read_checkpoint(d).model_cfg  # as trained: the tokenizer decides the vocabulary
    flops_per_step = result.train_flops / result.steps
    report = count_flops(mcfg, cfg.seq_len, training=False)
    saved = {
        "key": key, "preset": name, "seed": seed, "steps": result.steps, "train_flops": result.train_flops,
        "flops_per_step": flops_per_step, "val_loss": result.val_loss, "val_bits_per_byte": result.val_bits_per_byte,
        "train_loss": result.train_loss, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
        "elapsed_s": result.elapsed_s, "params": result.params,
        "forward_flops_per_token": report.forward_flops_per_token,
        "train_flops_per_token": count_flops(mcfg, cfg.seq_len).train_flops_per_token,
        "curve": _curve(d / "log.jsonl", flops_per_step),
    }
    if mcfg.exits is not None and mcfg.exits.halting == "none":
        saved["exits"] = _calibrate_run(d, tcfg)
    write_json_atomic(done, saved)
    return saved


def _calibrate_run(d: Path, tcfg: Any) -> dict[str, Any]:
    """Confidence thresholds for a trained exit run (loss within :data:`EXIT_TOLERANCE`), written into its
    checkpoint so that its analysis and a generate bench decode with them."""
    from condformer.calibrate import calibrate, validation_batches
    from condformer.checkpoint import load_for_inference, update_model_config
    from condformer.data import prepare_data

    ck, model, tok = load_for_inference(d)
    data = prepare_data(tcfg.data, tok or tcfg.tokenizer, tcfg.val_fraction)
    batches = validation_batches(data, ck.model_cfg, tcfg, tcfg.eval_batches, str(next(model.parameters()).device))
    result = calibrate(model, batches, EXIT_TOLERANCE)
    if result.thresholds is not None:
        ck.model_cfg.exits.thresholds = result.thresholds
        update_model_config(ck, ck.model_cfg)
    return result.to_dict()


def _diff(a: dict | None, b: dict) -> str:
    if not isinstance(a, dict):
        return "no settings recorded"
    keys = [k for k in b if a.get(k) != b[k]]
    return ", ".join(f"{k}: {a.get(k)!r} vs {b[k]!r}" for k in keys) or "unknown"


def _curve(log: Path, flops_per_step: float) -> list[dict[str, float]]:
    """Validation loss against training FLOPs, from the run's log (one point per evaluation)."""
    points = []
    for line in log.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            points.append({"step": rec["step"], "train_flops": rec["step"] * flops_per_step,
                           "val_loss": rec["val_loss"]})
    return points


def _summarise_runs(label: str, name: str, seeds: list[dict], cfg: StudyConfig) -> dict[str, Any]:
    losses = [r["val_loss"] for r in seeds]
    first = seeds[0]
    return {
        "label": label, "preset": name, "seeds": seeds,
        "val_loss": statistics.fmean(losses),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else None,
        "val_bits_per_byte": _mean_or_none([r["val_bits_per_byte"] for r in seeds]),
        "steps": first["steps"], "train_flops": first["train_flops"], "params": first["params"],
        "lr": first["key"]["lr"],
        "forward_flops_per_token": first["forward_flops_per_token"],
        "train_flops_per_token": first["train_flops_per_token"],
        "budget_used": first["train_flops"] / cfg.budget_flops,
        "exits": first.get("exits"),
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.fmean(vs) if vs else None


def _bench(cfg: StudyConfig, name: str, dense: str, mode: str, out: Path) -> dict[str, Any]:
    """Time the trained ``name`` against the trained dense run (seed 0), cached in ``bench/``."""
    from condformer.bench import BenchConfig, run_bench
    from condformer.checkpoint import write_json_atomic

    path = out / "bench" / f"{name}-{mode}.json"
    key = {"a": name, "b": dense, "mode": mode, "seq_len": cfg.seq_len, "batch_size": cfg.bench_batch_size,
           "repeats": cfg.bench_repeats, "run": cfg.run_key(name, 0)}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved
    bcfg = BenchConfig(preset=str(run_dir(out, name, 0)), vs=str(run_dir(out, dense, 0)), mode=mode,
                       seq_len=cfg.seq_len, batch_size=cfg.bench_batch_size, repeats=cfg.bench_repeats,
                       memory=False, device=cfg.device, new_tokens=min(32, cfg.seq_len // 2))
    r = run_bench(bcfg, progress=False)
    a, b = (r["models"][k] for k in r["models"])
    saved = {"key": key, "mode": mode, "speedup": r["speedup"], "time_ratio": r["time_ratio"],
             "flop_ratio": r["flop_ratio"], "ideal_speedup": r["ideal_speedup"], "efficiency": r["efficiency"],
             "median_s": a["median_s"], "dense_median_s": b["median_s"], "tokens_per_s": a["tokens_per_s"],
             "dense_tokens_per_s": b["tokens_per_s"], "disturbed": r["disturbed"], "device": r["device"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, saved)
    return saved


def _machine() -> dict[str, Any]:
    from condformer.bench import machine_info

    return machine_info()
