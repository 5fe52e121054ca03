"""The timing protocol and :func:`run_bench`, which assembles the result (an interface; see its docstring).

Why the protocol is as it is (alternation, ``min_time_s``, medians, redone disturbed measurements) is in
the :mod:`condformer.bench` package docstring; this module only carries it out.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from condformer.bench.config import BenchConfig
from condformer.bench.cost import flops_per_iter
from condformer.bench.cpu import clock_tick_s, others_cpu_cores, read_cpu_ticks
from condformer.bench.memory import _memory_cuda, _memory_subprocess
from condformer.bench.models import _autocast, _Bench, _build, _make_inputs, _resolve_device, _resolve_models
from condformer.flops import count_flops


@dataclass
class Measurement:
    time_s: float  # per iteration
    others_cpu: float | None  # cores used by other processes, None if unknown
    disturbed: bool  # still disturbed after all retries
    retries: int


def _time_op(bench: _Bench, min_time_s: float) -> float:
    """Per-iteration seconds: run the op until ``min_time_s`` has passed (at least once).

    The device is synchronised before starting and after each iteration so queued GPU work is charged to
    the iteration that launched it. Garbage collection is paused while timing: a collection triggered
    by one model's garbage would otherwise be charged to whichever model happened to be running.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        bench.sync()
        n = 0
        t0 = time.perf_counter()
        while True:
            bench.step()
            bench.sync()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                return elapsed / n
    finally:
        if gc_was_enabled:
            gc.enable()


