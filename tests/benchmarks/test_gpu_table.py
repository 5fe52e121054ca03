"""benchmarks/gpu_table.py collects gpu.sh's rows into one JSON and one table, including rows without FLOPs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_table.py"


@pytest.fixture(scope="module")
def gpu_table():
    spec = importlib.util.spec_from_file_location("gpu_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(mode: str, a_s: float, b_s: float, flop_ratio: float | None) -> dict:
    return {"mode": mode, "batch_size": 8, "seq_len": 64, "dtype": "bf16", "device": "cuda", "compile": mode == "train",
            "paired_speedup": b_s / a_s, "flop_ratio": flop_ratio, "machine": {"cpu": "x"},
            "models": {"a": {"preset": "medium-mod", "median_s": a_s}, "b": {"preset": "medium", "median_s": b_s}}}


def test_rows_peer_and_device_land_in_json_and_markdown(gpu_table, tmp_path):
    (tmp_path / "mod-train.json").write_text(json.dumps(_bench("train", 0.5, 1.0, 0.55)))
    (tmp_path / "spec-b1.json").write_text(json.dumps(_bench("generate", 0.2, 0.3, None)))
    (tmp_path / "broken.json").write_text("{not json")  # a failed row is skipped, not fatal
    peer = {"mode": "train", "tokens": 16384, "d_model": 512, "expert_dim": 2048, "experts": 8, "top_k": 2,
            "dtype": "bf16", "device": "NVIDIA H200", "torch": "2.13.0", "threads": 16,
            "rows": {"dense": {"median_ms": 10.0, "speed_vs_dense": 1.0},
                     "mixtral-grouped_mm": {"median_ms": 12.5, "speed_vs_dense": 0.8}}}
    (tmp_path / "moe-peer.json").write_text(json.dumps(peer))
    (tmp_path / "tests.txt").write_text("....\n5 passed in 3.1s\n")
    gpu_table.main([str(tmp_path)])
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["mod-train", "spec-b1"]
    assert result["rows"][0]["paired_speedup"] == pytest.approx(2.0)
    assert result["device"].startswith("NVIDIA H200") and result["tests"] == "5 passed in 3.1s"
    md = (tmp_path / "gpu.md").read_text()
    assert "| mod-train | train (compiled) | medium-mod vs medium | 8 x 64 | 500.0 | 1000.0 | 2.00x | 0.550 |" in md
    assert "| spec-b1 | generate | medium-mod vs medium | 8 x 64 | 200.0 | 300.0 | 1.50x | - |" in md
    assert "| mixtral-grouped_mm | 12.5 | 0.800 |" in md
