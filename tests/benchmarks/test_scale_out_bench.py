"""benchmarks/scale_out.py, smoke-tested: one worker row per build path under torchrun (2 gloo ranks), and the table.

No timing or memory-size assertions (those belong to the benchmark's own run); what is checked is that the
worker lays the model out as the trainer does and reports exact shard sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale_out.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("scale_out") / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for init in ("meta", "eager"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               "worker", "--preset", "tiny-moe", "--parallel", "fsdp", "--ep", "2", "--steps", "2", "--batch-size",
               "1", "--seq-len", "16", "--init", init, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in out.read_text().splitlines()], out


def test_worker_reports_each_build_path_with_exact_shard_sizes(rows: tuple[list[dict], Path]) -> None:
    records, _ = rows
    assert [r["init"] for r in records] == ["meta", "eager"]
    for r in records:
        # 2 ranks: the dense weights halved by FSDP, the experts halved by expert parallelism
        assert r["param_mb_per_rank"] == pytest.approx(r["full_param_mb"] / 2, rel=0.02)
        assert r["optim_mb_per_rank"] == pytest.approx(2 * r["param_mb_per_rank"], rel=1e-9)  # AdamW's two moments
        assert 0 < r["all_to_all_share"] < 1
        assert r["peak_rss_growth_mb_per_rank"] == max(r["peak_rss_growth_mb_rank0"],
                                                        r["peak_rss_growth_mb_other_ranks"])


def test_table_marks_the_eager_build(rows: tuple[list[dict], Path]) -> None:
    _, out = rows
    proc = subprocess.run([sys.executable, str(SCRIPT), "table", "--out", str(out)], capture_output=True, text=True,
                          check=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and "fsdp + EP 2 |" in lines[2] and "fsdp + EP 2 (eager build)" in lines[3]
