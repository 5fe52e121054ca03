"""`condformer dial` and `--tolerance` as a user runs them: certify settings on a trained MoD + MoE run, write
dial.json and its plot atomically into the run, then evaluate and generate with a calibrated tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cf(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "condformer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("condformer: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {**os.environ, "CONDFORMER_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "2"}


def _train(root: Path, model: dict, env: dict, corpus: Path, steps: int, batch_size: int) -> Path:
    """A run of ``model`` trained through ``main()`` in this process (the command a user runs, minus a torch import)."""
    from condformer.cli import main

    cfg = root / "model.json"
    cfg.write_text(json.dumps({"model": model, "train": {"tensorboard": False}}))
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDFORMER_CACHE", env["CONDFORMER_CACHE"])
        assert main(["train", "--config", str(cfg), "--data", str(corpus), "--max-steps", str(steps), "--seq-len",
                     "32", "--batch-size", str(batch_size), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def dialled(tmp_path_factory: pytest.TempPathFactory, env: dict, code_corpus: Path) -> tuple[Path, dict]:
    """A run with a MoD layer and a top-2 MoE layer, trained 40 steps, then dialled at two tolerances."""
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
             "layers": [{"router": "mod", "options": {"capacity": 0.5}},
                        {"ffn": "moe", "options": {"experts": 4, "top_k": 2}}]}
    out = _train(tmp_path_factory.mktemp("dial"), model, env, code_corpus, steps=40, batch_size=8)
    result = last_json(cf("dial", str(out), "--tolerance", "0.0001", "0.9", "--batches", "10", "--json", env=env))
    return out, result


def test_dial_writes_its_table_and_plot_into_the_run(dialled: tuple[Path, dict]) -> None:
    run, result = dialled
    saved = json.loads((run / "dial.json").read_text())
    assert saved["tolerances"] == result["tolerances"] and saved["grid"] == result["grid"]
    assert (run / "dial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["grid"]) == 10 and result["n_calibration"] + result["n_holdout"] == 80
    loose = result["tolerances"]["0.9"]
    assert loose["settings"] is not None and loose["flops_ratio"] < 1 and loose["holdout_risk"] <= 0.9
    assert not [p for p in run.iterdir() if p.name.startswith(".") and "dial" in p.name]  # no temporary left


def test_eval_with_a_tolerance_uses_the_certified_setting(dialled: tuple[Path, dict], env: dict) -> None:
    run, result = dialled
    settings = result["tolerances"]["0.9"]["settings"]
    dialled_eval = last_json(cf("eval", str(run), "--tolerance", "0.9", "--json", env=env))
    explicit = last_json(cf("eval", str(run), "--moe-top-k", str(settings["moe_top_k"]),
                            f"--mod-threshold={settings['mod_threshold']}", "--json", env=env))
    full = last_json(cf("eval", str(run), "--json", env=env))
    assert dialled_eval["val_loss"] == explicit["val_loss"] != full["val_loss"]


def test_generate_with_a_tolerance(dialled: tuple[Path, dict], env: dict) -> None:
    run, _ = dialled
    got = last_json(cf("generate", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--greedy",
                       "--tolerance", "0.9", "--json", env=env))
    assert isinstance(got["text"], str)


def test_tolerance_errors_are_one_line(dialled: tuple[Path, dict], env: dict) -> None:
    run, result = dialled
    assert "0.05 was not calibrated" in one_error(cf("eval", str(run), "--tolerance", "0.05", env=env))
    assert "drop --moe-top-k" in one_error(cf("eval", str(run), "--tolerance", "0.9", "--moe-top-k", "1", env=env))
    assert result["tolerances"]["0.0001"]["settings"] is None  # 27 test sequences cannot certify 0.01%
    assert "no setting met tolerance 0.0001" in one_error(cf("eval", str(run), "--tolerance", "0.0001", env=env))
    assert "--delta must be in (0, 1)" in one_error(cf("dial", str(run), "--tolerance", "0.1", "--delta", "2",
                                                       env=env))


@pytest.fixture(scope="module")
def exit_run(tmp_path_factory: pytest.TempPathFactory, env: dict, code_corpus: Path) -> Path:
    model = {"d_model": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 64, "exits": {}}
    return _train(tmp_path_factory.mktemp("dial_exit"), model, env, code_corpus, steps=20, batch_size=4)


def test_speculation_is_tuned_by_speed_and_used_by_generate_auto(exit_run: Path, env: dict) -> None:
    assert "--speculation first" in one_error(cf("generate", str(exit_run), "--prompt", "x", "--speculative", "auto",
                                                 env=env))
    got = last_json(cf("dial", str(exit_run), "--speculation", "--prompts", "2", "--new-tokens", "6", "--repeats",
                       "1", "--batches", "1", "--json", env=env))
    best = got["speculation"]["best"]
    assert best["draft_layers"] in (1, 2) and len(got["speculation"]["candidates"]) == 2 * 3 * 5
    assert json.loads((exit_run / "dial.json").read_text())["speculation"]["best"] == best
    plain = last_json(cf("generate", str(exit_run), "--prompt", "def f(", "--max-new-tokens", "12", "--greedy",
                         "--json", env=env))
    auto = last_json(cf("generate", str(exit_run), "--prompt", "def f(", "--max-new-tokens", "12", "--greedy",
                        "--speculative", "auto", "--json", env=env))
    assert auto["text"] == plain["text"] and auto["drafted"] > 0
    assert "add --speculative E" in one_error(cf("generate", str(exit_run), "--prompt", "x", "--draft-confidence",
                                                 "0.5", env=env))
    assert "--tolerance EPS" in one_error(cf("dial", str(exit_run), env=env))
