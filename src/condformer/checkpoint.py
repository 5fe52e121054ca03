"""Checkpoints: safetensors weights and optimizer tensors, JSON for everything else.

Layout of a run directory::

    RUN/config.json                       model + train config of the run
    RUN/log.jsonl                         one JSON object per logged step / evaluation
    RUN/checkpoints/step-00000500/        model.safetensors, optimizer.safetensors, state.json
    RUN/checkpoints/latest                name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed into place only when every file
is complete, and ``latest`` is replaced atomically after that, so a crash never leaves a half-written
checkpoint that a resume would load. Nothing is ever unpickled: tensors come from safetensors, the rest
from JSON, so loading an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CheckpointError, ConfigError

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
RNG_FILE = "rng.safetensors"  # torch's generator states: random training draws continue exactly on resume


@dataclass
class Checkpoint:
    path: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig | None
    state: dict[str, Any]  # step, tokenizer, data fingerprint, ...


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig | None,
                    keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` atomically, point ``latest`` at it, prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    meta: dict[str, Any] = {}
    if optimizer is not None:
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / OPTIM_FILE))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / RNG_FILE))
    payload = {"step": step, "model": model_cfg.to_dict(),
               "train": None if train_cfg is None else train_cfg.to_dict(), "optimizer": meta, **state}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if final.exists():  # re-saving the same step (e.g. after an interrupt): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    (root / "latest").parent.mkdir(exist_ok=True)
    tmp_latest = root / ".latest.tmp"
    tmp_latest.write_text(final.name + "\n", encoding="utf-8")
    os.replace(tmp_latest, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory from a run directory (its latest) or a checkpoint directory itself."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        cand = p / "checkpoints" / latest.read_text(encoding="utf-8").strip()
        if (cand / STATE_FILE).is_file():
            return cand
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's configs and state (not its tensors), with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist; pass a run directory written by `condformer train`")
    ck = resolve_checkpoint(p)
    if ck is None:
        raise CheckpointError(f"no checkpoint found in '{p}'; expected {STATE_FILE} or checkpoints/latest inside it")
    try:
        state = json.loads((ck / STATE_FILE).read_text(encoding="utf-8"))
        model_cfg = ModelConfig.from_dict(state.pop("model")).validate()
        train_raw = state.pop("train")
        train_cfg = None if train_raw is None else TrainConfig.from_dict(train_raw)
    except (json.JSONDecodeError, KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{ck}' has an unreadable {STATE_FILE} ({e}); it may be corrupt") from None
    return Checkpoint(ck, model_cfg, train_cfg, state)


def update_model_config(ck: Checkpoint, model_cfg: ModelConfig) -> None:
    """Replace the model config stored with a checkpoint (e.g. calibrated exit thresholds), atomically.

    The run's ``config.json`` beside ``checkpoints/`` is updated too when it exists, so a resumed run or a
    later ``generate`` sees the same config. The weights are untouched.
    """
    model_cfg.validate()
    state = json.loads((ck.path / STATE_FILE).read_text(encoding="utf-8"))
    state["model"] = model_cfg.to_dict()
    write_json_atomic(ck.path / STATE_FILE, state)
    run_config = ck.path.parent.parent / "config.json"
    if ck.path.parent.name == "checkpoints" and run_config.is_file():
        run = json.loads(run_config.read_text(encoding="utf-8"))
        run["model"] = model_cfg.to_dict()
        write_json_atomic(run_config, run)
    ck.model_cfg = model_cfg


def load_weights(ck: Checkpoint, model: torch.nn.Module) -> None:
    try:
        missing, unexpected = load_model(model, str(ck.path / MODEL_FILE), strict=False, device="cpu")
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read weights from '{ck.path / MODEL_FILE}': {e}") from None
    except RuntimeError as e:  # size mismatch
        raise CheckpointError(f"weights in '{ck.path}' do not fit the model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in '{ck.path}' do not match the config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


def load_rng_state(ck: Checkpoint) -> None:
    """Restore the generator states a training checkpoint saved (older checkpoints have none: no-op).

    Layer dropout, mixed exit training and noisy routing draw from torch's global generators; without
    this, a resumed run would draw different numbers from the step it resumes at.
    """
    path = ck.path / RNG_FILE
    if not path.is_file():
        return
    try:
        states = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the random-generator state '{path}': {e}") from None
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def load_optimizer(ck: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    meta = ck.state.get("optimizer") or {}
    if not meta:
        raise CheckpointError(f"checkpoint '{ck.path}' has no optimizer state; it cannot be resumed")
    try:
        tensors = load_file(str(ck.path / OPTIM_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read optimizer state from '{ck.path / OPTIM_FILE}': {e}") from None
    optimizer.load_state_dict(optimizer_from_flat(tensors, meta))


def load_for_inference(path: str | Path) -> tuple[Checkpoint, torch.nn.Module, Any]:
    """A run directory or checkpoint as (checkpoint, model in eval mode on the GPU if any, tokenizer or None)."""
    from condformer.data import tokenizer_from_dict
    from condformer.model import build_model

    ck = read_checkpoint(path)
    model = build_model(ck.model_cfg)
    load_weights(ck, model)
    if torch.cuda.is_available():
        model = model.cuda()
    tok = tokenizer_from_dict(ck.state["tokenizer"]) if "tokenizer" in ck.state else None
    return ck, model.eval(), tok
