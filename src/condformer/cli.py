"""The ``condformer`` command line.

Every command prints human-readable output; with ``--json`` its last line is one JSON object. User
errors (bad flag, missing file, invalid config) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from condformer.cli_checks import (
    DEVICES,
    NONNEG,
    NONNEG_INT,
    POSITIVE,
    POSITIVE_INT,
    OneLineParser,
    check_device,
    check_generate_flags,
    check_out_dir,
    check_train_inputs,
    check_utf8,
    device_name,
    finite,
    os_error_message,
    out_of_memory_message,
    parse_thresholds,
    read_utf8_file,
    removed_if_unused,
)
from condformer.errors import CheckpointError, CondformerError, ConfigError


def _emit(args: argparse.Namespace, human: str, payload: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if human:
        print(human, flush=True)
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str), flush=True)


# -- presets / flops ---------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> None:
    from condformer.presets import preset, presets

    rows = []
    for name in presets():
        c = preset(name)
        rows.append({"name": name, "kind": c.kind, "n_layers": c.n_layers, "d_model": c.d_model,
                     "n_heads": c.n_heads, "layers": sorted({f"{s.block}/{s.router}/{s.ffn}" for s in c.layers})})
    human = "\n".join(f"{r['name']:<16} {r['kind']:<8} {r['n_layers']:>3} x {r['d_model']:<5} heads={r['n_heads']:<3}"
                      f" {','.join(r['layers'])}" for r in rows)
    _emit(args, human, {"presets": rows})


def _model_config(args: argparse.Namespace):
    from condformer.config_files import load_config_file
    from condformer.presets import preset

    if getattr(args, "config", None):
        return load_config_file(args.config)
    if not args.preset:
        raise ConfigError("give --preset NAME or --config FILE (see `condformer presets`)")
    return preset(args.preset), None


def cmd_flops(args: argparse.Namespace) -> None:
    from condformer.flops import count_flops

    if args.preset and Path(args.preset).is_dir():  # a run directory (e.g. one `condformer import` wrote)
        from condformer.checkpoint import read_checkpoint

        cfg = read_checkpoint(args.preset).model_cfg
    else:
        cfg, _ = _model_config(args)
    r = count_flops(cfg, args.seq_len)
    human = (f"{cfg.name}: T={r.seq_len}  forward {r.forward_flops:.4g} FLOPs/seq "
             f"({r.forward_flops_per_token:.4g}/token), train {r.train_flops:.4g} FLOPs/seq, "
             f"params {r.params:,} ({r.non_embedding_params:,} non-embedding)")
    _emit(args, human, {"preset": cfg.name, **r.to_dict()})


# -- train / eval / generate -------------------------------------------------------------------
def _train_config(args: argparse.Namespace, base, given=None):
    """``base`` (a config file's TrainConfig or, on --resume, the run's saved one), then what a config file
    ``given`` on --resume sets away from the defaults, then the flags typed: only what the user set can
    differ from a resumed run's settings (and be reported as ignored)."""
    from condformer.config import TrainConfig

    cfg = base or TrainConfig()
    if given is not None:
        defaults = TrainConfig().to_dict()
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in given.to_dict().items() if v != defaults[k]}})
    overrides = {"data": args.data, "tokenizer": args.tokenizer, "max_steps": args.max_steps,
                 "budget_flops": args.budget_flops, "budget_tokens": args.budget_tokens, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "seed": args.seed,
                 "eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every, "device": args.device,
                 "dtype": args.dtype, "warmup_steps": args.warmup_steps, "on_nonfinite": args.on_nonfinite,
                 "trainable": _trainable_entries(args.train_roles), "lr_new": args.lr_new,
                 "parallel": args.parallel, "expert_parallel": args.expert_parallel,
                 "activation_checkpointing": args.activation_checkpointing, "fsdp_offload": args.fsdp_offload,
                 "fsdp_reshard_after_forward": args.fsdp_reshard_after_forward,
                 "checkpoint_format": args.checkpoint_format, "dist_timeout_s": args.dist_timeout_s}
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.compile:
        cfg.compile = True
    if cfg.max_steps is None and cfg.budget_tokens is None and cfg.budget_flops is None:
        cfg.max_steps = 1000  # a new run with no budget given (a saved run always has its own)
    return cfg.validate()


def _trainable_entries(given: list[str] | None) -> list[str] | None:
    """``--train routers --train 'layers.2*'`` or ``--train routers,exits``: the roles and patterns, checked."""
    if not given:
        return None
    from condformer.trainable import check_entries

    entries = [e.strip() for g in given for e in g.split(",") if e.strip()]
    if not entries:
        raise ConfigError("--train needs a role (e.g. routers, exits, new, all) or a parameter-name pattern")
    check_entries(entries)
    return entries


def _saved_run(out: Path):
    """On --resume, the run's saved configs: its checkpoint's or, for a run stopped before its first
    checkpoint, its config.json's. Nothing to resume: train()'s own one-line error, before anything else."""
    from condformer.checkpoint import check_run_dir, read_checkpoint, resolve_checkpoint
    from condformer.config_files import load_config_file

    check_run_dir(out, resume=True)
    if resolve_checkpoint(out) is None:
        return load_config_file(out / "config.json")
    ck = read_checkpoint(out)
    return ck.model_cfg, ck.train_cfg


