"""Early exit from the command line: calibrate, generate --exit-threshold / --speculative, inspect, bench."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tests.e2e.test_cli import cf, env, last_json  # noqa: F401  (env is a fixture)


@pytest.fixture(scope="module")
def exit_run(tmp_path_factory: pytest.TempPathFactory, env: dict, code_corpus: Path) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("exit-cli")
    cfg = root / "model.yaml"
    cfg.write_text("model:\n  preset: tiny-exit\n  d_model: 32\n  n_heads: 2\n  n_layers: 3\n  max_seq_len: 128\n")
    out = root / "run"
    last_json(cf("train", "--config", str(cfg), "--data", str(code_corpus), "--max-steps", "40", "--seq-len", "64",
                 "--batch-size", "8", "--eval-every", "40", "--out", str(out), "--no-progress", "--json", env=env))
    return out


def _digest(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(run.rglob("*.json")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_calibrate_writes_thresholds_within_tolerance(exit_run: Path, tmp_path: Path, env: dict) -> None:  # noqa: F811
    run = _copy(exit_run, tmp_path)
    before = _digest(run)
    dry = last_json(cf("calibrate", str(run), "--tolerance", "0.05", "--batches", "2", "--dry-run", "--json", env=env))
    assert _digest(run) == before and dry["written"] is False  # --dry-run touches nothing
    res = last_json(cf("calibrate", str(run), "--tolerance", "0.05", "--batches", "2", "--json", env=env))
    assert res["thresholds"] is not None and len(res["thresholds"]) == 2  # exits after layers 0 and 1
    assert res["loss"] <= res["full_loss"] * 1.05 + 1e-6
    assert res["mean_depth"] < 3 and sum(res["histogram"]) == res["tokens"]
    assert {"loss", "agreement", "mean_depth", "full_loss"} <= set(res["held_out"])
    state = json.loads((Path(res["checkpoint"]) / "state.json").read_text())
    assert state["model"]["exits"]["thresholds"] == res["thresholds"]
    assert json.loads((run / "config.json").read_text())["model"]["exits"]["thresholds"] == res["thresholds"]
    # generate now decodes with the calibrated thresholds: tokens stop before the last layer
    gen = last_json(cf("generate", str(run), "--prompt", "def ", "--max-new-tokens", "16", "--greedy", "--json",
                       env=env))
    assert gen["exit_mean_depth"] == pytest.approx(sum((i + 1) * c for i, c in enumerate(gen["exit_histogram"]))
                                                   / sum(gen["exit_histogram"]))


def test_generate_exit_threshold_and_speculative(exit_run: Path, env: dict) -> None:  # noqa: F811
    args = ["generate", str(exit_run), "--prompt", "def f(x):", "--max-new-tokens", "24", "--greedy", "--json"]
    plain = last_json(cf(*args, env=env))
    assert "exit_mean_depth" not in plain  # uncalibrated: full depth
    shallow = last_json(cf(*args, "--exit-threshold", "0", env=env))  # any confidence > 0: the first exit
    assert shallow["exit_mean_depth"] == 1.0 and shallow["exit_histogram"][0] == 23
    second = last_json(cf(*args, "--exit-threshold", "off,0", env=env))  # the first exit not checked
    assert second["exit_mean_depth"] == 2.0 and second["exit_histogram"][1] == 23
    spec = last_json(cf(*args, "--speculative", "1", "--draft-tokens", "3", env=env))
    assert spec["text"] == plain["text"]  # self-speculative greedy == the full model's greedy
    assert 0 <= spec["accepted"] <= spec["drafted"] and spec["rounds"] >= 1


def test_inspect_exit_run_reports_depths_and_curve(exit_run: Path, tmp_path: Path, env: dict) -> None:  # noqa: F811
    res = last_json(cf("inspect", str(exit_run), "--exit-threshold", "0", "--out", str(tmp_path / "h.png"),
                       "--curve-batches", "1", "--json", env=env))
    assert res["exits"]["mean_depth"] == 1.0 and res["exits"]["histogram"][0] == res["n_tokens"]
    # the heatmap rows: each layer's computed tokens (only layer 0 computes any at threshold 0)
    rows = {e["layer"]: e["routed_frac"] for e in res["layers"] if e["name"] == "exit_computed"}
    assert rows == {0: 1.0, 1: 0.0, 2: 0.0}
    curve = res["exit_curve"]
    depths = [p["mean_depth"] for p in curve["points"]]
    assert len(depths) >= 2 and min(depths) >= 1 and max(depths) <= 3
    assert Path(curve["png"]).is_file() and (tmp_path / "h.png").is_file()


def test_bench_generate_with_exits_and_speculation(exit_run: Path, env: dict) -> None:  # noqa: F811
    common = ["bench", "--preset", str(exit_run), "--vs", str(exit_run), "--mode", "generate", "--seq-len", "40",
              "--new-tokens", "8", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--no-memory",
              "--no-progress", "--json"]
    res = last_json(cf(*common, "--exit-threshold", "0", env=env))
    a, b = (res["models"][k] for k in res["models"])
    assert a["generation"]["exit_mean_depth"] == 1.0
    # the baseline: full depth through the same exit decoder, every exit off
    assert b["generation"]["exit_mean_depth"] == 3.0 and b["generation"]["exit_histogram"][:2] == [0, 0]
    assert res["speedup"] > 0 and res["flop_ratio"] is None
    res = last_json(cf(*common, "--speculative", "2", env=env))
    a = next(iter(res["models"].values()))
    assert a["generation"]["drafted"] >= a["generation"]["accepted"] >= 0


@pytest.mark.parametrize("args,needle", [
    (["generate", "RUN", "--prompt", "x", "--speculative", "3"], "--speculative E needs 1 <= E < 3"),
    (["generate", "RUN", "--prompt", "x", "--speculative", "1", "--exit-threshold", "0.5"],
     "takes no --exit-threshold"),
    (["generate", "RUN", "--prompt", "x", "--exit-threshold", "high"], "--exit-threshold takes a number"),
    (["generate", "RUN", "--prompt", "x", "--exit-threshold", "off"], "omit the flag for full depth"),
    (["generate", "RUN", "--prompt", "x", "--exit-threshold", "0.5,0.5,0.5"], "give one threshold or 2"),
    (["calibrate", "RUN", "--tolerance", "1.5"], "--tolerance must be in [0, 1)"),
    (["calibrate", "RUN", "--tolerance", "0.01", "--batches", "0"], "--batches must be >= 1"),
    (["bench", "--preset", "RUN", "--mode", "train", "--speculative", "1"], "use --mode generate"),
])
def test_exit_user_errors_are_one_line(args: list[str], needle: str, exit_run: Path, env: dict) -> None:  # noqa: F811
    proc = cf(*[str(exit_run) if a == "RUN" else a for a in args], env=env)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_calibrate_needs_exits(tmp_path: Path, env: dict, code_corpus: Path) -> None:  # noqa: F811
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  preset: tiny\n  d_model: 32\n  n_heads: 2\n  n_layers: 2\n  max_seq_len: 64\n")
    last_json(cf("train", "--config", str(cfg), "--data", str(code_corpus), "--max-steps", "2", "--seq-len", "32",
                 "--batch-size", "2", "--out", str(tmp_path / "r"), "--no-progress", "--json", env=env))
    for args in (["calibrate", str(tmp_path / "r"), "--tolerance", "0.01"],
                 ["generate", str(tmp_path / "r"), "--prompt", "x", "--exit-threshold", "0.5"],
                 ["generate", str(tmp_path / "r"), "--prompt", "x", "--speculative", "1"]):
        proc = cf(*args, env=env)
        assert proc.returncode == 2 and "no" in proc.stderr and "exit" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
