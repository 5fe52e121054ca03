"""Checkpoints: safetensors weights and optimizer tensors, JSON for everything else.

Layout of a run directory::

    RUN/config.json                       model + train config of the run
    RUN/log.jsonl                         one JSON object per logged step / evaluation
    RUN/checkpoints/step-00000500/        model.safetensors, optimizer.safetensors, state.json
    RUN/checkpoints/latest                name of the newest complete checkpoint
    RUN/.lock                             flock'ed by the one process training there

Every file-system step of a save is crash-safe (tested by failing each one in turn): a checkpoint is
written under ``.tmp-step-N`` (its ``state.json`` last, so that file marks it complete) and renamed into
place; an existing ``step-N`` is first renamed aside to ``.old-step-N``, never deleted before its
replacement is in place; ``latest`` is replaced atomically; old checkpoints are renamed to ``.del-*``
before they are deleted, so a half-deleted one never looks like a checkpoint. The next save tidies what
a killed one left, and loading falls back to the newest complete checkpoint when ``latest`` is missing or
names nothing complete. Nothing is ever unpickled: tensors come from safetensors, the rest from JSON, so
loading an untrusted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from condformer.checkpoint_io import (  # noqa: F401  (re-exported: the names callers have always imported from here)
    Checkpoint,
    _discard,
    _tidy,
    publish_checkpoint,
    read_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CheckpointError, TrainingError
from condformer.run_layout import (  # noqa: F401
    MODEL_FILE,
    SHARDED_DIR,
    SHARDED_INDEX,
    STATE_FILE,
    _complete,
    _step_of,
    resolve_checkpoint,
)

OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"  # torch's generator states: random training draws continue exactly on resume


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
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` crash-safely, point ``latest`` at it, prune old ones.

    Re-saving an existing step (a resume of a finished run, a Ctrl-C right after a periodic checkpoint)
    renames the old copy aside and deletes it only after ``latest`` names the new one, so a kill at any
    point leaves the old or the new checkpoint whole.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _tidy(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
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
    publish_checkpoint(tmp, final, payload, keep)
    return final



def check_new_run_dir(out: Path, what: str) -> None:
    """``out`` may become a new run: absent or an empty directory (``what`` names the command in the error)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"'{out}' already exists and is not empty; choose another --out ({what} never "
                              f"overwrites a run)")


def write_new_run(out: Path, model: torch.nn.Module, state: dict[str, Any], model_cfg: ModelConfig,
                  train_cfg: TrainConfig | None, what: str) -> None:
    """A whole run at ``out`` (config.json and a step-0 checkpoint), or nothing: it is assembled in a hidden
    sibling directory and renamed into place, so a failure at any point leaves no ``out`` behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{what}-"))
    try:
        payload = {"model": model_cfg.to_dict(), "train": None if train_cfg is None else train_cfg.to_dict()}
        write_json_atomic(tmp / "config.json", payload)
        save_checkpoint(tmp, 0, model, None, state, model_cfg, train_cfg)
        with contextlib.suppress(OSError):
            out.rmdir()  # an empty directory given as --out
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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


def check_weights_fit(ck: Checkpoint, model_cfg: ModelConfig | None = None) -> None:
    """Refuse weights whose names or shapes differ from the config's model, before that model is allocated.

    A config asking for a huge model (a corrupt or hand-edited ``d_model: 1000000``) would otherwise be
    allocated, and die out of memory, before the weights are read. The safetensors header (names and
    shapes, no data) and a model built on the meta device cost next to nothing.
    """
    from condformer.model import build_model

    if _is_sharded(ck.path):
        from condformer.parallel.sharded_checkpoint import check_sharded_fit

        check_sharded_fit(ck.path, model_cfg or ck.model_cfg)
        return
    path = ck.path / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights from '{path}': {e}") from None
    with torch.device("meta"):
        expected = build_model(model_cfg or ck.model_cfg).state_dict(keep_vars=True)
    for name, shape in saved.items():
        if name not in expected:
            raise CheckpointError(f"'{path}' holds '{name}', which the config's model has not; "
                                  f"the config does not match the weights")
        if tuple(expected[name].shape) != shape:
            raise CheckpointError(f"'{path}' holds '{name}' of shape {list(shape)}, the config implies "
                                  f"{list(expected[name].shape)}; the config does not match the weights")
    stored = {id(expected[name]) for name in saved}  # tied tensors are stored once, under one of their names
    missing = [name for name, t in expected.items() if id(t) not in stored]
    if missing:
        raise CheckpointError(f"'{path}' lacks '{missing[0]}', which the config's model needs; "
                              f"the config does not match the weights")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` for the whole run (rank 0: the only rank that writes).

    Two trainers on one directory would mix their logs and replace each other's checkpoints and
    config.json. The kernel drops the lock when the process dies, so a killed run leaves no stale lock.
    """
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrainingError(f"cannot use '{out}' as a run directory: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"another process is training in '{out}'; wait for it to finish or choose "
                                f"another --out") from None
        yield
    finally:
        os.close(fd)


