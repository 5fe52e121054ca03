"""Run a function on N CPU processes joined by a gloo process group, the cheapest multi-rank test (~1.5 s).

``run_ranks(fn, world, tmp_path, *args)`` starts ``world`` processes with ``torch.multiprocessing.spawn``;
each calls ``fn(rank, world, *args)`` inside an initialised gloo group (``init_method=file://``, no ports)
with one OpenMP thread (two torch processes with two threads each thrash these two cores), and what ``fn``
returns is sent back pickled through a file the test itself wrote (test-internal data only: never a user's
file). An exception on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, fn: Callable[..., Any], init_file: str, out_dir: str, timeout_s: float,
           args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result: Any = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
        result = ("error", traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):  # a group whose peer failed may not tear down cleanly
            dist.destroy_process_group()
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    # leave without interpreter finalisation: a gloo rank can abort there ("terminate called without an active
    # exception", pytorch/pytorch#179291), which failed a finished test in CI; the result is written already
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, tmp_path: Path, *args: Any, timeout_s: float = 120) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each computed in its own process.

    ``fn`` must be a module-level function (spawn pickles it by name).
    """
    run_dir = Path(tmp_path) / f"ranks-{fn.__name__}-{world}-{os.getpid()}-{len(list(Path(tmp_path).iterdir()))}"
    run_dir.mkdir(parents=True)
    mp.spawn(_entry, args=(world, fn, str(run_dir / "init"), str(run_dir), timeout_s, args), nprocs=world,
             join=True)
    results = []
    for rank in range(world):
        with open(run_dir / f"rank{rank}.pkl", "rb") as f:
            status, value = pickle.load(f)
        if status != "ok":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results
