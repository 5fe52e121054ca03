"""The multi-rank test helper itself: every rank runs, joins one group, and returns its own result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from .spawn import run_ranks


def _sum_of_ranks(rank: int, world: int) -> tuple[int, float]:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, float(t)


def _fail_on_rank_one(rank: int, world: int) -> None:
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one broke")


def test_each_rank_returns_its_result(tmp_path: Path) -> None:
    assert run_ranks(_sum_of_ranks, 3, tmp_path) == [(0, 6.0), (1, 6.0), (2, 6.0)]


def test_a_failing_rank_fails_the_test_with_its_traceback(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="rank 1 failed:(.|\n)*rank one broke"):
        run_ranks(_fail_on_rank_one, 2, tmp_path)
