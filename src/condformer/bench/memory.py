"""Peak extra memory of one iteration: CUDA's allocator statistics, or RSS of a fresh child process on CPU.

On CPU the measurement runs in a spawned child, because a process that has already built and warmed up
two models keeps memory resident that would hide the iteration's own peak; the child rebuilds the one
model from its config (see :func:`_memory_child` for what the figure does and does not include).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
from typing import Any

import torch

from condformer.bench.config import BenchConfig
from condformer.bench.models import _Bench, _build, _make_inputs
from condformer.config import ModelConfig

MEMORY_TIMEOUT_S = 900.0  # a memory child that has not answered by then is reported as failed


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
