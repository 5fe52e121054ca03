"""Checkpoints: every file-system step of a save survives a kill, loading falls back to a whole checkpoint,
and a corrupt state.json or a config that does not fit the weights is one line, refused before allocating."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from condformer import checkpoint as ckpt
from condformer.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    load_for_inference,
    load_optimizer,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from condformer.config import ModelConfig
from condformer.errors import CheckpointError
from condformer.model import build_model


class Killed(BaseException):
    """The process dies here (a BaseException: no ``except Exception`` or ``ignore_errors`` swallows it)."""


def tiny() -> ModelConfig:
    return ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=32).validate()


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an optimizer with state; different seeds give different weights."""
    torch.manual_seed(seed)
    model = build_model(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))).loss.backward()
    opt.step()
    return model, opt


def save(run: Path, step: int, seed: int, keep: int = 2) -> Path:
    model, opt = trained(seed)
    return save_checkpoint(run, step, model, opt, {"seed": seed}, tiny(), None, keep=keep)


def loaded_seed(run: Path) -> tuple[int, int]:
    """(step, seed) of the checkpoint a restarted process loads; its weights and optimizer must be whole."""
    ck = read_checkpoint(run)
    model, opt = trained(ck.state["seed"])
    fresh = build_model(ck.model_cfg)
    load_weights(ck, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    load_optimizer(ck, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    return ck.state["step"], ck.state["seed"]


def kill_at(n: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the n-th file-system operation of the checkpoint code die (an rmtree dies halfway: one file gone)."""
    calls = [0]

    def wrap(fn, partial=None):
        def op(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if partial is not None:
                    partial(*args)
                raise Killed
            return fn(*args, **kwargs)

        return op

    def half_rmtree(path, *args):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if files:
            os.unlink(next((f for f in files if f.name == STATE_FILE), files[0]))

    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree, half_rmtree))
    monkeypatch.setattr(ckpt, "save_model", wrap(ckpt.save_model))
    monkeypatch.setattr(ckpt, "save_file", wrap(ckpt.save_file))
    monkeypatch.setattr(Path, "write_text", wrap(Path.write_text))
    return calls


SCENARIOS = {
    # name: (setup [(step, seed)], the save that is killed (step, seed), keep)
    "re-save the latest step": ([(3, 1), (5, 2)], (5, 3), 2),
    "save a new step and prune": ([(3, 1), (5, 2)], (7, 3), 2),
    "first save": ([], (1, 3), 2),
    "re-save, keep one": ([(5, 2)], (5, 3), 1),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_step_of_a_save_leaves_a_whole_checkpoint(scenario: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    setup, (step, seed), keep = SCENARIOS[scenario]
    template = tmp_path / "template"
    for s, sd in setup:
        save(template, s, sd, keep)
    old = setup[-1] if setup else None
    with monkeypatch.context() as m:  # count the operations of an undisturbed save
        calls = kill_at(0, m)
        shutil.copytree(template, tmp_path / "count") if template.exists() else None
        save(tmp_path / "count", step, seed, keep)
        n_ops = calls[0]
    assert n_ops >= 6
    for n in range(1, n_ops + 1):
        run = tmp_path / f"kill{n}"
        if template.exists():
            shutil.copytree(template, run)
        model, opt = trained(seed)
        with monkeypatch.context() as m:
            kill_at(n, m)
            with pytest.raises(Killed):
                save_checkpoint(run, step, model, opt, {"seed": seed}, tiny(), None, keep=keep)
        # the restarted process: the old checkpoint or the new one, whole
        if old is None and resolve_checkpoint(run) is None:
            pass  # killed before the first checkpoint existed: nothing to load, nothing claimed
        else:
            assert loaded_seed(run) in {old, (step, seed)}, f"killed at operation {n}"
        # and it can save again, after which the directory is tidy
        save(run, step, seed, keep)
        assert loaded_seed(run) == (step, seed)
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert not [x for x in names if x.startswith(".") and x != ".latest.tmp"], (n, names)
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"


def test_loading_falls_back_to_the_newest_whole_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(run, 3, 1)
    save(run, 5, 2)
    root = run / "checkpoints"
    (root / "latest").write_text("step-00000009\n")  # dangling
    assert loaded_seed(run) == (5, 2)
    (root / "step-00000005" / STATE_FILE).unlink()  # incomplete
    (root / "latest").write_text("step-00000005\n")
    assert loaded_seed(run) == (3, 1)
    (root / "latest").unlink()  # missing
    assert loaded_seed(run) == (3, 1)
    shutil.copytree(root / "step-00000003", root / ".tmp-step-00000008")  # a temp dir is never loaded
    assert loaded_seed(run) == (3, 1)
    os.rename(root / "step-00000003", root / ".old-step-00000003")  # an aside copy, the only whole one
    assert loaded_seed(run) == (3, 1)
    save(run, 6, 4)  # the next save puts it back in place, and prunes by whole checkpoints only
    assert sorted(p.name for p in root.iterdir() if ckpt._complete(p)) == ["step-00000003", "step-00000006"]
    assert loaded_seed(run) == (6, 4)


@pytest.mark.parametrize("state, needle", [
    ('{"step": "seven"}', "no valid step"), ('{"step": -1}', "no valid step"), ('{"step": 2.5}', "no valid step"),
    ('{"model": {}}', "no valid step"), ('{"step": true}', "no valid step"), ("[1, 2]", "unreadable"),
    ("{not json", "unreadable"), ("", "unreadable"),
])
def test_a_bad_state_json_is_one_line_naming_it(state: str, needle: str, tmp_path: Path) -> None:
    ck = save(tmp_path / "run", 2, 1)
    (ck / STATE_FILE).write_text(state)
    with pytest.raises(CheckpointError, match=needle) as e:
        read_checkpoint(tmp_path / "run")
    assert str(ck / STATE_FILE) in str(e.value) and "\n" not in str(e.value)


def _edit_model(ck: Path, **changes) -> None:
    state = json.loads((ck / STATE_FILE).read_text())
    state["model"].update(changes)
    (ck / STATE_FILE).write_text(json.dumps(state))


def test_a_config_asking_for_a_huge_model_is_refused_before_allocating(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ck = save(tmp_path / "run", 2, 1)
    _edit_model(ck, d_model=10**6, n_heads=2)  # ~10**13 parameters: allocating them would die out of memory
    import condformer.model as model_mod

    allocated, real_build = [], model_mod.build_model

    def watched(cfg):
        if torch.get_default_device().type != "meta":
            allocated.append(cfg.d_model)
        return real_build(cfg)

    monkeypatch.setattr(model_mod, "build_model", watched)
    with pytest.raises(CheckpointError, match="shape") as e:
        load_for_inference(tmp_path / "run")
    assert str(ck / MODEL_FILE) in str(e.value) and "\n" not in str(e.value)
    assert allocated == []


@pytest.mark.parametrize("changes, needle", [
    ({"n_layers": 2}, "lacks 'layers.1"), ({"tie_embeddings": False}, "lacks 'head.weight'"),
    ({"d_ff": 48}, "shape"),
])
def test_weights_that_do_not_fit_the_config_are_named(changes: dict, needle: str, tmp_path: Path) -> None:
    ck = save(tmp_path / "run", 2, 1)
    load_for_inference(tmp_path / "run")  # fits as saved (the tied head is stored once)
    _edit_model(ck, **changes)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_for_inference(tmp_path / "run")
    assert "\n" not in str(e.value)
