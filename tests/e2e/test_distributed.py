"""Two CPU processes under torchrun (DDP over gloo) agree with each other and with one process.

Rank r takes rows [r*B, (r+1)*B) of each global batch and DDP averages gradients, so 2 ranks x batch B
must follow the same trajectory as 1 process x batch 2B (up to float summation order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condformer.checkpoint import resolve_checkpoint


def _run(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MOE = {"ffn": "moe", "options": {"experts": 4, "capacity_factor": 1.0, "balance_coef": 0.05, "importance_coef": 0.05}}
MODELS = {
    "dense": {},
    # capacity, balance and importance losses over the global batch (the default balance_scope)
    "moe": {"layers": [MOE]},
}


def _train_two_ways(tmp_path: Path, corpus: Path, model: dict) -> tuple[dict, dict]:
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, **model}}))
    env = {**os.environ, "CONDFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["train", "--config", str(cfg), "--data", str(corpus), "--seq-len", "32", "--max-steps", "6",
              "--eval-every", "3", "--no-progress", "--json"]
    # prepare the data once so the two ranks don't race to tokenise it
    single = _run([sys.executable, "-m", "condformer.cli", *common, "--batch-size", "4", "--out",
                   str(tmp_path / "one")], env)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "condformer.cli", *common, "--batch-size", "2", "--out", str(tmp_path / "two")], env)
    return single, ddp


@pytest.mark.parametrize("model", sorted(MODELS))
def test_two_ranks_match_one_process(tmp_path: Path, code_corpus: Path, model: str) -> None:
    single, ddp = _train_two_ways(tmp_path, code_corpus, MODELS[model])
    assert ddp["tokens"] == single["tokens"]
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert ddp["stats"].keys() == single["stats"].keys()
    for k, v in single["stats"].items():  # routing statistics: averaged or summed over the ranks' rows
        assert ddp["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(log, ref, strict=True):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    w2 = load_file(str(resolve_checkpoint(tmp_path / "two") / "model.safetensors"))
    w1 = load_file(str(resolve_checkpoint(tmp_path / "one") / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_micro_batch_scope_is_not_world_size_invariant(tmp_path: Path, code_corpus: Path) -> None:
    """The control: MoE statistics of each rank's own rows make two ranks leave the one-process trajectory."""
    moe = {**MOE, "options": {**MOE["options"], "balance_scope": "micro_batch"}}
    single, ddp = _train_two_ways(tmp_path, code_corpus, {"layers": [moe]})
    assert abs(ddp["val_loss"] - single["val_loss"]) > 1e-5 * single["val_loss"]
