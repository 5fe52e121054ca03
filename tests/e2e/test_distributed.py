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


def test_two_ranks_match_one_process(tmp_path: Path, code_corpus: Path) -> None:
    corpus = code_corpus
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}}))
    env = {**os.environ, "CONDFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["train", "--config", str(cfg), "--data", str(corpus), "--seq-len", "32", "--max-steps", "6",
              "--eval-every", "3", "--no-progress", "--json"]
    # prepare the data once so the two ranks don't race to tokenise it
    single = _run([sys.executable, "-m", "condformer.cli", *common, "--batch-size", "4", "--out",
                   str(tmp_path / "one")], env)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "condformer.cli", *common, "--batch-size", "2", "--out", str(tmp_path / "two")], env)
    assert ddp["tokens"] == single["tokens"]
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    log = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(log, ref, strict=True):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    w2 = load_file(str(resolve_checkpoint(tmp_path / "two") / "model.safetensors"))
    w1 = load_file(str(resolve_checkpoint(tmp_path / "one") / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