def cmd_train(args: argparse.Namespace) -> None:
    from condformer.train import train

    check_utf8(args.sample, "--sample")
    saved_model, saved_train = _saved_run(Path(args.out)) if args.resume else (None, None)
    if args.init_from is not None and not args.resume:
        model_cfg, given = _init_model_config(args), None
    else:
        model_cfg, given = ((saved_model, None) if args.resume and not (args.preset or args.config)
                            else _model_config(args))
    # on --resume the saved settings are the base: only what the user set can be reported as ignored
    train_cfg = _train_config(args, saved_train, given) if saved_train else _train_config(args, given)
    if args.init_from is not None and not args.resume:
        train_cfg.init_from = str(Path(args.init_from).resolve())
    check_train_inputs(model_cfg, train_cfg, args.sample, args.sample_tokens, args.out)
    with removed_if_unused(args.out):
        result = train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress)
    bpb, skipped, tps = result.val_bits_per_byte, result.skipped_steps, result.tokens_per_s
    speed = f"{tps:,.0f} tokens/s" if tps is not None else "no update applied" if skipped else \
        "no steps left to run"  # every step this call ran was skipped, or none ran (a finished run resumed)
    lines = [f"trained {model_cfg.name}: {result.steps} steps, {result.tokens:,} tokens, "
             f"{result.train_flops:.3g} FLOPs, {speed}"
             + (f", {skipped} step{'s' * (skipped != 1)} skipped (non-finite loss or gradient)" if skipped else ""),
             f"validation loss {result.val_loss:.4f}" + (f" ({bpb:.4f} bits/byte)" if bpb is not None else ""),
             f"checkpoint: {result.out_dir}"]
    payload = result.to_dict()
    if args.sample and model_cfg.causal and int(os.environ.get("RANK", "0")) == 0:
        text = _generate_text(args.out, args.sample, args.sample_tokens, greedy=False, temperature=0.8,
                              top_k=None, top_p=0.95, seed=0, stream=False)
        lines.append(f"sample (prompt {args.sample!r}):\n{args.sample}{text}")
        payload["sample"] = text
    _emit(args, "\n".join(lines), payload)


def _init_model_config(args: argparse.Namespace):
    """``train --init-from RUN``: the source run's model (its weights and tokenizer come with it in train())."""
    from condformer.checkpoint import read_checkpoint

    if args.preset or args.config:
        raise ConfigError("--init-from takes the model from the run it names; drop --preset/--config")
    if args.tokenizer:
        raise ConfigError("--init-from trains with the source run's own tokenizer; drop --tokenizer")
    return read_checkpoint(args.init_from).model_cfg


def _add_knob_flags(s: argparse.ArgumentParser) -> None:
    """The compute dial's inference knobs (the model's settings surface), shared by generate, eval, bench, inspect."""
    s.add_argument("--moe-top-k", type=int, metavar="K",
                   help="MoE: experts per token at inference, gates rescaled to the trained choice's total weight "
                        "(default: the trained k)")
    s.add_argument("--tolerance", type=float, metavar="EPS",
                   help="use the setting `condformer dial` certified for this quality tolerance (e.g. 0.01)")
    s.add_argument("--mod-threshold", type=float, metavar="X",
                   help="MoD: the causal decision logit a token must exceed to take a routed block (default 0, the "
                        "trained decision; higher: fewer tokens, less compute; a negative one as --mod-threshold=-0.5)")


def _knobs(args: argparse.Namespace, path: str | None = None) -> dict[str, Any]:
    """The knob flags given on the command line, as model inference settings; with ``--tolerance EPS`` the
    setting ``condformer dial`` certified for EPS in the run at ``path``."""
    given = {"moe_top_k": getattr(args, "moe_top_k", None), "mod_threshold": getattr(args, "mod_threshold", None)}
    knobs = {k: v for k, v in given.items() if v is not None}
    eps = getattr(args, "tolerance", None)
    if eps is None:
        return knobs
    if knobs:
        raise ConfigError("--tolerance uses the setting condformer dial certified; drop --moe-top-k/--mod-threshold "
                          "or --tolerance")
    from condformer.checkpoint import read_checkpoint
    from condformer.dial.search import read_tolerance

    if path is None or not Path(path).exists():
        raise ConfigError("--tolerance needs a run directory (the one condformer dial calibrated)")
    return read_tolerance(_run_dir(read_checkpoint(path).path), eps)


def _run_dir(ck_path: Path) -> Path:
    """The run directory of a checkpoint directory (or the directory itself for a flat one)."""
    return ck_path.parent.parent if ck_path.parent.name == "checkpoints" else ck_path


def _load_for_inference(path: str, eval_routing: str | None = None, exit_threshold: str | None = None,
                        knobs: dict[str, Any] | None = None):
    """A checkpoint's model, tokenizer and configs, with the routing, exit thresholds and knobs asked for."""
    from condformer.checkpoint import load_for_inference

    ck, model, tok = load_for_inference(path)
    if eval_routing:
        model.set_inference(routing=eval_routing, missing="ignore")
    if knobs:
        model.set_inference(**knobs)  # a knob this model lacks: one line naming the ones it has
    if exit_threshold is not None:
        if "exit_thresholds" not in model.inference_settings():
            raise CondformerError("this model has no early exits; train an exit preset (e.g. tiny-exit) to use "
                                  "--exit-threshold")
        model.set_inference(exit_thresholds=parse_thresholds(exit_threshold))
    return ck, model, tok


def cmd_eval(args: argparse.Namespace) -> None:
    from condformer.data import prepare_data
    from condformer.train import evaluate

    ck, model, tok = _load_for_inference(args.checkpoint, eval_routing=args.eval_routing,
                                         knobs=_knobs(args, args.checkpoint))
    cfg = ck.train_cfg
    if cfg is None:
        raise CondformerError(f"checkpoint '{ck.path}' has no training config; evaluate a run written by train")
    if args.data:
        cfg.data = args.data
    if args.batches is not None:
        cfg.eval_batches = args.batches
    data = prepare_data(cfg.data, tok or cfg.tokenizer, cfg.val_fraction)
    device = str(next(model.parameters()).device)
    m = evaluate(model, data, ck.model_cfg, cfg, device)
    bpb = m["val_bits_per_byte"]
    human = f"{ck.path}: step {ck.state['step']}, validation loss {m['val_loss']:.4f}" + (
        f" ({bpb:.4f} bits/byte)" if bpb is not None else "")
    _emit(args, human, {"checkpoint": str(ck.path), "step": ck.state["step"], **m, "data": data.fingerprint})


