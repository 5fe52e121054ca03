"""The isoFLOP study: at the same training compute, which model is better, and how much faster is each?

``run_study`` trains every preset of a study to the same training-FLOP budget (counted analytically, only
work actually done, so a routed model takes more steps than its dense twin), evaluates each, times each
against the dense preset in the same process (``condformer bench``: alternating measurements, medians),
looks inside each trained model (routed fractions, expert load, AltUp coefficients, and, on the
``synthetic:mixed-difficulty`` corpus, where each router spends compute per token class), and writes

* ``results.json``: every number (the interface; the report is rendered from it and nothing else);
* ``report.md``: the tables and the plots;
* PNG plots: validation loss vs training FLOPs, final loss vs forward FLOPs per token, measured speedup
  vs FLOP ratio, routing heatmaps, expert load, AltUp coefficients.

The study is resumable: each finished run leaves ``runs/<preset>/seed<s>/result.json`` and each finished
benchmark ``bench/<preset>-<mode>.json``; a second call with the same settings reuses them, and an
interrupted run resumes exactly from its last checkpoint. A directory that holds a study with other
settings is refused rather than overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condformer.errors import CondformerError, ConfigError

# technique name (as `--presets` takes it) -> preset suffix after the size; "dense" is the size itself
TECHNIQUES: dict[str, str] = {
    "dense": "", "mod": "-mod", "moe": "-moe", "switch": "-switch", "mode": "-mode", "mode-staged": "-mode-staged",
    "altup": "-altup", "raltup": "-raltup", "parallel": "-parallel", "sas": "-sas", "sasp": "-sasp",
    "exit": "-exit",
}
HEATMAP_TOKENS = 64  # tokens of validation text in each routing heatmap (labelled cells stay readable)
DEFAULT_PRESETS = ("dense", "mod", "moe", "altup", "sasp", "exit")
"""The default study: every technique that has landed."""
EXIT_TOLERANCE = 0.01
"""Early-exit runs are calibrated after training to this relative validation-loss increase (the issue's 1%)."""

BUDGETS: dict[str, dict[str, Any]] = {
    # finishes in under 10 minutes on 2 CPU cores with the default presets (the README's main job)
    "quick": dict(size="tiny", budget_flops=3.0e12, seq_len=128, batch_size=8, warmup_steps=30, eval_every=100,
                  eval_batches=8, bench_repeats=3, bench_batch_size=8),
    # about 20 minutes on 2 CPU cores for the default presets: the per-technique studies' budget (RESULTS.md)
    "cpu": dict(size="tiny", budget_flops=2.127e13, seq_len=256, batch_size=16, warmup_steps=100, eval_every=200,
                eval_batches=20, bench_repeats=5, bench_batch_size=16),
    # one GPU: a 6 x 256 model for ~100M tokens
    "gpu": dict(size="small", budget_flops=3.0e15, seq_len=512, batch_size=32, warmup_steps=200, eval_every=500,
                eval_batches=40, bench_repeats=7, bench_batch_size=32),
}


@dataclass
class StudyConfig:
    """What a study trains and measures. ``budget`` names a row of :data:`BUDGETS`; explicit fields win."""

    presets: list[str] = field(default_factory=lambda: list(DEFAULT_PRESETS))
    size: str = "tiny"
    budget_flops: float = 3.0e12
    data: str = "stdlib"
    seeds: int = 1
    seq_len: int = 128
    batch_size: int = 8
    lr: float | None = None  # None: each preset at its own recommended rate (condformer.learning_rates)
    warmup_steps: int = 30
    eval_every: int = 100
    eval_batches: int = 8
    bench_modes: list[str] = field(default_factory=lambda: ["train", "forward"])
    bench_repeats: int = 3
    bench_batch_size: int = 8
    device: str = "auto"
    analysis_windows: int = 16  # validation windows the routing analysis looks at

    @classmethod
    def from_budget(cls, budget: str, **overrides: Any) -> StudyConfig:
        if budget not in BUDGETS:
            raise ConfigError(f"unknown study budget '{budget}'; choose one of: {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[budget], **{k: v for k, v in overrides.items() if v is not None}})

    def validate(self) -> StudyConfig:
        from condformer.presets import SIZES

        if not self.presets:
            raise ConfigError("a study needs at least one preset; pass --presets dense,mod,...")
        if self.size not in SIZES:
            raise ConfigError(f"unknown size '{self.size}'; choose one of: {', '.join(SIZES)}")
        if not (isinstance(self.budget_flops, (int, float)) and self.budget_flops > 0):
            raise ConfigError(f"budget_flops must be > 0, got {self.budget_flops!r}")
        for name in ("seeds", "seq_len", "batch_size", "eval_every", "eval_batches", "bench_repeats",
                     "bench_batch_size", "analysis_windows"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not (self.lr > 0 and math.isfinite(self.lr))):
            raise ConfigError(f"lr must be a finite number > 0, or null for each preset's own rate; got {self.lr!r}")
        for mode in self.bench_modes:
            if mode not in ("train", "forward", "generate"):
                raise ConfigError(f"unknown bench mode '{mode}'; choose from train, forward, generate")
        self.resolved()
        return self

    def resolved(self) -> list[tuple[str, str]]:
        """(label, preset name) per study entry; ``dense`` first (every speedup is measured against it)."""
        from condformer.presets import presets

        known = set(presets())
        out: list[tuple[str, str]] = []
        for label in self.presets:
            if label in TECHNIQUES:
                name = self.size + TECHNIQUES[label]
            elif label in known:
                name = label
            else:
                raise ConfigError(f"unknown study preset '{label}'; use a technique ({', '.join(TECHNIQUES)}) "
                                  f"or a preset name (see `condformer presets`)")
            if name not in known:
                raise ConfigError(f"preset '{name}' does not exist; see `condformer presets`")
            if all(name != n for _, n in out):
                out.append((label, name))
        dense = [e for e in out if e[1] == self.size]
        if not dense:
            out.insert(0, ("dense", self.size))  # the baseline is always part of the study
        else:
            out.remove(dense[0])
            out.insert(0, dense[0])
        return out

    def lr_of(self, preset: str) -> float:
        """The peak rate ``preset`` trains at: the study's ``lr``, or the preset's own recommended rate."""
        from condformer.learning_rates import recommended_lr
        from condformer.presets import preset as make

        if self.lr is not None:
            return float(self.lr)
        return recommended_lr(make(preset), self.batch_size * self.seq_len)

    def run_key(self, preset: str, seed: int) -> dict[str, Any]:
        """Everything a finished run depends on: a run is reused only when its key matches."""
        return {"preset": preset, "seed": seed, "budget_flops": self.budget_flops, "data": self.data,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "lr": self.lr_of(preset),
                "warmup_steps": self.warmup_steps, "eval_every": self.eval_every, "eval_batches": self.eval_batches}


# -- the study ---------------------------------------------------------------------------------
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

    return TrainConfig(data=cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=lr,
                       warmup_steps=cfg.warmup_steps, budget_flops=cfg.budget_flops, eval_every=cfg.eval_every,
                       eval_batches=cfg.eval_batches, seed=seed, device=cfg.device, tensorboard=False,
                       checkpoint_every=cfg.eval_every, keep_checkpoints=1).validate()  # a killed run loses little


def run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / preset / f"seed{seed}"


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


# -- looking inside the trained models ------------------------------------------------------------
def _analyse(cfg: StudyConfig, name: str, out: Path) -> dict[str, Any]:
    """Routing of the trained model (seed 0) on validation windows: per layer, and per token class when the
    corpus records classes (``synthetic:mixed-difficulty``)."""
    import torch

    from condformer.checkpoint import load_for_inference
    from condformer.data import prepare_data
    from condformer.inspection import inspect_routing

    ck, model, _ = load_for_inference(run_dir(out, name, 0))
    tcfg = ck.train_cfg
    data = prepare_data(tcfg.data, tcfg.tokenizer, tcfg.val_fraction)  # cached by the run: no re-tokenising
    tok = data.tokenizer
    x, _ = data.get_batch("val", 0, cfg.analysis_windows, cfg.seq_len, seed=1234)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        o = model(x.to(device), trace=True)
    classes = _token_classes(cfg.data, tok, x)
    layers: list[dict[str, Any]] = []
    for key, v in sorted(o.traces.items()):
        prefix, _, trace = key.partition("/")
        if not prefix.startswith("layer") or not prefix[len("layer"):].isdigit():
            continue  # not a per-layer trace (e.g. early exit's per-token depth)
        layer = int(prefix[len("layer"):])
        if v.dtype == torch.bool and v.dim() == 2:
            computed = v.float().cpu()
        elif v.dtype == torch.long and v.dim() == 3:  # expert ids per choice; -1 = none (no-op / dropped)
            computed = (v >= 0).float().mean(-1).cpu()
        else:
            continue
        entry: dict[str, Any] = {"layer": layer, "trace": trace, "computed_frac": float(computed.mean())}
        if v.dtype == torch.long:
            ids_BTK = v.cpu()
            # how many experts exist: the layer's per-expert load statistics, so an idle expert still shows
            stem = f"{prefix}/{trace.rsplit('_', 1)[0]}_load_e"
            n = max([int(ids_BTK.max()) + 1, 1, *(int(k[len(stem):]) + 1 for k in o.stats
                                                  if k.startswith(stem) and k[len(stem):].isdigit())])
            counts = torch.bincount(ids_BTK[ids_BTK >= 0], minlength=n)
            entry["expert_load"] = (counts / max(int(counts.sum()), 1)).tolist()
            if classes is not None:
                entry["experts_per_class"] = _experts_per_class(ids_BTK, classes, n)
        if classes is not None:
            entry["per_class"] = _per_class(computed, classes)
        layers.append(entry)
    result: dict[str, Any] = {"layers": layers, "altup": model.stream.report(o.stats)}
    if any(e["trace"].endswith(("_routed", "_computed")) for e in layers):  # a heatmap of a short validation text
        result["heatmap"] = inspect_routing(model, tok, tok.decode(x[0, :HEATMAP_TOKENS].tolist()))
    if classes is not None:
        from condformer.data.synthetic import CLASSES

        counts = torch.bincount(classes[classes >= 0], minlength=len(CLASSES))
        result["class_tokens"] = {c: int(counts[i]) for i, c in enumerate(CLASSES)}
    return result


def _token_classes(data: str, tok: Any, x: Any) -> Any:
    """Per-token class ids (B, T) for a corpus that records them, else None.

    Each token is decoded alone: a one-character token takes that character's class; a special token
    (the end-of-document separator decodes to nothing) gets -1 and is left out of every per-class number.
    A tokenizer with multi-character tokens (BPE) has no per-character classes: None.
    """
    if not data.startswith("synthetic:"):
        return None
    import torch

    from condformer.data.synthetic import classify

    rows = []
    for row in x.tolist():
        pieces = [tok.decode([t]) for t in row]
        if any(len(p) > 1 for p in pieces):
            return None
        classes = iter(classify("".join(pieces)))
        rows.append([next(classes) if p else -1 for p in pieces])
    return torch.tensor(rows)


def _experts_per_class(ids_BTK: Any, classes: Any, n_experts: int) -> dict[str, list[float] | None]:
    """For each token class, the share of its choices that reached each real expert (None: no such token)."""
    import torch

    from condformer.data.synthetic import CLASSES

    out: dict[str, list[float] | None] = {}
    for i, c in enumerate(CLASSES):
        ids = ids_BTK[classes == i]  # (n_tokens_of_class, K)
        ids = ids[ids >= 0]
        out[c] = (torch.bincount(ids, minlength=n_experts) / ids.numel()).tolist() if ids.numel() else None
    return out


def _per_class(computed: Any, classes: Any) -> dict[str, float | None]:
    from condformer.data.synthetic import CLASSES

    out: dict[str, float | None] = {}
    for i, c in enumerate(CLASSES):
        mask = classes == i
        out[c] = float(computed[mask].mean()) if bool(mask.any()) else None
    return out


# -- report -------------------------------------------------------------------------------------
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
