"""`condformer train` under torchrun with FSDP2, expert parallelism and activation checkpointing: every layout
follows the one-process trajectory (same global batch), and a sharded run resumes on another number of ranks.

Rank r takes rows [r*B, (r+1)*B) of each global batch; gradients are averaged (DDP, FSDP's reduce-scatter) or,
for experts, summed over the ranks whose tokens they served and scaled. So W ranks x batch B must follow one
process x batch W*B up to float summation order, whatever shards what.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from condformer.checkpoint import load_weights, read_checkpoint
from condformer.model import build_model
from condformer.parallel.sharded_checkpoint import read_index
from condformer.run_layout import resolve_checkpoint

MOE = {"ffn": "moe", "options": {"experts": 4, "capacity_factor": 1.0, "balance_coef": 0.05}}
MODELS = {"dense": {}, "moe": {"layers": [MOE], "n_layers": 2}}
STEPS, GLOBAL_BATCH = 6, 4


def _cli(args: list[str], env: dict[str, str], ranks: int | None = None) -> dict:
    launch = [sys.executable, "-m", "condformer.cli"] if ranks is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
         "condformer.cli"]
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, code_corpus: Path) -> dict:
    root = tmp_path_factory.mktemp("scale_out")
    env = {**os.environ, "CONDFORMER_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    configs = {}
    for name, fields in MODELS.items():
        configs[name] = root / f"{name}.json"
        configs[name].write_text(json.dumps({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                                                       **fields}}))
    return {"root": root, "env": env, "configs": configs, "corpus": code_corpus, "refs": {}}


def _train(setup: dict, model: str, out: Path, ranks: int | None, *flags: str) -> dict:
    world = ranks or 1
    args = ["train", "--config", str(setup["configs"][model]), "--data", str(setup["corpus"]), "--seq-len", "32",
            "--max-steps", str(STEPS), "--eval-every", "3", "--checkpoint-every", "3", "--no-progress", "--json",
            "--batch-size", str(GLOBAL_BATCH // world), "--out", str(out), *flags]
    return _cli(args, setup["env"], ranks)


def _reference(setup: dict, model: str) -> tuple[dict, Path]:
    """One process at the global batch (trained once per model, shared by the tests)."""
    if model not in setup["refs"]:
        out = setup["root"] / f"ref-{model}"
        setup["refs"][model] = (_train(setup, model, out, None), out)
    return setup["refs"][model]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's final weights through the ordinary loader (it reads single-file and sharded checkpoints)."""
    ck = read_checkpoint(run)
    model = build_model(ck.model_cfg)
    load_weights(ck, model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _same_run(result: dict, run: Path, ref: dict, ref_run: Path) -> None:
    assert result["tokens"] == ref["tokens"]
    assert result["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    for a, b in zip(_log(run), _log(ref_run), strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a["step"])
    mine, theirs = _weights(run), _weights(ref_run)
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


LAYOUTS = {
    "fsdp-dense": ("dense", ["--parallel", "fsdp"]),
    "fsdp-moe-selective-ac": ("moe", ["--parallel", "fsdp", "--activation-checkpointing", "selective"]),
    "ddp-ep2-moe": ("moe", ["--expert-parallel", "2"]),
    "fsdp-ep2-moe-full-ac": ("moe", ["--parallel", "fsdp", "--expert-parallel", "2",
                                     "--activation-checkpointing", "full"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_follow_one_process(setup: dict, layout: str) -> None:
    model, flags = LAYOUTS[layout]
    ref, ref_run = _reference(setup, model)
    run = setup["root"] / layout
    result = _train(setup, model, run, 2, *flags)
    _same_run(result, run, ref, ref_run)
    sharded = "fsdp" in flags[1]
    assert ((resolve_checkpoint(run) / "sharded").is_dir()) == sharded  # --checkpoint-format auto


def test_fsdp_with_expert_parallelism_on_a_two_by_two_mesh(setup: dict) -> None:
    """4 ranks: experts split over ep = 2 and replicated over the other mesh dimension, FSDP over all four."""
    ref, ref_run = _reference(setup, "moe")
    run = setup["root"] / "fsdp-ep2-four-ranks"
    result = _train(setup, "moe", run, 4, "--parallel", "fsdp", "--expert-parallel", "2")
    _same_run(result, run, ref, ref_run)
    # each expert weight was written as four blocks: two ep shards of 2 experts, each split in two by FSDP
    index = read_index(resolve_checkpoint(run))
    for key in ("model.layers.1.block.ffn.bank.w_up", "model.layers.1.block.ffn.bank.w_down"):
        chunks = sorted((c["offsets"], c["sizes"]) for c in index["tensors"][key]["chunks"])
        rows, cols = index["tensors"][key]["shape"][:2]
        assert chunks == [([e, c, 0], [rows // 2, cols // 2, index["tensors"][key]["shape"][2]])
                          for e in (0, rows // 2) for c in (0, cols // 2)], key


def _cut_back_to_step_3(run: Path, copy: Path) -> None:
    """A copy of ``run`` as a crash after step 3's checkpoint would have left it."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step-{STEPS:08d}")
    (copy / "checkpoints" / "latest").write_text("step-00000003\n")


@pytest.mark.parametrize("ranks", [1, 4])
def test_a_sharded_run_resumes_on_another_number_of_ranks(setup: dict, ranks: int) -> None:
    ref, ref_run = _reference(setup, "moe")
    saved = setup["root"] / "fsdp-moe-saved"
    if not saved.exists():
        _train(setup, "moe", saved, 2, "--parallel", "fsdp")
    run = setup["root"] / f"resumed-on-{ranks}"
    _cut_back_to_step_3(saved, run)
    assert resolve_checkpoint(run).name == "step-00000003"
    flags = ["--resume", "--parallel", "fsdp" if ranks > 1 else "ddp"]  # how to run may change on a resume
    result = _cli(["train", "--out", str(run), "--no-progress", "--json", *flags], setup["env"],
                  ranks if ranks > 1 else None)
    _same_run(result, run, ref, ref_run)


def test_a_single_process_run_resumes_and_fine_tunes_under_fsdp(setup: dict) -> None:
    """FSDP builds the model as a meta-device structure on every rank, and rank 0 alone reads a single-file
    checkpoint's weights and hands out the shards: a one-process run cut back to step 3 and resumed on 2 FSDP ranks
    equals the uninterrupted run; ``--init-from`` it under FSDP equals the same fine-tuning in one process."""
    ref, ref_run = _reference(setup, "moe")
    run = setup["root"] / "single-resumed-under-fsdp"
    _cut_back_to_step_3(ref_run, run)
    result = _cli(["train", "--out", str(run), "--no-progress", "--json", "--resume", "--parallel", "fsdp"],
                  setup["env"], 2)
    _same_run(result, run, ref, ref_run)
    tuned = {}
    for ranks, flags in ((None, []), (2, ["--parallel", "fsdp"])):
        out = setup["root"] / f"fine-tuned-{ranks or 1}"
        args = ["train", "--init-from", str(ref_run), "--data", str(setup["corpus"]), "--seq-len", "32",
                "--max-steps", "2", "--eval-every", "2", "--no-progress", "--json", "--lr", "1e-3",
                "--batch-size", str(GLOBAL_BATCH // (ranks or 1)), "--out", str(out), *flags]
        tuned[ranks] = (_cli(args, setup["env"], ranks), out)
    (one, one_run), (two, two_run) = tuned[None], tuned[2]
    _same_run(two, two_run, one, one_run)
    first = [r["loss"] for r in _log(one_run) if "loss" in r][0]
    fresh_first = [r["loss"] for r in _log(ref_run) if "loss" in r][0]
    assert first < fresh_first - 0.1  # it started from the source run's trained weights, not an initialisation


def test_consolidate_makes_a_single_file(setup: dict) -> None:
    run = setup["root"] / "fsdp-dense"
    if not run.exists():
        pytest.skip("needs the fsdp-dense run of test_two_ranks_follow_one_process")
    exported = setup["root"] / "exported"  # export reads the sharded checkpoint as it is (one process, no group)
    _cli(["export", str(run), "--out", str(exported), "--json"], setup["env"])
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    copy = setup["root"] / "consolidated"
    shutil.copytree(run, copy)
    out = _cli(["consolidate", str(copy), "--json"], setup["env"])
    assert Path(out["out"]) == resolve_checkpoint(copy) / "model.safetensors"
    shutil.rmtree(resolve_checkpoint(copy) / "sharded")  # what is left is an ordinary single-file checkpoint
    mine, theirs = _weights(copy), _weights(run)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)
    result = _cli(["eval", str(copy), "--json"], setup["env"])
    assert result["val_loss"] > 0


@pytest.mark.parametrize(("flags", "ranks", "expected"), [
    (["--expert-parallel", "3"], 2, "expert_parallel 3 does not divide the 2 ranks"),
    (["--parallel", "fsdp"], None, "--parallel fsdp needs a process group: launch with torchrun"),
])
def test_bad_layouts_are_one_line_from_rank_0(setup: dict, flags: list[str], ranks: int | None,
                                              expected: str) -> None:
    """Every rank meets the same bad input; one line reaches the user, every rank exits, nothing is written."""
    out = setup["root"] / f"bad-{'-'.join(flags)}"
    args = ["train", "--config", str(setup["configs"]["moe"]), "--data", str(setup["corpus"]), "--seq-len", "32",
            "--max-steps", "2", "--no-progress", "--out", str(out), *flags]
    launch = [sys.executable, "-m", "condformer.cli"] if ranks is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
         "condformer.cli"]
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, env=setup["env"], timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("condformer: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not out.exists()
