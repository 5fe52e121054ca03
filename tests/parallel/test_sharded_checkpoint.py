"""Sharded (DCP) checkpoints: saved on 2 FSDP2 ranks after K AdamW steps, resumed on 1, 2 and 4 ranks, each
continuing M steps on the same global batches, must match the uninterrupted 2-rank run (float64: only the
order of the reductions differs). Plus: a save killed on one rank or while publishing leaves the previous
checkpoint current; no file is a pickle and loading unpickles nothing; a consolidated file is the unsharded
state dict (tied weights included); a mismatched model is one CheckpointError on every rank, without a hang.

One 2-rank save run (module fixture) feeds every test: spawning ranks is the expensive part.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from tests.parallel.spawn import run_ranks
from torch.distributed.tensor import DTensor

import condformer.parallel.sharded_checkpoint as sc
from condformer.checkpoint import load_for_inference
from condformer.config import LayerSpec, ModelConfig, TrainConfig
from condformer.errors import CheckpointError
from condformer.model import build_model
from condformer.optim import make_optimizer
from condformer.parallel.fsdp import shard_model
from condformer.run_layout import SHARDED_DIR, SHARDED_INDEX, _complete, resolve_checkpoint
from helpers import perturb_

# vocab 67: the embedding's rows split unevenly over 2 and 4 ranks; tied head: one tensor under two names;
# a SAS block: 0-dim gains, which FSDP2 leaves replicated (plain tensors beside the DTensors)
CFG = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, vocab_size=67, tie_embeddings=True,
           layers=[LayerSpec(), LayerSpec(block="sas")])
K, M = 2, 2  # AdamW steps before the save, steps after it
B, T = 4, 16  # global batch: 4 sequences of 16 tokens, split over the ranks


# -- the run ----------------------------------------------------------------------------------------


def _model(world: int, fsdp: bool, **overrides) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same perturbed float64 model on every rank, FSDP2-sharded (per layer and at the root) or plain."""
    torch.manual_seed(0)
    model = perturb_(build_model(ModelConfig(**{**CFG, **overrides})).double())
    if fsdp:
        shard_model(model, precision="fp32")
    return model, make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1, max_steps=10))


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of ``step`` (a pure function of the step)."""
    tokens = torch.randint(0, CFG["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(1000 + step))
    rows = slice(rank * B // world, (rank + 1) * B // world)
    return tokens[rows, :-1], tokens[rows, 1:]


def _lr(step: int) -> float:
    return 1e-2 / (step + 1)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> list[float]:
    """AdamW steps; FSDP2 averages the gradients over the ranks (equal token counts: the global mean)."""
    losses = []
    for step in steps:
        for group in opt.param_groups:  # a schedule: the saved rate differs from a fresh optimizer's
            group["lr"] = _lr(step)
        x, y = _batch(step, rank, world)
        loss = model(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective under FSDP2: every rank gathers)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _one_line_error(fn) -> str:
    try:
        fn()
    except CheckpointError as e:
        assert "\n" not in str(e)
        return str(e)
    raise AssertionError("no CheckpointError")


def _save_run(rank: int, world: int, run: str) -> dict:
    """K steps, a sharded save, M more steps (the uninterrupted run), then two killed saves and a good one."""
    run_dir = Path(run)
    model, opt = _model(world, fsdp=True)
    _train(model, opt, range(K), rank, world)
    state = {"tokenizer": {"kind": "byte"}, "skipped_steps": 0}
    sc.save_sharded(run_dir, K, model, opt, state, ModelConfig(**CFG), None)
    saved = _full(model)
    losses = _train(model, opt, range(K, K + M), rank, world)
    final = _full(model)

    # killed while writing: one rank's writer raises mid-save
    def broken_write(self, plan, planner):
        raise RuntimeError("disk full (simulated)")

    real_write = sc.ShardWriter.write_data
    if rank == 1:
        sc.ShardWriter.write_data = broken_write
    writer_error = _one_line_error(lambda: sc.save_sharded(run_dir, K + M, model, opt, state, ModelConfig(**CFG),
                                                           None))
    sc.ShardWriter.write_data = real_write
    after_writer = resolve_checkpoint(run_dir)

    # killed while publishing: rank 0 fails to write state.json, after every shard and the index are written
    import condformer.checkpoint_io as io  # where the publishing step (shared with single-file saves) writes

    real_json = io.write_json_atomic

    def broken_json(path, obj):
        if path.name == "state.json":
            raise OSError(28, "No space left on device (simulated)")
        real_json(path, obj)

    if rank == 0:
        io.write_json_atomic = broken_json
    publish_error = _one_line_error(lambda: sc.save_sharded(run_dir, K + M, model, opt, state, ModelConfig(**CFG),
                                                            None))
    io.write_json_atomic = real_json
    after_publish = resolve_checkpoint(run_dir)
    leftovers = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    # the next save tidies what the killed ones left and becomes current
    sc.save_sharded(run_dir, K + M, model, opt, state, ModelConfig(**CFG), None, keep=2)
    current, names = resolve_checkpoint(run_dir), sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    # a resume on the same 2 ranks, into fresh objects (saves spawning another pair of processes)
    resumed = _resume_run(rank, world, str(run_dir / "checkpoints" / f"step-{K:08d}"), {"n_layers": 4})
    return {"losses": losses, "saved": saved, "final": final, "writer_error": writer_error,
            "publish_error": publish_error, "after_writer": after_writer, "after_publish": after_publish,
            "leftovers": leftovers, "current": current, "names": names, "resumed": resumed}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sharded")
    results = run_ranks(_save_run, 2, root, str(root / "run"))
    return {**results[0], "errors": [(r["writer_error"], r["publish_error"]) for r in results],
            "resumed": [r["resumed"] for r in results], "run": root / "run",
            "ckpt": root / "run" / "checkpoints" / f"step-{K:08d}", "root": root}


# -- resuming -------------------------------------------------------------------------------------


def _resume_run(rank: int, world: int, ckpt: str, mismatch: dict) -> dict:
    """Refuse a mismatched model (every rank, no hang), then resume and continue M steps."""
    bad, bad_opt = _model(world, fsdp=True, **mismatch)
    mismatch_error = _one_line_error(lambda: sc.load_sharded(ckpt, bad, bad_opt))

    # one rank alone cannot read the checkpoint: every rank must still leave load_sharded together
    def unreadable(ckpt_dir):
        raise CheckpointError("index unreadable here (simulated)")

    real_read = sc.read_index
    if rank == world - 1:
        sc.read_index = unreadable
    lonely_error = _one_line_error(lambda: sc.load_sharded(ckpt, bad, bad_opt))
    sc.read_index = real_read

    model, opt = _model(world, fsdp=True)
    ck = sc.load_sharded(ckpt, model, opt)
    groups = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    losses = _train(model, opt, range(K, K + M), rank, world)
    return {"mismatch": mismatch_error, "lonely": lonely_error, "step": ck.state["step"], "losses": losses,
            "final": _full(model), "groups": groups}


def _assert_same_run(got: dict, want: dict) -> None:
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-12, abs=0)
    assert got["final"].keys() == want["final"].keys()
    for k, v in want["final"].items():
        torch.testing.assert_close(got["final"][k], v, rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize(("world", "mismatch", "expected"), [
    (2, {"n_layers": 4}, "lacks 'model.layers.2."),
    (4, {"d_model": 48}, "of shape [67, 32], the model has [67, 48]"),
])
def test_resume_on_2_and_4_ranks_continues_the_run(saved, world, mismatch, expected):
    if world == 2:  # resumed by the save run's own ranks (with the same mismatch)
        results = saved["resumed"]
    else:
        results = run_ranks(_resume_run, world, saved["root"], str(saved["ckpt"]), mismatch)
    for rank, r in enumerate(results):
        assert r["step"] == K
        assert expected in r["mismatch"], r["mismatch"]
        if rank == world - 1:
            assert "index unreadable here" in r["lonely"]
        else:
            assert f"failed on rank {world - 1}" in r["lonely"]
    assert results[0]["groups"] == [(_lr(K - 1), 0.1), (_lr(K - 1), 0.0)]  # the saved param_groups
    _assert_same_run(results[0], saved)


def test_resume_in_one_plain_process_without_unpickling(saved, monkeypatch):
    """No process group, no FSDP: the shards are read into a plain model, and nothing is ever unpickled."""

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    class RefusingUnpickler(pickle.Unpickler):
        load = refuse

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    assert not dist.is_initialized()
    model, opt = _model(1, fsdp=False)
    ck = sc.load_sharded(saved["run"] / "checkpoints" / f"step-{K:08d}", model, opt)
    monkeypatch.undo()
    assert ck.state["tokenizer"] == {"kind": "byte"} and ck.model_cfg.vocab_size == CFG["vocab_size"]
    assert model.head.weight is model.embed.weight  # the tie survives the load
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(_lr(K - 1), 0.1), (_lr(K - 1), 0.0)]
    losses = _train(model, opt, range(K, K + M), 0, 1)
    _assert_same_run({"losses": losses, "final": _full(model)}, saved)


def test_save_and_load_in_one_process_with_a_fresh_optimizer(tmp_path):
    """Without a process group too; a save before any step stores no moments (and creates none)."""
    model, opt = _model(1, fsdp=False)
    torch.manual_seed(123)
    ckpt = sc.save_sharded(tmp_path, 0, model, opt, {}, ModelConfig(**CFG), None)
    draw = torch.rand(3)
    assert not opt.state and sc.is_sharded(ckpt) and resolve_checkpoint(tmp_path) == ckpt
    other, other_opt = _model(1, fsdp=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    sc.load_sharded(tmp_path, other, other_opt)  # a run directory resolves to its current checkpoint
    assert torch.equal(torch.rand(3), draw)  # the saving rank's generator state, restored
    assert not other_opt.state  # no moments: the first step starts them, as the saved optimizer's would
    for (name, got), want in zip(other.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


# -- crash safety -----------------------------------------------------------------------------------


def test_killed_saves_leave_the_previous_checkpoint_current(saved):
    ckpt = saved["ckpt"]
    assert saved["after_writer"] == ckpt and saved["after_publish"] == ckpt
    for writer_error, publish_error in saved["errors"]:  # every rank raised, each a one-line error
        assert "disk full (simulated)" in writer_error and "previous checkpoint is still the current" in writer_error
        assert "failed on rank 0" in publish_error or "No space left on device" in publish_error
    assert "No space left on device" in saved["errors"][0][1]
    tmp = f".tmp-step-{K + M:08d}"
    assert tmp in saved["leftovers"] and f"step-{K + M:08d}" not in saved["leftovers"]
    assert _complete(saved["run"] / "checkpoints" / tmp) is False  # shards and index, but no state.json
    # the next save tidied the leftovers and became current; the earlier one is kept (keep=2)
    assert saved["current"] == saved["run"] / "checkpoints" / f"step-{K + M:08d}"
    assert saved["names"] == ["latest", f"step-{K:08d}", f"step-{K + M:08d}"]


def test_no_file_is_a_pickle(saved):
    files = [p for p in saved["run"].rglob("*") if p.is_file()]
    for path in files:
        head = path.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{path} is a pickle or a torch.save zip"
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert list(f.keys())
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        else:
            assert path.name == "latest", path
    shards = sorted(p.name for p in (saved["ckpt"] / SHARDED_DIR).iterdir())
    assert shards == [SHARDED_INDEX, "shard-00001-model-00001-of-00001.safetensors",
                      "shard-00002-model-00001-of-00001.safetensors"]
    assert sc.is_sharded(saved["ckpt"]) and _complete(saved["ckpt"])


# -- consolidation ----------------------------------------------------------------------------------


def test_consolidate_is_the_unsharded_state_dict(saved, tmp_path):
    out = sc.consolidate(saved["ckpt"], tmp_path / "model.safetensors")
    tensors = load_file(str(out))
    want = saved["saved"]
    assert set(tensors) == set(want) - {"head.weight"}  # tied: stored once, under the name save_model keeps
    for k, v in tensors.items():
        assert v.dtype == torch.float64 and torch.equal(v, want[k]), k

    # consolidated into the checkpoint itself, it is a single-file checkpoint every tool loads
    copy = tmp_path / "copy"
    shutil.copytree(saved["ckpt"], copy)
    sc.consolidate(copy)
    _, model, _ = load_for_inference(copy)
    assert model.head.weight is model.embed.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k].float()), k  # the config builds float32; the run trained in float64


def test_check_sharded_fit_refuses_another_config_before_allocating(saved):
    sc.check_sharded_fit(saved["ckpt"], ModelConfig(**CFG))
    one_layer = ModelConfig(**{**CFG, "n_layers": 1, "layers": [LayerSpec()]})
    message = _one_line_error(lambda: sc.check_sharded_fit(saved["ckpt"], one_layer))
    assert "holds 'model.layers.1." in message and "which the model has not" in message


def test_a_missing_shard_is_a_one_line_error(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved["ckpt"], copy)
    (copy / SHARDED_DIR / "shard-00002-model-00001-of-00001.safetensors").unlink()
    model, opt = _model(1, fsdp=False)
    message = _one_line_error(lambda: sc.load_sharded(copy, model, opt))
    assert "shard-00002-model-00001-of-00001.safetensors' is missing" in message
    message = _one_line_error(lambda: sc.consolidate(copy, tmp_path / "out.safetensors"))
    assert "is missing" in message and not (tmp_path / "out.safetensors").exists()
