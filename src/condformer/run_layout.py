"""Where a run directory keeps its checkpoints, and which one is current: paths and JSON only (a leaf).

Kept apart from :mod:`condformer.checkpoint` (torch, safetensors) so that anything may find a run's newest
checkpoint, e.g. the data layer reading the tokenizer a run was trained with (``--tokenizer run:PATH``),
without importing the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from condformer.errors import CheckpointError

MODEL_FILE, STATE_FILE = "model.safetensors", "state.json"
# a sharded checkpoint (condformer.parallel.sharded_checkpoint): DCP's safetensors shards and their JSON index
SHARDED_DIR, SHARDED_INDEX = "sharded", "index.json"


def _complete(d: Path) -> bool:
    """Whether ``d`` is a whole checkpoint: ``state.json`` is written last (atomically), after the weights.

    The weights are one ``model.safetensors`` or, for a sharded save, ``sharded/index.json``, which is itself
    written only once every rank's shards are (and ``state.json`` only after that).
    """
    weights = (d / MODEL_FILE).is_file() or (d / SHARDED_DIR / SHARDED_INDEX).is_file()
    return (d / STATE_FILE).is_file() and weights


def _step_of(d: Path) -> int | None:
    digits = d.name.rsplit("-", 1)[-1]
    return int(digits) if d.name.rsplit("-", 1)[0] in ("step", ".old-step") and digits.isdigit() else None


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory from a run directory or a checkpoint directory itself.

    A run's ``latest`` when it names a complete checkpoint; otherwise (a save killed midway) the newest
    complete ``step-*``, or the aside copy ``.old-step-*`` of a re-save when it is the only whole one.
    """
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    root = p / "checkpoints"
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if name.startswith("step-") and _complete(root / name):
            return root / name
    found = [(step, d.name.startswith("step-"), d) for d in (root.glob("*step-*") if root.is_dir() else [])
             if (step := _step_of(d)) is not None and _complete(d)]
    return max(found)[2] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of a run's (or a checkpoint directory's) current checkpoint, with one-line errors."""
    ck = resolve_checkpoint(path)
    if ck is None:
        raise CheckpointError(f"no checkpoint found in '{path}'; expected {STATE_FILE} or checkpoints/latest inside it")
    try:
        state = json.loads((ck / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{ck / STATE_FILE}' is unreadable ({e}); the checkpoint may be corrupt") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{ck / STATE_FILE}' is not a JSON object; the checkpoint may be corrupt")
    return state