def check_run_dir(out: Path, resume: bool) -> None:
    """One-line errors for a run directory that cannot be used as asked, raised before anything is written."""
    has_checkpoint = resolve_checkpoint(out) is not None
    if resume and not has_checkpoint and not (out / "config.json").is_file():
        what = "does not exist" if not out.exists() else "holds no checkpoint"
        raise CheckpointError(f"cannot resume '{out}': it {what}; start a new run there without --resume")
    if not resume and has_checkpoint:
        raise CheckpointError(
            f"'{out}' already holds checkpoints; pass --resume to continue it or choose another --out"
        )


def _is_sharded(ckpt_dir: Path) -> bool:
    """A checkpoint written shard by shard (``condformer.parallel.sharded_checkpoint``) and not consolidated."""
    return not (ckpt_dir / MODEL_FILE).is_file() and (ckpt_dir / SHARDED_DIR / SHARDED_INDEX).is_file()


def load_weights(ck: Checkpoint, model: torch.nn.Module) -> None:
    """The checkpoint's weights into ``model`` (whole, unsharded), from its single file or from its shards.

    A sharded checkpoint is read through ``torch.distributed.checkpoint`` (collective when a process group is
    up: call it on every rank), so every command that reads a run (eval, generate, export, inspect, convert,
    ``train --init-from``) takes a sharded run as it is.
    """
    if _is_sharded(ck.path):
        from condformer.parallel.sharded_checkpoint import load_sharded

        load_sharded(ck.path, model, None, rng=False)
        return
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


def read_optimizer_state(ck: Checkpoint) -> dict[str, Any]:
    """A single-file checkpoint's optimizer state as torch's ``state_dict()`` layout (parameters numbered)."""
    meta = ck.state.get("optimizer") or {}
    if not meta:
        raise CheckpointError(f"checkpoint '{ck.path}' has no optimizer state; it cannot be resumed")
    try:
        tensors = load_file(str(ck.path / OPTIM_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read optimizer state from '{ck.path / OPTIM_FILE}': {e}") from None
    return optimizer_from_flat(tensors, meta)


def load_optimizer(ck: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(read_optimizer_state(ck))


def load_for_inference(path: str | Path) -> tuple[Checkpoint, torch.nn.Module, Any]:
    """A run directory or checkpoint as (checkpoint, model in eval mode on the GPU if any, tokenizer or None)."""
    from condformer.data import tokenizer_from_dict
    from condformer.model import build_model

    ck = read_checkpoint(path)
    check_weights_fit(ck)
    model = build_model(ck.model_cfg)
    load_weights(ck, model)
    if torch.cuda.is_available():
        model = model.cuda()
    tok = tokenizer_from_dict(ck.state["tokenizer"]) if "tokenizer" in ck.state else None
    return ck, model.eval(), tok
