"""Contention detection: how much CPU *other* processes used while a measurement ran.

The machine a benchmark runs on is assumed shared; ``/proc/stat`` minus our own CPU time says whether a
neighbour competed for our cores, so that a disturbed measurement can be redone (see
:func:`condformer.bench.runner._measure`). Everything here degrades to "unknown" (None) off Linux.
"""

from __future__ import annotations

import os
from collections.abc import Collection

PROC_STAT = "/proc/stat"


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
