"""benchmarks/moe_peer.py runs every row at tiny sizes, in both modes, and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_peer.py"


@pytest.mark.parametrize("mode", ["train", "forward"])
def test_every_row_runs_and_is_reported_against_dense(tmp_path, mode):
    spec = importlib.util.spec_from_file_location("moe_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "peer.json"
    peer = importlib.util.find_spec("transformers") is not None
    args = ["--tokens", "64", "--d-model", "32", "--expert-dim", "32", "--repeats", "2", "--warmup", "0",
            "--mode", mode, "--json", str(out), *([] if peer else ["--no-peer"])]
    result = module.main(args)
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"]
    expected = {"dense", "condformer-auto", "condformer-grouped", "condformer-sorted", "condformer-loop"}
    if peer:
        expected |= {"mixtral-grouped_mm", "mixtral-eager"}
    assert set(rows) == expected
    assert rows["dense"]["speed_vs_dense"] == 1.0
    assert all(r["median_ms"] > 0 and r["speed_vs_dense"] > 0 for r in rows.values())
