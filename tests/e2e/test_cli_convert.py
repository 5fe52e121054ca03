"""`condformer convert` and `train --init-from --train ROLE --lr-new` as a user runs them, on a tiny random Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.e2e.test_cli import cf, last_json

pytest.importorskip("transformers")
from tests.hf.models import hf_config, perturbed, save_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {**os.environ, "CONDFORMER_CACHE": str(tmp_path_factory.mktemp("cache")), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, env: dict) -> Path:
    root = tmp_path_factory.mktemp("convert-cli")
    src = save_model_dir(perturbed(hf_config("llama"), seed=30), root / "src")
    last_json(cf("import", str(src), "--out", str(root / "run"), "--json", env=env))
    return root / "run"


@pytest.mark.parametrize("routed", ["block", "ffn"])
def test_convert_then_router_tuning(run: Path, tmp_path: Path, env: dict, code_corpus: Path, routed: str) -> None:
    out = tmp_path / "mod"
    r = last_json(cf("convert", str(run), "--to", "mod", "--capacity", "0.5", "--anneal-steps", "2", "--routed",
                     routed, "--out", str(out), "--json", env=env))
    # float32 probe: a routed FFN adds (x + a) + f where the dense layer adds x + (a + f)
    exact = 0 if routed == "block" else 1e-5
    assert r["technique"] == "mod" and r["layers"] == [1] and r["max_logit_diff_eval"] <= exact and r["new_params"] > 0
    layer = json.loads((out / "config.json").read_text())["model"]["layers"][1]
    assert layer["router"] == "mod" and layer["options"].get("routed", "block") == routed
    before = last_json(cf("eval", str(run), "--data", str(code_corpus), "--json", env=env))
    same = last_json(cf("eval", str(out), "--data", str(code_corpus), "--json", env=env))
    assert same["val_loss"] == pytest.approx(before["val_loss"], abs=1e-6)  # the conversion kept the function
    ft = tmp_path / "ft"
    p = cf("train", "--init-from", str(out), "--train", "routers", "--lr-new", "1e-3", "--data", str(code_corpus),
           "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--out", str(ft), "--json", env=env)
    res = last_json(p)
    assert res["steps"] == 2 and "frozen" in p.stderr
    gen = cf("generate", str(ft), "--prompt", "def f(x):", "--greedy", "--max-new-tokens", "4", env=env)
    assert gen.returncode == 0, gen.stderr


@pytest.mark.parametrize("args,words", [
    (["--to", "quantum"], "invalid choice"),
    (["--to", "mod", "--capacity", "1.5"], "(0, 1]"),
    (["--to", "mod", "--capacity", "0"], "(0, 1]"),
    (["--to", "mod", "--routed", "attention"], "invalid choice"),
    (["--to", "exits", "--layers", "0,7"], "out of range"),
    (["--to", "exits", "--experts", "4"], "--experts is an option of --to moe"),
    (["--to", "moe", "--split", "3"], "multiples"),
])
def test_bad_conversions_are_one_line_and_write_nothing(run: Path, tmp_path: Path, env: dict, args, words) -> None:
    out = tmp_path / "out"
    p = cf("convert", str(run), *args, "--out", str(out), env=env)
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_train_roles_are_one_line(run: Path, tmp_path: Path, env: dict, code_corpus: Path) -> None:
    p = cf("train", "--init-from", str(run), "--train", "routerz", "--data", str(code_corpus), "--out",
           str(tmp_path / "x"), env=env)
    assert p.returncode == 2 and "unknown trainable role 'routerz'" in p.stderr and len(p.stderr.splitlines()) == 1
    p = cf("train", "--init-from", str(run), "--train", "routers", "--data", str(code_corpus), "--max-steps", "1",
           "--seq-len", "32", "--batch-size", "2", "--out", str(tmp_path / "y"), env=env)
    assert p.returncode == 2 and "selects no parameter" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