def _measure(bench: _Bench, cfg: BenchConfig, tick_s: float) -> Measurement:
    """One timed measurement, redone while other processes use more than the threshold of CPU.

    /proc/stat advances in whole ticks per CPU, so over a short window ``busy_s`` is uncertain by about
    one tick per CPU our threads ran on; a measurement only counts as disturbed when others' CPU exceeds
    the threshold by more than that resolution (``slack``), so that very short measurements are not
    flagged for quantisation noise.
    """
    slack_s = (torch.get_num_threads() + 1) * tick_s
    retries = 0
    while True:
        before = read_cpu_ticks()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        t = _time_op(bench, cfg.min_time_s)
        wall_s, own_s = time.perf_counter() - wall0, time.process_time() - cpu0
        after = read_cpu_ticks()
        others = others_cpu_cores(before, after, own_s, wall_s, tick_s)
        disturbed = others is not None and others - slack_s / max(wall_s, 1e-9) > cfg.contention_threshold
        if not disturbed or retries >= cfg.max_retries:
            return Measurement(t, others, disturbed, retries)
        retries += 1


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu or platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Time ``cfg.mode`` for model A (and baseline B) and return a JSON-able result.

    Keys (an interface other tools rely on): ``mode, seq_len, batch_size, device, dtype, repeats,
    models, time_ratio, speedup, paired_speedup, flop_ratio, ideal_speedup, efficiency, memory_ratio, disturbed,
    machine`` (plus ``new_tokens, warmup, min_time_s, contention_threshold, seed, warnings``). Each
    ``models[name]`` holds ``preset, median_s, times_s, tokens_per_s, peak_memory_bytes, forward_flops,
    train_flops, params, flops_per_iter, disturbed, retries, others_cpu_median`` (plus ``others_cpu``,
    ``memory_method``, ``config``). Times are per iteration; ``tokens_per_s`` counts the batch's
    ``seq_len`` tokens per iteration in forward/train mode and the generated tokens in generate mode.
    The ratios compare A to B and are None without a baseline.
    """
    from tqdm import tqdm

    cfg.validate()
    device = _resolve_device(cfg.device)
    specs = _resolve_models(cfg)
    vocab = min(m.vocab_size for _, _, m, _ in specs)
    tokens, targets = _make_inputs(cfg, vocab)
    benches = [_build(key, label, mcfg, cfg, device, tokens, targets, ck, baseline=i == 1)
               for i, (key, label, mcfg, ck) in enumerate(specs)]

    for b in benches:  # warm-up: allocator growth, kernel selection and lazy init stay out of the timings
        for _ in range(cfg.warmup):
            b.step()
        b.sync()

    tick_s = clock_tick_s()
    results: dict[str, list[Measurement]] = {b.name: [] for b in benches}
    with tqdm(total=cfg.repeats * len(benches), desc=f"bench {cfg.mode}", unit="meas", file=sys.stderr,
              disable=not progress) as bar:
        for r in range(cfg.repeats):
            order = benches if r % 2 == 0 else benches[::-1]  # A,B then B,A: drift cancels
            for b in order:
                m = _measure(b, cfg, tick_s)
                results[b.name].append(m)
                bar.set_postfix_str(f"{b.name} {m.time_s * 1e3:.1f} ms", refresh=False)
                bar.update()

    warnings: list[str] = []
    models: dict[str, dict[str, Any]] = {}
    for b in benches:
        ms = results[b.name]
        times = [m.time_s for m in ms]
        median = statistics.median(times)
        report = count_flops(b.cfg, cfg.seq_len)
        tokens_per_iter = cfg.batch_size * (cfg.new_tokens if cfg.mode == "generate" else cfg.seq_len)
        peak, method = None, None
        if cfg.memory:
            if device.type == "cuda":
                peak, method = _memory_cuda(b), "cuda_max_memory_allocated"
            elif device.type == "cpu":
                peak, method, warning = _memory_subprocess(b, cfg, vocab)
                if warning:
                    warnings.append(warning)
            else:
                warnings.append(f"no peak-memory measurement on device type '{device.type}'")
        models[b.name] = {
            "preset": b.label,
            "median_s": median,
            "times_s": times,
            "tokens_per_s": tokens_per_iter / median if median > 0 else None,
            "peak_memory_bytes": peak,
            "memory_method": method,
            "forward_flops": report.forward_flops,
            "train_flops": report.train_flops,
            "params": report.params,
            "flops_per_iter": flops_per_iter(b.cfg, cfg),
            "disturbed": sum(m.disturbed for m in ms),
            "retries": sum(m.retries for m in ms),
            "others_cpu_median": _median_or_none([m.others_cpu for m in ms]),
            "others_cpu": [m.others_cpu for m in ms],
            "config": b.cfg.to_dict(),
            "checkpoint": b.checkpoint,
            "stats": _routing_stats(b, cfg, tokens),
            "generation": _generation_stats(b, cfg),
        }

    result: dict[str, Any] = {
        "mode": cfg.mode, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "device": str(device),
        "dtype": cfg.dtype, "repeats": cfg.repeats, "warmup": cfg.warmup, "min_time_s": cfg.min_time_s,
        "new_tokens": cfg.new_tokens if cfg.mode == "generate" else None,
        "contention_threshold": cfg.contention_threshold, "seed": cfg.seed, "compile": cfg.compile,
        "models": models,
        "time_ratio": None, "speedup": None, "flop_ratio": None, "ideal_speedup": None, "efficiency": None,
        "memory_ratio": None, "paired_speedup": None,
        "disturbed": sum(m["disturbed"] for m in models.values()),
        "machine": machine_info(),
        "warnings": warnings,
    }
    if len(benches) == 2:
        a, b = (models[x.name] for x in benches)
        result["time_ratio"] = a["median_s"] / b["median_s"] if b["median_s"] > 0 else None
        result["speedup"] = b["median_s"] / a["median_s"] if a["median_s"] > 0 else None
        # the median of per-repeat ratios: A and B of one repeat run back to back, so a change of machine speed
        # between repeats (this VM's speed can shift by 1.5x for minutes) cancels in each ratio
        pairs = [tb / ta for ta, tb in zip(a["times_s"], b["times_s"], strict=True) if ta > 0]
        result["paired_speedup"] = statistics.median(pairs) if pairs else None
        result["flop_ratio"] = a["flops_per_iter"] / b["flops_per_iter"]
        result["ideal_speedup"] = 1 / result["flop_ratio"]
        if a["generation"]:  # data-dependent depth: the analytic (full-depth) FLOPs do not bound the speed
            result["flop_ratio"] = result["ideal_speedup"] = None
        if result["speedup"] is not None and result["ideal_speedup"] is not None:
            result["efficiency"] = result["speedup"] / result["ideal_speedup"]
        if a["peak_memory_bytes"] is not None and b["peak_memory_bytes"]:
            result["memory_ratio"] = a["peak_memory_bytes"] / b["peak_memory_bytes"]
    return result


def _generation_stats(bench: _Bench, cfg: BenchConfig) -> dict[str, Any]:
    """Generate mode with early exits or speculation: one more run's mean depth or acceptance; else empty."""
    exits = getattr(bench.model, "exits", None)
    adaptive = exits is not None and exits.policy() != "full"
    if cfg.mode != "generate" or not (adaptive or (cfg.speculative is not None and not bench.baseline)):
        return {}
    stats: dict[str, Any] = {}
    bench.step(stats)
    stats.pop("exit_depths", None)
    return stats


def _routing_stats(bench: _Bench, cfg: BenchConfig, tokens: torch.Tensor) -> dict[str, float]:
    """The statistics layers report (routed fractions, ...) for one no-grad pass over the bench input.

    Routing is the op's: train mode's static top-k for ``train``, the configured eval routing for
    ``forward``, and the causal decisions over the prompt for ``generate`` (a causal decision is per
    token, so decoding makes the same ones).
    """
    x = tokens.to(bench.device)
    if cfg.mode == "generate":
        x = x[:, : cfg.seq_len - cfg.new_tokens]
    was_training = bench.model.training
    bench.model.train(cfg.mode == "train")
    with torch.no_grad(), _autocast(cfg.dtype, bench.device):
        stats = bench.model(x).stats
    bench.model.train(was_training)
    return {k: float(v) for k, v in stats.items()}
