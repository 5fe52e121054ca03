"""Wall-clock benchmark of a model against a baseline: the test of whether conditional computation pays.

A FLOP count says what a technique *should* save; only a timing says what it does. ``run_bench`` times
one operation (a no-grad forward, a full training step, or KV-cached greedy generation) for model A and,
optionally, a baseline B (typically A's dense twin), and reports the measured speedup next to the ideal
one implied by the FLOP ratio, so ``efficiency`` says how much of the theoretical saving survives
kernels, gathers and Python overhead.

The machine this runs on is assumed shared and noisy, which shapes the protocol:

* both models get the same seed, device, dtype and the *same* input tokens, and are warmed up first;
* measurements of A and B alternate (A,B then B,A on the next round), so slow drift (thermal throttling,
  a neighbour starting a job) affects both models equally instead of whichever ran last;
* each measurement repeats the op until ``min_time_s`` has passed, so timer resolution and per-call
  jitter are amortised, and the median over ``repeats`` measurements is reported;
* on Linux each measurement also records how much CPU *other* processes used meanwhile (``/proc/stat``
  minus our own CPU time); a measurement during which others used more than ``contention_threshold``
  cores is disturbed and redone, up to ``max_retries`` times, and is flagged if it stays disturbed.

The result is a JSON-able dict whose keys are an interface (see :func:`run_bench`);
:func:`format_bench` renders it as a small table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from condformer.config import ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.flops import count_flops, eval_config, head_forward_flops, layer_forward_flops
from condformer.model import Transformer, build_model

MODES = ("train", "forward", "generate")
DTYPES = ("fp32", "bf16")
PROC_STAT = "/proc/stat"
MEMORY_TIMEOUT_S = 900.0  # a memory child that has not answered by then is reported as failed


@dataclass
class BenchConfig:
    """What to benchmark and how carefully. See the module docstring for why the protocol is as it is."""

    # model A: a preset name, a config (or a .json/.yaml config file), or a run directory (trained weights)
    preset: str | ModelConfig
    vs: str | ModelConfig | None = None  # model B, the baseline (typically A's dense twin)
    mode: str = "train"  # "train" | "forward" | "generate"
    seq_len: int = 256
    batch_size: int = 8
    repeats: int = 7  # timed measurements per model; the median is reported
    warmup: int = 2  # untimed iterations per model first (allocator, kernel selection, lazy init)
    min_time_s: float = 0.2  # each measurement repeats the op until at least this long (>= 1 iteration)
    new_tokens: int = 32  # generate mode: tokens decoded after a prompt of seq_len - new_tokens tokens
    device: str = "auto"  # "auto": cuda if available else cpu
    dtype: str = "fp32"  # "fp32" | "bf16" (autocast)
    memory: bool = True  # measure the peak extra memory of one iteration
    max_retries: int = 3  # re-measurements allowed for one disturbed measurement
    contention_threshold: float = 0.3  # other processes' CPU use, in cores, that disturbs a measurement
    seed: int = 0
    # forward mode: "topk" times routed layers at their static capacity (what count_flops counts);
    # "causal" times their learned per-token decisions (meaningful for trained weights only)
    eval_routing: str = "topk"
    data: str | None = None  # None: random tokens; a corpus spec ("stdlib", PATH): real text from its val split
    # generate mode, model A only (the baseline decodes at full depth; an exit model through its exit decoder
    # with every exit off): early-exit confidence thresholds (None: A's configured/calibrated ones), or
    # self-speculative decoding with a draft of E layers
    exit_threshold: float | list[float] | None = None
    speculative: int | None = None
    draft_tokens: int = 4

    def validate(self) -> BenchConfig:
        """Check the fields that do not depend on the models; one-line :class:`ConfigError` otherwise."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown bench mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if self.eval_routing not in ("topk", "causal"):
            raise ConfigError(f"unknown eval_routing '{self.eval_routing}'; choose topk or causal")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown bench dtype '{self.dtype}'; choose one of: {', '.join(DTYPES)}")
        for name in ("seq_len", "batch_size", "repeats"):
            _check_int(self, name, minimum=1)
        for name in ("warmup", "max_retries", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("min_time_s", "contention_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.mode != "generate" and (self.exit_threshold is not None or self.speculative is not None):
            raise ConfigError("--exit-threshold and --speculative time generation; use --mode generate")
        if self.exit_threshold is not None and self.speculative is not None:
            raise ConfigError("--speculative verifies every token at full depth; it takes no --exit-threshold")
        if self.mode == "generate":
            _check_int(self, "new_tokens", minimum=1)
            _check_int(self, "draft_tokens", minimum=1)
            if self.new_tokens >= self.seq_len:
                raise ConfigError(
                    f"new_tokens ({self.new_tokens}) must be < seq_len ({self.seq_len}) in generate mode: the "
                    f"prompt is seq_len - new_tokens tokens long; raise seq_len or lower new_tokens"
                )
        return self


def _check_int(obj: Any, name: str, minimum: int) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")


# -- contention detection ----------------------------------------------------------------------
def parse_proc_stat(text: str, cpus: Collection[int] | None = None) -> tuple[int, int] | None:
    """(busy, total) clock ticks from the text of ``/proc/stat``; None if the needed lines are missing.

    Columns are user nice system idle iowait irq softirq steal [guest guest_nice]. ``total`` sums the
    first eight only: guest time is already included in user/nice, so adding it would count it twice.
    ``busy = total - idle - iowait``; steal stays in ``busy`` because on a VM it is exactly the
    interference (other guests on our physical cores) we want to detect.

    ``cpus=None`` reads the aggregate ``cpu`` line; otherwise the ``cpuN`` lines of those CPUs are summed
    (used when this process is pinned to a subset, where load on other cores does not slow us).
    """
    busy = total = 0
    found = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            continue
        label = fields[0]
        if cpus is None:
            if label != "cpu":
                continue
        elif label == "cpu" or not label[3:].isdigit() or int(label[3:]) not in cpus:
            continue
        try:
            ticks = [int(x) for x in fields[1:9]]
        except ValueError:
            return None
        if len(ticks) < 5:
            return None
        ticks += [0] * (8 - len(ticks))
        line_total = sum(ticks)
        total += line_total
        busy += line_total - ticks[3] - ticks[4]
        found += 1
    if found == 0 or (cpus is not None and found != len(cpus)):
        return None
    return busy, total


def _affine_cpus(text: str) -> set[int] | None:
    """The CPUs we may run on, if that is a strict subset of those ``/proc/stat`` lists; else None."""
    try:
        mine = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    listed = {int(f[3:]) for f in (ln.split()[0] for ln in text.splitlines() if ln.strip())
              if f.startswith("cpu") and f[3:].isdigit()}
    return mine if listed and mine < listed else None


def read_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) ticks of the CPUs we can run on; None where ``/proc/stat`` does not exist (not Linux).

    None means "unknown": contention detection is then off and no measurement is ever flagged.
    """
    try:
        with open(PROC_STAT, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    return parse_proc_stat(text, _affine_cpus(text))


def clock_tick_s() -> float:
    """Seconds per ``/proc/stat`` tick (``SC_CLK_TCK``, 100 Hz almost everywhere)."""
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.01


def others_cpu_cores(before: tuple[int, int] | None, after: tuple[int, int] | None, own_cpu_s: float,
                     wall_s: float, tick_s: float | None = None) -> float | None:
    """CPU cores used by other processes during a measurement: (busy_s - own_cpu_s) / wall_s, >= 0.

    ``own_cpu_s`` is this process's CPU time (all its threads) over the same window. None when either
    reading is unknown or no wall time passed. Clamped at 0 because tick sampling can make busy_s a
    little smaller than our own exactly-accounted CPU time.
    """
    if before is None or after is None or wall_s <= 0:
        return None
    tick = clock_tick_s() if tick_s is None else tick_s
    busy_s = (after[0] - before[0]) * tick
    return max(0.0, (busy_s - own_cpu_s) / wall_s)


# -- models and operations -----------------------------------------------------------------------
@dataclass
class _Bench:
    """One model under test: its op as a zero-argument callable, plus what timing needs to know."""

    name: str
    label: str  # the preset name, or the config's name
    cfg: ModelConfig
    model: Transformer
    step: Callable[[], None]
    sync: Callable[[], None]
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None  # train mode: the memory probe pre-allocates its state
    checkpoint: str | None = None  # weights loaded from this checkpoint (else the bench seed's init)
    baseline: bool = False  # model B: generate mode decodes it at full depth (no exits, no speculation)


@dataclass
class Measurement:
    time_s: float  # per iteration
    others_cpu: float | None  # cores used by other processes, None if unknown
    disturbed: bool  # still disturbed after all retries
    retries: int


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; use --device cpu or auto")
    return dev


def _resolve_models(cfg: BenchConfig) -> list[tuple[str, str, ModelConfig, str | None]]:
    """[(result key, label, config, checkpoint)] for A and, if given, B. Equal names get a ``#2`` suffix on B.

    A string that names an existing directory is read as a run (or checkpoint) directory: its config is
    used and its trained weights are loaded, which is what a benchmark of learned routing decisions needs.
    """
    from condformer.checkpoint import read_checkpoint
    from condformer.config import load_config_file
    from condformer.presets import preset

    out: list[tuple[str, str, ModelConfig, str | None]] = []
    for which in (cfg.preset, cfg.vs):
        if which is None:
            continue
        ck_path = None
        if isinstance(which, str) and os.path.isdir(which):
            ck = read_checkpoint(which)
            mcfg, ck_path = ck.model_cfg, str(ck.path)
            mcfg.name = os.path.basename(os.path.normpath(which)) or mcfg.name
        elif isinstance(which, str) and which.endswith((".json", ".yaml", ".yml")):
            mcfg = load_config_file(which)[0]
        elif isinstance(which, str):
            mcfg = preset(which)
        elif isinstance(which, ModelConfig):
            mcfg = which.validate()
        else:
            raise ConfigError(f"a bench model must be a preset name or a ModelConfig, got {type(which).__name__}")
        label = mcfg.name
        key = label if not out or out[0][0] != label else f"{label}#2"
        if cfg.seq_len > mcfg.max_seq_len:
            raise ConfigError(f"seq_len {cfg.seq_len} exceeds model '{label}' max_seq_len {mcfg.max_seq_len}; "
                              f"lower seq_len")
        if cfg.mode == "generate" and not mcfg.causal:
            raise ConfigError(f"generate mode needs a decoder; model '{label}' is an encoder")
        out.append((key, label, mcfg, ck_path))
    return out


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_inputs(cfg: BenchConfig, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) identical for both models and across runs: random from a fixed generator, or
    fixed windows of the corpus ``cfg.data`` (byte tokens) when a routing decision should see real text."""
    if cfg.data is not None:
        from condformer.data import prepare_data

        data = prepare_data(cfg.data, "byte")
        if data.tokenizer.vocab_size > vocab:
            raise ConfigError(f"bench data uses the byte tokenizer ({data.tokenizer.vocab_size} ids) but a model has "
                              f"vocab_size {vocab}; bench without --data")
        return data.get_batch("val", 0, cfg.batch_size, cfg.seq_len, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
    targets = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
    return tokens, targets


def _build(key: str, label: str, mcfg: ModelConfig, cfg: BenchConfig, device: torch.device,
           tokens: torch.Tensor, targets: torch.Tensor, checkpoint: str | None = None,
           baseline: bool = False) -> _Bench:
    """Build a model with the bench seed (so A and B start from the same RNG state) and its op."""
    from condformer.generate import SamplingConfig, generate
    from condformer.optim import make_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    if checkpoint is not None:
        from condformer.checkpoint import load_weights, read_checkpoint

        load_weights(read_checkpoint(checkpoint), model)
    model = model.to(device)
    # forward: the requested routing; generate: always the causal decisions (top-k cannot decode)
    model.set_inference(routing=cfg.eval_routing if cfg.mode == "forward" else "causal", missing="ignore")
    x, y = tokens.to(device), targets.to(device)
    dtype = cfg.dtype
    opt: torch.optim.Optimizer | None = None

    if cfg.mode == "forward":
        model.eval()

        def step() -> None:
            with torch.no_grad(), _autocast(dtype, device):
                model(x)

    elif cfg.mode == "train":
        model.train()
        # the trainer's AdamW and param groups (max_steps only satisfies TrainConfig's budget rule)
        adamw = opt = make_optimizer(model, TrainConfig(max_steps=1, lr=1e-3))  # the rate does not change the time

        def step() -> None:
            with _autocast(dtype, device):
                out = model(x, y)
                loss = out.train_loss
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)

    else:
        model.eval()
        prompts = tokens[:, : cfg.seq_len - cfg.new_tokens].tolist()
        sampling = SamplingConfig(max_new_tokens=cfg.new_tokens, greedy=True)
        speculative = None if baseline else cfg.speculative
        if getattr(model, "exits", None) is not None and model.exits.halting is None:
            if baseline:
                # full depth through the same early-exit decoder with every exit switched off: the ratio then
                # measures exiting (and its checks) alone, whatever the two decode paths' own overheads
                model.set_inference(exit_thresholds=[None] * (model.exits.n_exits - 1))
            elif cfg.exit_threshold is not None:
                model.set_inference(exit_thresholds=cfg.exit_threshold)

        def step(stats: dict | None = None) -> None:
            with _autocast(dtype, device):
                generate(model, prompts, sampling, pad_id=0, speculative=speculative, draft_tokens=cfg.draft_tokens,
                         stats=stats)

    def sync() -> None:  # the op's device, not merely the current one
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return _Bench(key, label, mcfg, model, step, sync, device, opt, checkpoint, baseline)


# -- timing ------------------------------------------------------------------------------------
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


# -- FLOPs -------------------------------------------------------------------------------------
def forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one sequence, as :func:`count_flops` counts them but without building a model."""
    layers = sum(layer_forward_flops(cfg, i, seq_len) for i in range(cfg.n_layers))
    return layers + head_forward_flops(cfg, seq_len)


def generate_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> int:
    """Approximate FLOPs of one sequence's greedy generation: prefill plus ``new_tokens - 1`` decode steps.

    ``generate`` runs the prompt once (prefill, which yields the first new token), then one forward
    pass per further token. Prefill costs ``forward_flops(P)``; its attention is the full masked
    rectangle, which is what SDPA computes with an explicit mask. A decode step of the token at
    position t has t + 1 keys (t cached plus itself) and is counted as ``forward_flops(t + 1) / (t + 1)``:
    the per-token cost of a length-(t+1) sequence whose queries each see all t+1 keys. For a dense layer
    this is exact (projections + FFN for one token, attention over t + 1 keys, the head for one token);
    for a routed layer it is the *expected* per-token cost at the router's capacity, with a cache
    holding the routed fraction of the keys. Sampling (argmax) and cache writes are not counted,
    consistent with :mod:`condformer.flops`.
    """
    total = Fraction(forward_flops(cfg, prompt_len))
    for t in range(prompt_len, prompt_len + new_tokens - 1):
        total += Fraction(forward_flops(cfg, t + 1), t + 1)
    return round(total)


def flops_per_iter(mcfg: ModelConfig, cfg: BenchConfig) -> int:
    """FLOPs of one timed iteration of ``cfg.mode`` over the whole batch."""
    if cfg.mode == "generate":
        return cfg.batch_size * generate_flops(eval_config(mcfg), cfg.seq_len - cfg.new_tokens, cfg.new_tokens)
    if cfg.mode == "train":
        return cfg.batch_size * count_flops(mcfg, cfg.seq_len).train_flops
    return cfg.batch_size * count_flops(mcfg, cfg.seq_len, training=False).forward_flops


# -- memory ------------------------------------------------------------------------------------
def _peak_rss_bytes(reset: bool = False) -> tuple[int, str]:
    """(high-water resident memory of this process in bytes, how it was read).

    Linux: ``VmHWM`` from /proc/self/status, after optionally resetting it to the current RSS by writing
    "5" to /proc/self/clear_refs (so the baseline is what is resident now, not a peak reached while
    building the model). We avoid ``ru_maxrss`` there because a spawned child inherits the parent's
    high-water mark through fork+exec (measured: a child of a 300 MB parent reports 300 MB), which would
    hide the child's own peak. Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    was_reset = False
    if reset:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            was_reset = True
        except OSError:
            pass
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "vmhwm_reset" if was_reset else "vmhwm"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "ru_maxrss"


def _pin_malloc_thresholds() -> bool:
    """Make glibc return every freed block of >= 64 KiB to the OS at once; False where that is not glibc.

    By default glibc raises its mmap threshold adaptively and keeps freed memory in the heap, so how
    much of an iteration's temporaries show up in RSS depends on allocation history and thread timing:
    the same model measured 114-133 MiB in five fresh processes. With fixed thresholds large tensors are
    mmapped and unmapped individually, RSS follows live memory, and repeated runs agree within 0.2%.
    Only the memory child does this (it costs an mmap per large allocation).
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 16)) and bool(mallopt(m_trim_threshold, 1 << 16))


def _prepare_optimizer_state(bench: _Bench) -> None:
    """Allocate AdamW's moment buffers now, so the measured iteration is a steady-state step.

    AdamW creates its state lazily in the first ``step()``; that is persistent memory (2x the
    parameters), not a per-iteration cost. A step on zero gradients creates it without running the op.
    """
    opt = bench.optimizer
    if opt is None:
        return
    for p in bench.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _memory_child(conn: Any, cfg_dict: dict, bench_cfg: BenchConfig, vocab: int, threads: int,
                  checkpoint: str | None = None, baseline: bool = False) -> None:
    """Runs in a fresh process: peak extra resident memory of one iteration of the op (bytes).

    The baseline is taken right before the iteration (after building the model, its inputs and, in
    train mode, the optimizer state; no warm-up: memory a warm-up frees stays resident, so the next
    iteration would reuse it and show almost no increase), so the result is the iteration's
    activations, gradients and temporaries, plus one-time first-call costs (library initialisation,
    thread pools, allocator arenas) that a warmed-up process would not pay again. It is therefore an
    upper-bound-ish RSS figure, not an allocator statistic; glibc's thresholds are pinned first
    (:func:`_pin_malloc_thresholds`) so that it is reproducible.
    """
    try:
        pinned = _pin_malloc_thresholds()
        torch.set_num_threads(threads)
        mcfg = ModelConfig.from_dict(cfg_dict)
        tokens, targets = _make_inputs(bench_cfg, vocab)  # the parent's inputs, drawn the same way
        bench = _build("child", mcfg.name, mcfg, bench_cfg, torch.device("cpu"), tokens, targets, checkpoint,
                       baseline)
        _prepare_optimizer_state(bench)
        gc.collect()
        before, method = _peak_rss_bytes(reset=True)
        bench.step()
        after, _ = _peak_rss_bytes()
        conn.send(("ok", max(0, after - before), method + ("+mallopt" if pinned else "")))
    except BaseException as e:  # report anything, including KeyboardInterrupt, to the parent as text
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", ""))
    finally:
        conn.close()


def _memory_subprocess(bench: _Bench, cfg: BenchConfig, vocab: int) -> tuple[int | None, str, str | None]:
    """(peak bytes or None, method, warning or None) from a spawned child; never raises."""
    import multiprocessing

    child_cfg = dataclasses.replace(cfg, preset=bench.label, vs=None)  # the model travels as a dict
    try:
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_memory_child, args=(send, bench.cfg.to_dict(), child_cfg, vocab,
                                                       torch.get_num_threads(), bench.checkpoint, bench.baseline),
                               daemon=True)
        proc.start()
        send.close()  # so that recv sees EOF if the child dies without answering
        try:
            if not recv.poll(MEMORY_TIMEOUT_S):
                proc.kill()
                return None, "", f"memory measurement of '{bench.name}' timed out after {MEMORY_TIMEOUT_S:.0f}s"
            status, value, method = recv.recv()
        except EOFError:
            status, value, method = "error", f"child exited without a result (exit code {proc.exitcode})", ""
        finally:
            proc.join(timeout=30)
            recv.close()
    except Exception as e:  # spawning can fail (no /dev/shm, resource limits): report, don't crash
        return None, "", f"memory measurement of '{bench.name}' failed: {type(e).__name__}: {e}"
    if status != "ok":
        return None, "", f"memory measurement of '{bench.name}' failed: {value}"
    return int(value), method, None


def _memory_cuda(bench: _Bench) -> int:
    """Peak extra allocated CUDA memory of one (warmed-up) iteration, above what was allocated before."""
    bench.sync()
    torch.cuda.reset_peak_memory_stats(bench.device)
    before = torch.cuda.memory_allocated(bench.device)
    bench.step()
    bench.sync()
    return torch.cuda.max_memory_allocated(bench.device) - before


# -- the run -----------------------------------------------------------------------------------
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
        "contention_threshold": cfg.contention_threshold, "seed": cfg.seed,
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


def mean_routed_fraction(stats: dict[str, float]) -> float | None:
    """Mean over routed layers of their ``*routed_frac`` statistic; None for a model with none."""
    return mean_stat(stats, "routed_frac")


def mean_stat(stats: dict[str, float], suffix: str) -> float | None:
    """Mean over layers of the statistic ``layer{L}/...{suffix}``; None when no layer reports it."""
    values = [v for k, v in stats.items() if k.endswith(suffix)]
    return sum(values) / len(values) if values else None


# -- report ------------------------------------------------------------------------------------
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