def _generate_text(path: str, prompt: str, max_new: int, greedy: bool, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int, stream: bool, exit_threshold: str | None = None,
                   speculative: int | None = None, draft_tokens: int = 4, stats: dict | None = None,
                   knobs: dict[str, Any] | None = None, draft_confidence: float | None = None) -> str:
    import torch

    from condformer.generation import SamplingConfig, generate

    ck, model, tok = _load_for_inference(path, exit_threshold=exit_threshold, knobs=knobs)
    if tok is None:
        raise CondformerError(f"checkpoint '{ck.path}' has no tokenizer; it cannot decode text")
    ids = tok.encode(prompt)
    if not ids:
        raise CondformerError("the prompt is empty; pass --prompt TEXT with at least one character")
    sampling = SamplingConfig(max_new_tokens=max_new, greedy=greedy, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos_id=tok.eos_id)
    new_ids: list[int] = []
    printed = [0]

    def on_tokens(t: torch.Tensor) -> None:
        new_ids.append(int(t[0]))
        if stream:
            text = tok.decode(new_ids)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its last byte
                return
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    generate(model, [ids], sampling, pad_id=tok.pad_id, generator=gen, on_tokens=on_tokens, speculative=speculative,
             draft_tokens=draft_tokens, stats=stats, draft_confidence=draft_confidence)
    text = tok.decode([i for i in new_ids if i != tok.eos_id])
    if stream:
        sys.stdout.write(text[printed[0]:] + "\n")
        sys.stdout.flush()
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    check_generate_flags(args)
    _tuned_speculation(args, args.checkpoint)
    if not args.json:
        sys.stdout.write(args.prompt)
    stats: dict = {}
    text = _generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.greedy,
                          1.0 if args.temperature is None else args.temperature, args.top_k, args.top_p,
                          args.seed, stream=not args.json, exit_threshold=args.exit_threshold,
                          speculative=args.speculative, draft_tokens=args.draft_tokens, stats=stats,
                          knobs=_knobs(args, args.checkpoint), draft_confidence=args.draft_confidence)
    stats.pop("exit_depths", None)
    if stats and not args.json:
        if stats.get("exit_mean_depth") is not None:
            print(f"[early exit: mean depth {stats['exit_mean_depth']:.2f} layers; tokens per depth "
                  f"{stats['exit_histogram']}]", file=sys.stderr)
        if stats.get("acceptance_rate") is not None:
            print(f"[self-speculative: {stats['accepted']}/{stats['drafted']} drafts accepted "
                  f"({stats['acceptance_rate']:.0%}), {stats['tokens_per_round']:.2f} tokens per full pass]",
                  file=sys.stderr)
    _emit(args, "", {"prompt": args.prompt, "text": text, **stats})


# -- calibrate ---------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> None:
    from condformer.calibrate import calibrate, decode_cost, exact_quality, validation_batches
    from condformer.checkpoint import update_model_config
    from condformer.data import prepare_data

    ck, model, tok = _load_for_inference(args.checkpoint)
    cfg = ck.train_cfg
    if cfg is None:
        raise CondformerError(f"checkpoint '{ck.path}' has no training config; calibrate a run written by train")
    if args.batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {args.batches}")
    data = prepare_data(args.data or cfg.data, tok or cfg.tokenizer, cfg.val_fraction)
    device = str(next(model.parameters()).device)
    batches = validation_batches(data, ck.model_cfg, cfg, 2 * args.batches, device)
    fit, held_out = batches[: args.batches], batches[args.batches:]
    result = calibrate(model, fit, args.tolerance, args.metric, check_cost=args.check_cost)
    check = exact_quality(model, held_out, result.thresholds)
    check["cost"] = decode_cost(check["histogram"], model.exits.exit_layers, result.thresholds, result.check_cost)
    lines = [f"{ck.path}: full depth loss {result.full_loss:.4f} on {result.tokens:,} validation tokens",
             f"thresholds ({model.exits.spec.confidence}): "
             + ("none meet the tolerance; full depth kept" if result.thresholds is None
                else ", ".join("off" if t is None else f"{t:.4f}" for t in result.thresholds)),
             f"calibration batches: loss {result.loss:.4f} ({result.loss / result.full_loss - 1:+.2%}), "
             f"agreement {result.agreement:.1%}, mean depth {result.mean_depth:.2f} of {result.n_layers} layers, "
             f"decode cost {result.cost:.2f} layers/token (an exit check = {result.check_cost:.3f} layers)",
             f"held-out batches:    loss {check['loss']:.4f} ({check['loss'] / check['full_loss'] - 1:+.2%}), "
             f"agreement {check['agreement']:.1%}, mean depth {check['mean_depth']:.2f}, "
             f"decode cost {check['cost']:.2f}"]
    if not args.dry_run and result.thresholds is not None:
        model_cfg = ck.model_cfg
        model_cfg.exits.thresholds = result.thresholds
        update_model_config(ck, model_cfg)
        lines.append(f"written into {ck.path} (generate uses them by default; --exit-threshold overrides)")
    _emit(args, "\n".join(lines), {"checkpoint": str(ck.path), **result.to_dict(), "held_out": check,
                                   "written": not args.dry_run and result.thresholds is not None})


# -- inspect -----------------------------------------------------------------------------------
INSPECT_TEXT = 'def mean(xs):\n    """Average."""\n    return sum(xs) / len(xs)\n'
"""What ``condformer inspect`` routes when no text is given: code short enough (62 bytes) that every token
gets a label and it fits even a test model's max_seq_len of 64."""


def cmd_inspect(args: argparse.Namespace) -> None:
    from condformer.inspection import inspect_routing, plot_routing, short_name

    if args.text_file is not None:
        text = read_utf8_file(args.text_file, "--text-file")
    else:
        check_utf8(args.text, "--text")
        text = INSPECT_TEXT if args.text is None else args.text
    ck, model, tok = _load_for_inference(args.checkpoint, args.eval_routing, args.exit_threshold,
                                         _knobs(args, args.checkpoint))
    if tok is None:
        raise CondformerError(f"checkpoint '{ck.path}' has no tokenizer; it cannot encode text")
    result = inspect_routing(model, tok, text)
    run_dir = ck.path.parent.parent if ck.path.parent.name == "checkpoints" else ck.path
    png = plot_routing(result, args.out or run_dir / "inspect.png")
    n = result["n_tokens"]
    lines = [f"note: {note}" for note in result["notes"]]
    lines += [f"layer {e['layer']}  {short_name(e['name'])}  routed {e['routed_frac']:.1%} of {n} tokens"
              for e in result["layers"]]
    for e in result["assignments"]:
        shares = " ".join(f"{x:.0%}" for x in e["shares"])
        none = f", none {e['none_frac']:.0%}" if e["none_frac"] else ""
        lines.append(f"layer {e['layer']}  {e['name']}  load per id: {shares}{none}")
    if result.get("exits") is not None:
        ex = result["exits"]
        lines.append(f"early exit: mean depth {ex['mean_depth']:.2f} of {result['n_layers']} layers; tokens per "
                     f"depth {ex['histogram']}")
    for e in result["altup"]:
        p = "; ".join(" ".join(f"{v:+.3f}" for v in row) for row in e["p"])
        g = " ".join(f"{v:+.3f}" for v in e["g"])
        lines.append(f"layer {e['layer']}  altup  p = [{p}]  g = [{g}]")
    if not result["layers"] and not result["assignments"]:
        lines.append(f"no routed layers: all {result['n_layers']} layers compute all {n} tokens")
    lines.append(f"png: {png}")
    payload = {**result, "checkpoint": str(ck.path), "png": str(png)}
    if getattr(model, "exits", None) is not None and model.exits.halting is None and ck.train_cfg is not None:
        payload["exit_curve"] = _exit_curve(ck, model, tok, run_dir, args, lines)
    _emit(args, "\n".join(lines), payload)


