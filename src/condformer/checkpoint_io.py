"""The file-level pieces every checkpoint format shares: atomic writes, the tidy-up of killed saves, and the
reading of a checkpoint's JSON (configs and state, no tensors).

A leaf below :mod:`condformer.checkpoint` (single-file checkpoints, which re-exports these names) and
:mod:`condformer.parallel.sharded_checkpoint` (shard-per-rank checkpoints), so that the first can hand sharded
checkpoints to the second without an import circle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CheckpointError, ConfigError
from condformer.run_layout import STATE_FILE, _complete, resolve_checkpoint


@dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None
    state: dict[str, Any]  # step, tokenizer, data fingerprint, ...


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that a reader (or a kill) sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _discard(d: Path) -> None:
    """Delete a directory via a hidden name: a kill halfway through never leaves a partial ``step-*``."""
    if not d.name.startswith("."):
        hidden = d.with_name(f".del-{d.name}")
        shutil.rmtree(hidden, ignore_errors=True)
        os.rename(d, hidden)
        d = hidden
    shutil.rmtree(d, ignore_errors=True)


def _tidy(root: Path) -> None:
    """Finish what a killed save left: put an aside copy back if it is the only whole one, drop the rest."""
    for aside in sorted(root.glob(".old-step-*")):
        final = root / aside.name.removeprefix(".old-")
        if _complete(aside) and not _complete(final):
            if final.exists():
                _discard(final)
            os.rename(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for junk in [*root.glob(".tmp-step-*"), *root.glob(".del-*")]:
        shutil.rmtree(junk, ignore_errors=True)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's configs and state (not its tensors), with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist; pass a run directory written by `condformer train`")
    ck = resolve_checkpoint(p)
    if ck is None:
        raise CheckpointError(f"no checkpoint found in '{p}'; expected {STATE_FILE} or checkpoints/latest inside it")
    file = ck / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
        step = state.get("step")
        if type(step) is not int or step < 0:
            raise CheckpointError(f"'{file}' has no valid step (got {step!r}, expected an integer >= 0); "
                                  f"the checkpoint may be corrupt")
        model_cfg = ModelConfig.from_dict(state.pop("model")).validate()
        train_raw = state.pop("train")
        train_cfg = None if train_raw is None else TrainConfig.from_dict(train_raw)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{file}' is unreadable ({e}); the checkpoint may be corrupt") from None
    return Checkpoint(ck, model_cfg, train_cfg, state)


def publish_checkpoint(tmp: Path, final: Path, payload: dict[str, Any], keep: int) -> None:
    """Make the fully written ``tmp`` the checkpoint ``final``: ``state.json`` last, rename, ``latest``, prune.

    ``state.json`` (``payload``) is written last, so its presence marks the directory complete; an existing
    ``final`` (a re-save) is renamed aside and deleted only after ``latest`` names the new one, so a kill at any
    point leaves the old or the new checkpoint whole; then all but the newest ``keep`` complete checkpoints go.
    """
    root = final.parent
    aside = root / f".old-{final.name}"
    write_json_atomic(tmp / STATE_FILE, payload)
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    steps = sorted(p for p in root.glob("step-*") if _complete(p))  # an incomplete one never displaces a whole one
    for old in steps[:-keep]:
        if old != final:
            _discard(old)
