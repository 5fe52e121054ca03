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


def test_fsdp_mfu_rows_render_with_and_without_a_known_peak(gpu_table, tmp_path):
    rows = [{"preset": "gpt2-small", "device": "NVIDIA H100 80GB HBM3", "ranks": 1, "compile": True, "dtype": "bf16",
             "batch_size_per_rank": 8, "seq_len": 1024, "step_s_median": 0.25, "tokens_per_s_per_rank": 32768.0,
             "tflops_per_rank": 400.0, "mfu": 0.4044, "peak_memory_gb": 20.0},
            {"preset": "tiny", "device": "cpu", "ranks": 1, "compile": False, "dtype": "fp32",
             "batch_size_per_rank": 2, "seq_len": 64, "step_s_median": 0.1, "tokens_per_s_per_rank": 1280.0,
             "tflops_per_rank": 0.01, "mfu": None, "peak_memory_gb": None}]
    (tmp_path / "mfu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gpu_table.main([str(tmp_path)])
    assert json.loads((tmp_path / "gpu.json").read_text())["mfu"] == rows
    md = (tmp_path / "gpu.md").read_text()
    assert "| gpt2-small | NVIDIA H100 80GB HBM3 | 1 | bf16 | True | 8 x 1024 | 32768 | 400.00 | 40.4% |" in md
    assert "| tiny | cpu | 1 | fp32 | False | 2 x 64 | 1280 | 0.01 | - |" in md


def test_fsdp_mfu_peak_table_matches_device_names():
    spec = importlib.util.spec_from_file_location("fsdp_mfu", SCRIPT.parent / "fsdp_mfu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert module.peak_flops("NVIDIA H200") == 989e12
    assert module.peak_flops("some other card") is None