def _exit_curve(ck, model, tok, run_dir, args: argparse.Namespace, lines: list[str]) -> dict:  # noqa: ANN001
    """Quality vs average depth over shared confidence thresholds, on a few validation batches."""
    from condformer.calibrate import depth_quality_curve, validation_batches
    from condformer.data import prepare_data
    from condformer.inspection import plot_exit_curve

    cfg = ck.train_cfg
    data = prepare_data(cfg.data, tok or cfg.tokenizer, cfg.val_fraction)
    batches = validation_batches(data, ck.model_cfg, cfg, args.curve_batches, str(next(model.parameters()).device))
    curve = depth_quality_curve(model, batches)
    png = plot_exit_curve(curve["points"], curve["full_loss"], Path(run_dir) / "exit_curve.png",
                          f"{ck.model_cfg.name}: loss vs average depth ({model.exits.spec.confidence} confidence)")
    lines.append(f"quality vs average depth ({len(curve['points'])} thresholds, {curve['tokens']:,} validation "
                 f"tokens; full depth loss {curve['full_loss']:.4f}):")
    shown = sorted(curve["points"], key=lambda p: p["mean_depth"])
    for p in shown[:: max(1, len(shown) // 8)]:
        lines.append(f"  depth {p['mean_depth']:.2f}  loss {p['loss']:.4f} ({p['loss'] / curve['full_loss'] - 1:+.2%})"
                     f"  threshold {p['threshold']:.4f}")
    lines.append(f"curve png: {png}")
    return {**curve, "png": str(png)}


# -- dial --------------------------------------------------------------------------------------
def cmd_dial(args: argparse.Namespace) -> None:
    from condformer.calibrate import validation_batches
    from condformer.data import prepare_data

    if not args.tolerance and not args.speculation:
        raise ConfigError("give --tolerance EPS... (certify knob settings), --speculation (tune self-speculative "
                          "decoding by speed), or both")
    ck, model, tok = _load_for_inference(args.checkpoint)
    cfg = ck.train_cfg
    if cfg is None:
        raise CondformerError(f"checkpoint '{ck.path}' has no training config; dial a run written by train")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta must be in (0, 1) (0.1 = the guarantee holds with probability 90%), "
                          f"got {args.delta}")
    # what the model cannot do is one line before any data is prepared
    if args.tolerance:
        from condformer.dial.search import knob_grid

        knob_grid(model, None if args.knobs is None else [k.strip() for k in args.knobs.split(",") if k.strip()])
    if args.speculation:
        from condformer.dial.speculation import draft_depths

        draft_depths(model)
    data = prepare_data(args.data or cfg.data, tok or cfg.tokenizer, cfg.val_fraction)
    batches = validation_batches(data, ck.model_cfg, cfg, args.batches, str(next(model.parameters()).device))
    run_dir = _run_dir(ck.path)
    saved = _read_dial(run_dir)
    payload: dict[str, Any] = {"checkpoint": str(ck.path)}
    lines: list[str] = []
    if args.tolerance:
        payload.update(_dial_knobs(args, model, batches, run_dir, lines))
    if args.speculation:
        payload["speculation"] = _dial_speculation(args, model, batches, lines)
    from condformer.checkpoint_io import write_json_atomic

    write_json_atomic(run_dir / "dial.json", {**saved, **payload})  # a second dial keeps the other part
    lines.append(f"written: {run_dir / 'dial.json'}")
    _emit(args, "\n".join(lines), payload)


def _read_dial(run_dir: Path) -> dict[str, Any]:
    """The run's dial.json so far ({} if none or unreadable: it is rewritten whole)."""
    try:
        saved = json.loads((run_dir / "dial.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _bar(args: argparse.Namespace, what: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=args.json or args.no_progress, desc=what, unit="setting", file=sys.stderr)


def _dial_knobs(args: argparse.Namespace, model: Any, batches: list, run_dir: Path, lines: list[str]) -> dict:
    from condformer.dial.search import pareto_plot, run_dial

    knobs = None if args.knobs is None else [k.strip() for k in args.knobs.split(",") if k.strip()]
    bar = _bar(args, "dial")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = run_dial(model, batches, args.tolerance, args.delta, metric=args.metric, knobs=knobs,
                          method=args.method, seed=args.seed, progress=progress)
    finally:
        bar.close()
    png = pareto_plot(result, run_dir / "dial.png")
    lines += [f"{len(result.grid)} settings, {result.n_calibration} calibration + {result.n_holdout} holdout "
              f"sequences, metric {result.metric}, delta {result.delta} ({result.method})",
              "| setting | FLOPs / full | calibration risk | holdout risk |", "| --- | --- | --- | --- |"]
    for g in result.grid:
        lines.append(f"| {_setting_text(g['settings'])} | {g['flops_ratio']:.3f} | {g['calibration_risk']:.4f} | "
                     f"{g['holdout_risk']:.4f} |")
    for key, t in result.tolerances.items():
        if t["settings"] is None:
            lines.append(f"tolerance {key}: nothing certified; run at full compute")
        else:
            lines.append(f"tolerance {key}: {_setting_text(t['settings'])}  FLOPs x{t['flops_ratio']:.3f}  holdout "
                         f"risk {t['holdout_risk']:.4f} (p = {t['p_value']:.3g})")
    if png is not None:
        lines.append(f"plot: {png}")
    return {**result.to_dict(), "png": None if png is None else str(png)}


def _dial_speculation(args: argparse.Namespace, model: Any, batches: list, lines: list[str]) -> dict:
    from condformer.dial.speculation import tune_speculation

    seq_len = batches[0][0].shape[1]
    prompt_len = max(1, seq_len - args.new_tokens)
    prompts = [row[:prompt_len].tolist() for x, _ in batches for row in x][:args.prompts]
    bar = _bar(args, "speculation")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        choice = tune_speculation(model, prompts, new_tokens=args.new_tokens, repeats=args.repeats,
                                  progress=progress)
    finally:
        bar.close()
    best = choice.best
    lines.append(f"self-speculation on {choice.n_prompts} prompts x {choice.new_tokens} tokens (greedy, batch 1): "
                 f"full depth {choice.full_s:.3f} s; fastest E={best['draft_layers']} K={best['draft_tokens']} "
                 f"confidence={best['draft_confidence']}: {best['speedup']:.2f}x (generate --speculative auto)")
    return choice.to_dict()


def _setting_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


# -- bench -------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> None:
    from condformer.bench import BenchConfig, format_bench, run_bench

    _tuned_speculation(args, args.preset)

    cfg = BenchConfig(preset=args.preset, vs=args.vs, mode=args.mode, seq_len=args.seq_len,
                      batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, device=args.device,
                      dtype=args.dtype, memory=not args.no_memory, eval_routing=args.eval_routing, data=args.data,
                      exit_threshold=None if args.exit_threshold is None else parse_thresholds(args.exit_threshold),
                      speculative=args.speculative, draft_tokens=args.draft_tokens,
                      draft_confidence=args.draft_confidence, compile=args.compile,
                      inference=_knobs(args, args.preset),
                      **({} if args.new_tokens is None else {"new_tokens": args.new_tokens}))
    result = run_bench(cfg, progress=not args.no_progress)
    _emit(args, format_bench(result), result)


# -- compare -----------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> None:
    from condformer.compare import StudyConfig, render_summary, run_study

    if args.device is not None:
        check_device(args.device)
    check_out_dir(args.out)
    budget = "quick" if args.quick else "gpu" if args.gpu else "cpu" if args.full else None
    if budget is None:
        import torch

        budget = "gpu" if torch.cuda.is_available() and args.budget_flops is None else "quick"
    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets else None
    modes = [m.strip() for m in args.bench_modes.split(",") if m.strip()] if args.bench_modes else None
    cfg = StudyConfig.from_budget(budget, presets=presets, size=args.size, budget_flops=args.budget_flops,
                                  data=args.data, tokenizer=args.tokenizer, seeds=args.seeds, seq_len=args.seq_len,
                                  batch_size=args.batch_size, bench_modes=modes, device=args.device, lr=args.lr)
    results = run_study(cfg, args.out, progress=not args.no_progress)
    _emit(args, render_summary(results, args.out), results)


# -- import / export ----------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> None:
    from condformer.hf.importer import import_model

    if not args.json and Path(args.source).is_file():  # a GGUF: transformers dequantises it (~30 s for 135M)
        print(f"dequantising {args.source} through transformers ...", file=sys.stderr, flush=True)
    r = import_model(args.source, args.out)
    lines = [f"imported {r.model_type} from {r.source} ({r.format}): {r.n_layers} layers x {r.d_model}, vocabulary "
             f"{r.vocab_size:,}, {r.params:,} parameters, in {r.seconds:.1f} s",
             *(f"note: {n}" for n in r.notes), f"run: {r.out} (eval, generate, bench, inspect, flops; "
                                                f"train --init-from to fine-tune)"]
    _emit(args, "\n".join(lines), r.to_dict())


def cmd_export(args: argparse.Namespace) -> None:
    from condformer.hf.exporter import export_model

    r = export_model(args.run, args.out, args.format)
    loader = "" if r["format"] == "native" else " after `import condformer.hf.wrapper`"
    _emit(args, f"exported {r['run']} as {r['architecture']} ({r['format']}) to {r['out']}: "
                f"transformers.AutoModelForCausalLM.from_pretrained loads it{loader}", r)


def cmd_consolidate(args: argparse.Namespace) -> None:
    from condformer.parallel.sharded_checkpoint import consolidate, is_sharded
    from condformer.run_layout import resolve_checkpoint

    ck = resolve_checkpoint(args.run)
    if ck is None or not is_sharded(ck):
        raise CheckpointError(f"'{args.run}' holds no sharded checkpoint (one written with --parallel fsdp); "
                              f"its checkpoint is a single file already")
    out = consolidate(ck, args.out)
    _emit(args, f"consolidated {ck} into {out}: one safetensors file with the unsharded weights",
          {"checkpoint": str(ck), "out": str(out)})


def _exit_weights(text: str) -> str | list[float]:
    if text in ("uniform", "increasing"):
        return text
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not uniform, increasing or comma-separated numbers") from None


CONVERT_OPTIONS = ("head", "layer_dropout", "curriculum", "curriculum_period", "curriculum_steps", "exit_weights",
                   "capacity", "anneal_steps", "causal_router", "routed", "experts", "top_k", "split",
                   "capacity_factor", "balance_coef")


def cmd_convert(args: argparse.Namespace) -> None:
    from condformer.convert import convert_run

    given = {k: getattr(args, k) for k in CONVERT_OPTIONS}
    r = convert_run(args.run, args.to, args.out, layers=args.layers, seed=args.seed, **given)
    layers = ",".join(map(str, r.layers))
    lines = [f"converted {r.source} to {r.technique} on layers {layers}: {r.params_before:,} -> {r.params_after:,} "
             f"parameters ({r.new_params:,} new), in {r.seconds:.1f} s",
             f"max |logit difference| from the source on a probe: {r.max_logit_diff_train:.2e} (training mode), "
             f"{r.max_logit_diff_eval:.2e} (evaluation)", *(f"note: {n}" for n in r.notes),
             f"run: {r.out} (train --init-from {r.out} [--train ROLE] [--lr-new LR] to fine-tune it)"]
    _emit(args, "\n".join(lines), r.to_dict())


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="condformer", description="Conditional-computation Transformers: train, measure, generate.")
    p.add_argument("--version", action="version", version=f"condformer {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    s = sub.add_parser("presets", help="list the named model configurations")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("flops", help="analytic FLOPs and parameters of a config")
    _add_model_args(s)
    s.add_argument("--seq-len", type=POSITIVE_INT, default=1024)
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_flops)

    s = sub.add_parser("train", help="train a model on a corpus (default: the Python stdlib's source)")
    _add_model_args(s)
    s.add_argument("--data", help="stdlib | PATH (file, directory or glob) | hf:NAME[:SPLIT:COLUMN] | "
                                  "synthetic:mixed-difficulty")
    s.add_argument("--tokenizer", help="byte (default) | bpe | bpe:VOCAB | run:RUN (the tokenizer of a run, e.g. "
                                       "an imported model's)")
    s.add_argument("--max-steps", type=int)  # TrainConfig.validate: > 0
    s.add_argument("--budget-flops", type=POSITIVE, help="stop at this many training FLOPs (analytic)")
    s.add_argument("--budget-tokens", type=POSITIVE_INT)
    s.add_argument("--seq-len", type=POSITIVE_INT)
    s.add_argument("--batch-size", type=POSITIVE_INT)
    s.add_argument("--grad-accum", type=POSITIVE_INT)
    s.add_argument("--lr", type=POSITIVE)
    s.add_argument("--warmup-steps", type=NONNEG_INT)
    s.add_argument("--seed", type=int)
    s.add_argument("--eval-every", type=POSITIVE_INT)
    s.add_argument("--checkpoint-every", type=POSITIVE_INT)
    s.add_argument("--on-nonfinite", choices=["stop", "skip"])
    s.add_argument("--device", type=device_name, help="auto (default), cpu, cuda, cuda:1, mps")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = s.add_argument_group("multi-process training (launch with torchrun)")
    g.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="ddp (default): replicate the model; fsdp: FSDP2, shard parameters, gradients and optimizer "
                        "state over the ranks")
    g.add_argument("--expert-parallel", type=POSITIVE_INT, metavar="N",
                   help="shard each MoE layer's experts over groups of N ranks (tokens move by all-to-all)")
    g.add_argument("--activation-checkpointing", choices=["none", "full", "selective"],
                   help="recompute each layer's activations in the backward pass (less memory, more compute)")
    g.add_argument("--fsdp-offload", action="store_true", default=None,
                   help="FSDP: keep parameters and optimizer state in CPU memory (GPU runs)")
    g.add_argument("--no-reshard-after-forward", dest="fsdp_reshard_after_forward", action="store_false",
                   default=None, help="FSDP: keep each layer's gathered parameters until its backward")
    g.add_argument("--checkpoint-format", choices=["auto", "full", "sharded"],
                   help="full: one safetensors file gathered on rank 0; sharded: each rank writes its shards "
                        "(torch.distributed.checkpoint); auto (default): sharded under fsdp or expert parallelism")
    g.add_argument("--dist-timeout", dest="dist_timeout_s", type=POSITIVE, metavar="SECONDS",
                   help="end the run with an error when a collective waits longer (a rank died); default 600")
    s.add_argument("--out", default="runs/latest", help="run directory (checkpoints, logs)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the run's saved config")
    s.add_argument("--init-from", metavar="RUN",
                   help="fine-tune: start from this run's model, weights and tokenizer (e.g. one `condformer "
                        "import` wrote); the optimizer and schedule start fresh")
    s.add_argument("--train", dest="train_roles", action="append", metavar="ROLE|PATTERN",
                   help="train only these parameters, the rest frozen (repeat or comma-separate): a role (all, new, "
                        "routers, exits, experts, attention, ffn, norms, embeddings, head) or a glob over parameter "
                        "names such as 'layers.1*.router.*'")
    s.add_argument("--lr-new", type=POSITIVE, metavar="LR",
                   help="peak rate of the parameters `condformer convert` added (default: --lr); same schedule")
    s.add_argument("--sample", metavar="PROMPT", help="after training, print a sample continuing PROMPT")
    s.add_argument("--sample-tokens", type=POSITIVE_INT, default=200)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss of a checkpoint")
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--data", help="evaluate on another corpus (default: the run's)")
    s.add_argument("--batches", type=POSITIVE_INT, help="number of validation batches")
    s.add_argument("--eval-routing", choices=["causal", "topk"],
                   help="routed layers: learned causal decisions (the default, as in sampling) or top-k at "
                        "capacity (not causal: an upper bound on what causal routing can reach)")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_knob_flags(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="continue a prompt with a trained decoder (KV-cached, streaming)")
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=POSITIVE_INT, default=200)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--temperature", type=POSITIVE, help="> 0 (--greedy for argmax)")
    s.add_argument("--top-k", type=POSITIVE_INT)
    s.add_argument("--top-p", type=finite(0, 1), help="in (0, 1]")
    s.add_argument("--seed", type=int, default=0)
    _add_exit_decoding_args(s, "")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_knob_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("calibrate", help="pick early-exit thresholds that keep quality within a tolerance")
    s.add_argument("checkpoint", help="run directory or checkpoint directory of a model with exits")
    s.add_argument("--tolerance", type=NONNEG, required=True,
                   help="allowed relative loss increase (0.01 = 1%%), or share of tokens allowed to disagree with "
                        "the full model (--metric agreement)")
    s.add_argument("--metric", choices=["loss", "agreement"], default="loss")
    s.add_argument("--batches", type=int, default=20,  # checked in cmd_calibrate
                   help="validation batches to calibrate on (as many others check the result)")
    s.add_argument("--data", help="calibrate on another corpus (default: the run's)")
    s.add_argument("--check-cost", type=NONNEG,
                   help="cost of an exit check that does not fire, in layers (default: head / layer FLOPs)")
    s.add_argument("--dry-run", action="store_true", help="report the thresholds without writing them")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("dial", help="certify the cheapest inference setting per quality tolerance (Learn-then-Test)")
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--tolerance", type=float, nargs="+", metavar="EPS",
                   help="quality tolerances (0.01 = 1%%): each gets the cheapest setting certified within it")
    s.add_argument("--delta", type=float, default=0.1,
                   help="the guarantee holds with probability at least 1 - delta over the calibration draw")
    s.add_argument("--metric", choices=["loss", "agreement"], default="loss",
                   help="loss: relative cross-entropy increase per sequence; agreement: share of next-token "
                        "argmaxes that differ from the full model's")
    s.add_argument("--knobs", help="comma-separated knobs to turn (default: every one the model has: moe_top_k, "
                                   "mod_threshold)")
    s.add_argument("--method", choices=["fixed_sequence", "bonferroni"], default="fixed_sequence",
                   help="multiple testing over the grid")
    s.add_argument("--batches", type=POSITIVE_INT, default=60, help="validation batches (sequences = batches x "
                                                                     "batch size; a third is held out)")
    s.add_argument("--data", help="calibrate on another corpus (default: the run's)")
    s.add_argument("--seed", type=int, default=0, help="the calibration/holdout split")
    s.add_argument("--speculation", action="store_true",
                   help="also time self-speculative decoding (every draft exit x draft length x adaptive "
                        "confidence) on validation prompts and keep the fastest for generate --speculative auto")
    s.add_argument("--prompts", type=POSITIVE_INT, default=8, help="--speculation: calibration prompts")
    s.add_argument("--new-tokens", type=POSITIVE_INT, default=48, help="--speculation: tokens decoded per prompt")
    s.add_argument("--repeats", type=POSITIVE_INT, default=3, help="--speculation: paired timings per setting")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_dial)

    s = sub.add_parser("bench", help="time a preset against a baseline in the same process")
    s.add_argument("--preset", required=True,
                   help="a preset name, a config file (.json/.yaml) or a run directory (trained weights)")
    s.add_argument("--vs", help="the baseline, given the same way (e.g. the dense twin)")
    s.add_argument("--mode", choices=["train", "forward", "generate"], default="train")
    s.add_argument("--seq-len", type=POSITIVE_INT, default=256)
    s.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    s.add_argument("--repeats", type=POSITIVE_INT, default=7)
    s.add_argument("--warmup", type=NONNEG_INT, default=2)
    s.add_argument("--device", type=device_name, default="auto", help=DEVICES)
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    s.add_argument("--eval-routing", choices=["topk", "causal"], default="topk",
                   help="forward mode: routed layers at static capacity (topk) or by learned causal decisions")
    s.add_argument("--data", help="time on windows of this corpus (stdlib, PATH) instead of random tokens")
    s.add_argument("--new-tokens", type=POSITIVE_INT, help="generate mode: tokens decoded per prompt (default 32)")
    _add_exit_decoding_args(s, "generate mode, --preset only (the baseline --vs decodes at full depth): ")
    s.add_argument("--compile", action="store_true",
                   help="train and forward modes: torch.compile both models (warm-up iterations pay the compile)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_knob_flags(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("import", help="a Hugging Face model (local directory or .gguf file) as a condformer run")
    s.add_argument("source", help="a model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file")
    s.add_argument("--out", required=True, help="the new run directory")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("export", help="a run as a directory transformers loads (native architecture or condformer's)")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--out", required=True, help="the new model directory")
    s.add_argument("--format", choices=["auto", "native", "condformer"], default="auto",
                   help="native: the matching transformers architecture (dense models); condformer: condformer's "
                        "own transformers type (any model); auto (default): native when possible")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("consolidate", help="a sharded checkpoint (--parallel fsdp) as one safetensors file")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--out", help="the file to write (default: model.safetensors in the checkpoint directory, which "
                                 "makes it a single-file checkpoint every command reads without a process group)")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_consolidate)

    s = sub.add_parser("convert", help="add exits, MoD routers or MoE experts to a run (e.g. an imported model), "
                                       "keeping its function where the technique allows")
    s.add_argument("run", help="run directory or checkpoint directory (e.g. one `condformer import` wrote)")
    s.add_argument("--to", required=True, choices=["exits", "mod", "moe"], help="the technique to add")
    s.add_argument("--out", required=True, help="the new run directory")
    s.add_argument("--layers", metavar="SPEC",
                   help="the layers to convert: all, odd, even, every:N or indices/ranges like 1,3,8-11 (default: "
                        "every layer for exits and moe, odd layers for mod)")
    g = s.add_argument_group("--to exits (LayerSkip)")
    g.add_argument("--head", choices=["shared", "separate"], help="exits share the LM head (default) or copy it")
    g.add_argument("--layer-dropout", type=finite(0, 1), metavar="P", help="LayerSkip's p_max in training (0.1)")
    g.add_argument("--curriculum", choices=["none", "rotating", "gradual"],
                   help="which exits a training step computes (default rotating)")
    g.add_argument("--curriculum-period", type=POSITIVE_INT, help="rotating: every Nth exit per step (default 4)")
    g.add_argument("--curriculum-steps", type=POSITIVE_INT, help="gradual: steps until every exit is on")
    g.add_argument("--exit-weights", type=_exit_weights, metavar="uniform|increasing|W1,W2,...",
                   help="exit loss weights, the last layer's included (default increasing: each exit's depth)")
    g = s.add_argument_group("--to mod (router tuning)")
    g.add_argument("--capacity", type=float, metavar="C", help="share of tokens a routed layer computes, in (0, 1] "
                                                              "(default 0.5)")
    g.add_argument("--anneal-steps", type=NONNEG_INT, help="steps over which capacity goes from 1 to C (default 100)")
    g.add_argument("--causal-router", choices=["threshold", "predictor", "aux"],
                   help="inference's decision (default threshold: the router against its running top-k boundary)")
    g.add_argument("--routed", choices=["block", "ffn"],
                   help="what a passed-over token skips: the whole block (default) or only its FFN (attention for "
                        "every token: what a pretrained model tolerates best)")
    g = s.add_argument_group("--to moe (sparse upcycling)")
    g.add_argument("--experts", type=POSITIVE_INT, help="experts per layer (default 8)")
    g.add_argument("--top-k", type=POSITIVE_INT, help="experts per token (default 2)")
    g.add_argument("--split", type=POSITIVE_INT, metavar="G", help="finer experts: each 1/G of the FFN (default 1)")
    g.add_argument("--capacity-factor", type=POSITIVE, help="slots per expert in training (default: dropless)")
    g.add_argument("--balance-coef", type=NONNEG, help="Switch balance-loss weight (default 0.01)")
    s.add_argument("--seed", type=int, default=0, help="seed of the new parameters' random part (an MoE router)")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("inspect", help="which tokens each routed layer computed, for one text (PNG heatmap)")
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--text", help="text to route (default: a short Python snippet)")
    g.add_argument("--text-file", metavar="FILE", help="read the text from this UTF-8 file")
    s.add_argument("--out", metavar="PNG", help="PNG path (default: inspect.png in the run directory)")
    s.add_argument("--eval-routing", choices=["causal", "topk"],
                   help="routed layers: causal decisions (default, as in sampling) or training-time top-k")
    s.add_argument("--exit-threshold", metavar="P", help="early exit: confidence threshold(s) for the text's depths")
    s.add_argument("--curve-batches", type=POSITIVE_INT, default=4,
                   help="exit models: validation batches for the quality vs average depth curve")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _add_knob_flags(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("compare", help="isoFLOP study: train presets to one FLOP budget, evaluate, time, report")
    s.add_argument("--presets", help="comma-separated techniques (dense,mod,moe,switch,mode,altup,raltup,sasp,...) "
                                     "or preset names; default: dense,mod,moe,altup,sasp,exit")
    b = s.add_mutually_exclusive_group()
    b.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores (the default on CPU)")
    b.add_argument("--full", action="store_true", help="the CPU study: ~20 min on 2 cores (default presets)")
    b.add_argument("--gpu", action="store_true", help="the GPU study (the default when CUDA is available)")
    s.add_argument("--budget-flops", type=POSITIVE, help="training FLOPs per run (overrides the budget preset)")
    s.add_argument("--size", help="model size of the techniques: tiny, small, medium, gpt2-small")
    s.add_argument("--data", help="stdlib (default) | synthetic:mixed-difficulty | PATH | hf:NAME")
    s.add_argument("--tokenizer", help="byte (default) | bpe[:VOCAB] | run:RUN (the tokenizer of a run, e.g. one "
                                       "`condformer import` wrote)")
    s.add_argument("--seeds", type=POSITIVE_INT, help="runs per preset (error bars when > 1)")
    s.add_argument("--seq-len", type=POSITIVE_INT)
    s.add_argument("--batch-size", type=POSITIVE_INT)
    s.add_argument("--lr", type=POSITIVE, help="one peak learning rate for every preset (default: each its own)")
    s.add_argument("--bench-modes", help="comma-separated: train, forward, generate (default: train,forward)")
    s.add_argument("--device", type=device_name, help="auto (default), cpu, cuda, cuda:N, mps")
    s.add_argument("--out", default="runs/compare", help="study directory (reused: finished runs are skipped)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    s.set_defaults(func=cmd_compare)
    return p


def _speculative_arg(value: str) -> int | str:
    if value == "auto":
        return value
    return POSITIVE_INT(value)


def _tuned_speculation(args: argparse.Namespace, path: str) -> None:
    """``--speculative auto``: the run's tuned draft depth, length and confidence, in place of the flags."""
    if args.speculative != "auto":
        return
    from condformer.checkpoint import read_checkpoint
    from condformer.dial.speculation import read_speculation

    if not Path(path).exists():
        raise ConfigError("--speculative auto needs a run directory (the one condformer dial --speculation tuned)")
    tuned = read_speculation(_run_dir(read_checkpoint(path).path))
    args.speculative, args.draft_tokens = tuned["draft_layers"], tuned["draft_tokens"]
    if args.draft_confidence is None:
        args.draft_confidence = tuned["draft_confidence"]


def _add_exit_decoding_args(s: argparse.ArgumentParser, where: str) -> None:
    s.add_argument("--exit-threshold", metavar="P",
                   help=f"{where}early exit: a token stops at the first exit whose confidence exceeds P (one number, "
                        f"or one per exit, comma-separated, 'off' for an exit not checked); default: the "
                        f"checkpoint's calibrated thresholds, if any")
    s.add_argument("--speculative", type=_speculative_arg, metavar="E|auto",
                   help=f"{where}self-speculative decoding: draft with the first E layers' exit, verify with all; "
                        f"'auto': the depth, draft length and confidence `condformer dial --speculation` found "
                        f"fastest for the run")
    s.add_argument("--draft-tokens", type=POSITIVE_INT, default=4,
                   help="tokens drafted per verification (--speculative)")
    s.add_argument("--draft-confidence", type=float, metavar="C",
                   help="adaptive drafting (--speculative): a round's draft stops after a token the draft exit "
                        "gives a top probability below C (the output is unchanged; at most --draft-tokens)")


def _add_model_args(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--preset", help="a preset name (see `condformer presets`)")
    g.add_argument("--config", help="a JSON/YAML file with 'model' (and optionally 'train')")


def _version() -> str:
    from condformer import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except CondformerError as e:
        return _fail(str(e), e.rank_specific)
    except KeyboardInterrupt:
        print("condformer: interrupted (a training run saved a checkpoint; continue it with --resume)",
              file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        line = out_of_memory_message(e)
        if line is None:
            raise
        return _fail(line)
    except OSError as e:  # a file-system failure while reading or writing (full disk, permissions, ...)
        return _fail(os_error_message(e))
    return 0


def _fail(message: str, rank_specific: bool = False) -> int:
    """Print the one-line error and exit 2; under torchrun on rank 0 only (every rank meets the same bad input),
    unless only this rank saw it."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or rank_specific:
        where = f"rank {rank}: " if rank and not message.startswith(f"rank {rank}") else ""
        print("condformer: error: " + where + " ".join(message.split("\n")), file=sys.stderr)
    return 2


def entry() -> None:
    """The ``condformer`` command: :func:`main`, then the exit.

    A process torchrun started with several ranks leaves without interpreter finalisation once its work is done (the
    trainer has written, synchronised and destroyed its process groups): twice in this project's CI a gloo rank
    aborted at that point ("terminate called without an active exception", the gloo-threads-at-finalisation race of
    pytorch/pytorch#179291), turning a finished run into a failed torchrun. Output streams are flushed first.
    """
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
