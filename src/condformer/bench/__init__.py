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

The package is split by concern: :mod:`~condformer.bench.config` (what to measure),
:mod:`~condformer.bench.models` (the models and their ops), :mod:`~condformer.bench.cpu` (contention),
:mod:`~condformer.bench.cost` (FLOPs), :mod:`~condformer.bench.memory` (peak memory),
:mod:`~condformer.bench.runner` (the protocol and :func:`run_bench`) and :mod:`~condformer.bench.report`.
Every name the single ``condformer.bench`` module had is re-exported here so that old imports keep working;
a name is *looked up* in the module that uses it, so a test that replaces one (``_time_op``,
``read_cpu_ticks``, ``PROC_STAT``, ...) patches that module, not this package.
"""

from condformer.bench.config import DTYPES, MODES, BenchConfig
from condformer.bench.config import _check_int as _check_int
from condformer.bench.cost import flops_per_iter, forward_flops, generate_flops
from condformer.bench.cpu import PROC_STAT, clock_tick_s, others_cpu_cores, parse_proc_stat, read_cpu_ticks
from condformer.bench.cpu import _affine_cpus as _affine_cpus
from condformer.bench.memory import MEMORY_TIMEOUT_S
from condformer.bench.memory import _memory_child as _memory_child
from condformer.bench.memory import _memory_cuda as _memory_cuda
from condformer.bench.memory import _memory_subprocess as _memory_subprocess
from condformer.bench.memory import _peak_rss_bytes as _peak_rss_bytes
from condformer.bench.memory import _pin_malloc_thresholds as _pin_malloc_thresholds
from condformer.bench.memory import _prepare_optimizer_state as _prepare_optimizer_state
from condformer.bench.models import _autocast as _autocast
from condformer.bench.models import _Bench as _Bench
from condformer.bench.models import _build as _build
from condformer.bench.models import _make_inputs as _make_inputs
from condformer.bench.models import _resolve_device as _resolve_device
from condformer.bench.models import _resolve_models as _resolve_models
from condformer.bench.report import _fmt as _fmt
from condformer.bench.report import _si as _si
from condformer.bench.report import format_bench, mean_routed_fraction, mean_stat
from condformer.bench.runner import Measurement, machine_info, run_bench
from condformer.bench.runner import _generation_stats as _generation_stats
from condformer.bench.runner import _measure as _measure
from condformer.bench.runner import _median_or_none as _median_or_none
from condformer.bench.runner import _routing_stats as _routing_stats
from condformer.bench.runner import _time_op as _time_op
from condformer.model import build_model  # the old module's global, which tests build their models with

__all__ = [
    "BenchConfig", "build_model", "clock_tick_s", "DTYPES", "flops_per_iter", "format_bench", "forward_flops",
    "generate_flops", "machine_info", "mean_routed_fraction", "mean_stat", "Measurement", "MEMORY_TIMEOUT_S",
    "MODES", "others_cpu_cores", "parse_proc_stat", "PROC_STAT", "read_cpu_ticks", "run_bench",
]
