"""Sharded checkpoints: every rank saves and loads only its own shards, through ``torch.distributed.checkpoint``.

A run sharded with FSDP2 cannot afford to gather the whole model (and twice its size in AdamW moments) on one
rank to write the single-file checkpoint of :mod:`condformer.checkpoint`. Here each rank hands its DTensor
shards to DCP (``dcp.save``/``dcp.load``, PyTorch's own planner and collectives), which plans who writes
what, dedups replicated tensors and, on load, reads whichever saved chunks overlap each rank's new shards,
so a checkpoint saved on N ranks resumes on M (https://pytorch.org/docs/stable/distributed.checkpoint.html).

Never a pickle. DCP's default ``FileSystemWriter`` pickles its ``.metadata`` (and ``FileSystemReader``
unpickles it), which would let a crafted checkpoint run code. We use DCP's storage-layer extension point
instead: ``HuggingFaceStorageWriter``/``Reader`` (torch >= 2.8) with ``save_distributed=True`` write each
rank's chunks to one safetensors file whose header records every chunk's global offsets as JSON. Two thin
subclasses add what they lack for training checkpoints: the writer's ``finish`` (run once, on the
coordinator, after every rank wrote) records an ``index.json`` (each tensor's global shape and dtype, each
chunk's file and offsets, each file's size, the tied names), and the reader builds DCP's ``Metadata`` from
that JSON instead of scanning every shard's header on every rank. Non-tensor state goes to ``state.json``.

Layout, beside the single-file one (see :mod:`condformer.checkpoint`)::

    RUN/checkpoints/step-00000500/state.json            JSON: step, configs, optimizer param_groups, caller state
    RUN/checkpoints/step-00000500/sharded/index.json    JSON: tensors, chunks, files (written after the shards)
    RUN/checkpoints/step-00000500/sharded/shard-*.safetensors   one per saving rank: model, AdamW moments, RNG

Keys inside the shards: ``model.<fqn>`` (tied names stored once, under the name ``safetensors.save_model``
would keep), ``optim.<fqn>.<state>`` (``exp_avg``, ``exp_avg_sq``, ``step``) and ``rng.<rank>.<device>``
(each saving rank's generator states, restored when the loading world size is the same).

Crash safety is the single-file scheme's: rank 0 prepares ``.tmp-step-N``, every rank writes into it, and
only after DCP returned on every rank (its final step gathers every rank's write results) does rank 0 write
``state.json`` last, rename the directory into place and replace ``latest``. Each phase ends with a tiny
all-reduce of per-rank failure flags, so an error on any rank becomes one ``CheckpointError`` on every rank
instead of a hang in the next collective. Assumes, like DCP's file-system storage, that every rank sees the
same file system at the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.storage import WriteResult

from condformer.checkpoint_io import Checkpoint, _tidy, publish_checkpoint, read_checkpoint, write_json_atomic
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CheckpointError
from condformer.run_layout import MODEL_FILE, SHARDED_DIR, SHARDED_INDEX, STATE_FILE, resolve_checkpoint

INDEX_FORMAT = "condformer-sharded-safetensors"
INDEX_VERSION = 1
MODEL, OPTIM, RNG = "model.", "optim.", "rng."


# -- ranks agreeing on failures -------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) in a plain single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one plain process is a supported use here."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flag_device() -> torch.device:
    """Where the failure flags live: the CPU under gloo, this rank's GPU under NCCL (which moves no CPU tensors)."""
    backend = str(dist.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _agree(error: str | None, what: str) -> None:
    """Raise on every rank when any rank failed ``what``: the failing rank with its own one-line message.

    One all-reduce of a per-rank flag vector: it also serves as the barrier between the phases of a save.
    """
    rank, world = _rank_world()
    if world > 1:
        flags = torch.zeros(world, dtype=torch.int32, device=_flag_device())
        flags[rank] = int(error is not None)
        dist.all_reduce(flags)
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        if error is None and failed:
            raise CheckpointError(f"{what} failed on rank {failed[0]} (its error is in that rank's output)")
    if error is not None:  # this rank's own failure: the CLI prints it on this rank too
        raise CheckpointError(error).on_this_rank()


def _attempt(fn: Callable[[], Any], describe: Callable[[BaseException], str]) -> str | None:
    """Run ``fn``; a failure becomes its one-line description (to be agreed on), never an unhandled raise.

    Every exception is caught on purpose: one rank leaving early while the others enter the next collective
    is a hang until the process group's timeout, whatever the exception's type.
    """
    try:
        fn()
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (see the docstring)
        return describe(e)
    return None


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of an exception; for DCP's CheckpointException, of the first failing rank's cause."""
    if isinstance(e, CheckpointException) and e.failures:
        rank = min(e.failures)
        cause = e.failures[rank][0]
        return f"rank {rank}: {_first_line(cause)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- the storage layer: HF safetensors shards plus a JSON index -----------------------------------


class ShardWriter(HuggingFaceStorageWriter):
    """One safetensors file per rank (DCP's HF writer, distributed mode), plus ``index.json`` when all are written.

    DCP calls ``finish`` on the coordinator only, after gathering every rank's ``WriteResult``s, so the
    index never describes a shard that is still being written.
    """

    def __init__(self, path: str | Path, aliases: dict[str, str]) -> None:
        super().__init__(str(path), save_distributed=True, enable_consolidation=False)
        self.aliases = aliases

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        where = {(wr.index.fqn, tuple(wr.index.offset or ())): wr.storage_data.relative_path
                 for per_rank in results for wr in per_rank}
        tensors: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"'{fqn}' is not a tensor; only tensors go to the shards (the rest is JSON)")
            chunks = [{"file": where[(fqn, tuple(c.offsets))], "offsets": list(c.offsets), "sizes": list(c.sizes)}
                      for c in md.chunks]
            tensors[fqn] = {"dtype": str(md.properties.dtype).removeprefix("torch."), "shape": list(md.size),
                            "chunks": chunks}
        folder = Path(self.path)
        files = sorted({c["file"] for t in tensors.values() for c in t["chunks"]})
        index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "world_size": len(results),
                 "files": {f: (folder / f).stat().st_size for f in files}, "aliases": self.aliases,
                 "tensors": tensors}
        write_json_atomic(folder / SHARDED_INDEX, index)


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the sharded index; the checkpoint may be corrupt")
    return dtype


class ShardReader(HuggingFaceStorageReader):
    """DCP's HF reader (``safe_open`` slices, no unpickling) with its ``Metadata`` built from ``index.json``.

    The index, not a listing of the folder, says which files and chunks make the checkpoint: a stray file
    cannot add chunks, and no rank opens every shard's header just to plan its reads.
    """

    def __init__(self, path: str | Path, index: dict[str, Any]) -> None:
        super().__init__(str(path))
        self.index = index

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        folder = Path(self.path)
        tensors_md: dict[str, Any] = {}
        storage: dict[MetadataIndex, _HFStorageInfo] = {}
        for fqn, t in self.index["tensors"].items():
            dtype = _dtype(t["dtype"])
            chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                      for c in t["chunks"]]
            tensors_md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(t["shape"]), chunks)
            for c in t["chunks"]:
                storage[MetadataIndex(fqn, c["offsets"])] = _HFStorageInfo(
                    relative_path=str(folder / c["file"]), shape=torch.Size(c["sizes"]), dtype=dtype)
        metadata = Metadata(state_dict_metadata=tensors_md, storage_data=storage)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


# -- reading and checking an index ----------------------------------------------------------------


def is_sharded(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` (a checkpoint directory) holds a sharded save (``sharded/index.json``)."""
    return (Path(ckpt_dir) / SHARDED_DIR / SHARDED_INDEX).is_file()


def read_index(ckpt_dir: str | Path) -> dict[str, Any]:
    """The JSON index of a sharded checkpoint, checked for shape and for every file it names, one-line errors."""
    folder = Path(ckpt_dir) / SHARDED_DIR
    path = folder / SHARDED_INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{ckpt_dir}' is not a sharded checkpoint (no {SHARDED_DIR}/{SHARDED_INDEX}); "
                              f"load it with the single-file loader") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is unreadable ({e}); the checkpoint may be corrupt") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise CheckpointError(f"'{path}' is not a condformer sharded index; the checkpoint may be corrupt")
    if index.get("version") != INDEX_VERSION:
        raise CheckpointError(f"'{path}' has index version {index.get('version')!r}, this condformer reads "
                              f"{INDEX_VERSION}; use the condformer version that wrote it")
    try:
        for name, size in index["files"].items():
            if Path(name).name != name:
                raise CheckpointError(f"'{path}' names the file '{name}' outside its folder; the checkpoint is corrupt")
            found = (folder / name).stat().st_size if (folder / name).is_file() else None
            if found != size:
                what = "is missing" if found is None else f"has {found} bytes, the index says {size}"
                raise CheckpointError(f"shard '{folder / name}' {what}; the checkpoint is incomplete or corrupt")
        for fqn, t in index["tensors"].items():
            if sum(math.prod(c["sizes"]) for c in t["chunks"]) != math.prod(t["shape"]) or any(
                    c["file"] not in index["files"] for c in t["chunks"]):
                raise CheckpointError(f"'{path}': the chunks of '{fqn}' do not cover its shape {t['shape']}; "
                                      f"the checkpoint is incomplete or corrupt")
        if not isinstance(index["aliases"], dict):
            raise TypeError("aliases is not an object")
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{path}' is malformed ({type(e).__name__}: {e}); the checkpoint may be "
                              f"corrupt") from None
    return index


def _check_fit(index: dict[str, Any], wanted: dict[str, torch.Size], where: Path, optimizer: bool) -> None:
    """One-line refusal of a checkpoint whose names or global shapes differ from the model (and optimizer)."""
    saved = index["tensors"]
    for key, shape in wanted.items():
        if key not in saved:
            raise CheckpointError(f"checkpoint '{where}' lacks '{key}', which the model needs; the config does not "
                                  f"match the checkpoint")
        if list(saved[key]["shape"]) != list(shape):
            raise CheckpointError(f"checkpoint '{where}' holds '{key}' of shape {saved[key]['shape']}, the model "
                                  f"has {list(shape)}; the config does not match the checkpoint")
    for key in saved:
        if key.startswith(MODEL) and key not in wanted:
            raise CheckpointError(f"checkpoint '{where}' holds '{key}', which the model has not; the config does "
                                  f"not match the checkpoint")
        if optimizer and key.startswith(OPTIM) and key not in wanted:
            raise CheckpointError(f"checkpoint '{where}' holds optimizer state '{key}' for a parameter this run does "
                                  f"not train; resume with the run's saved settings")


def check_sharded_fit(ckpt_dir: str | Path, model_cfg: ModelConfig) -> None:
    """Refuse a sharded checkpoint whose weights differ from ``model_cfg``'s model, before allocating that model.

    The sharded twin of :func:`condformer.checkpoint.check_weights_fit`: names and shapes from the index,
    the expected ones from a model built on the meta device (no memory).
    """
    from condformer.model import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    sd = model.state_dict()
    aliases = _aliases(model)
    wanted = {MODEL + k: v.shape for k, v in sd.items() if k not in aliases}
    _check_fit(read_index(ckpt_dir), wanted, Path(ckpt_dir), optimizer=False)


# -- tied names -----------------------------------------------------------------------------------


_WRAPPERS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{dropped name: kept name}`` for tied tensors (``head.weight`` is ``embed.weight``), by identity.

    safetensors refuses tensors that share memory, and ``save_model`` keeps the sorted-first name of each
    tied group: keeping the same one lets a consolidated file load with the single-file loader. Found from
    the module's parameters (not from storage pointers of local shards, which an empty shard would hide on
    one rank and not on another), with the segments that wrappers insert dropped as DCP's state-dict API
    drops them (``torch.compile``'s ``_orig_mod``, activation checkpointing's ``_checkpoint_wrapped_module``).
    """
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        clean = ".".join(part for part in name.split(".") if part not in _WRAPPERS)
        groups.setdefault(id(t), []).append(clean)
    return {n: sorted(set(names))[0] for names in groups.values() for n in sorted(set(names))[1:]}


# -- what goes into the shards --------------------------------------------------------------------


def _rng_tensors(rank: int) -> dict[str, torch.Tensor]:
    """This rank's generator states: layer dropout and noisy routing draw from them."""
    states = {f"{RNG}{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states[f"{RNG}{rank}.cuda"] = torch.cuda.get_rng_state()
    return states


def _split_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """FQN-keyed optimizer state as flat ``optim.<fqn>.<key>`` tensors, and its non-tensor values (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, st in osd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{OPTIM}{fqn}.{key}"] = val
            else:
                scalars.setdefault(fqn, {})[key] = val
    return tensors, scalars


def _jsonable_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """param_groups for state.json: hyperparameters (0-dim tensors as numbers) and parameter FQNs."""
    out = []
    for g in groups:
        out.append({k: (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v) for k, v in g.items()})
    try:
        json.dumps(out)
    except TypeError as e:
        raise CheckpointError(f"the optimizer's param_groups cannot be saved as JSON ({e})") from None
    return out


def _gather_for_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                     rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(flat tensors to save, tied names, optimizer JSON) from this rank's shards: no gathering."""
    msd = get_model_state_dict(model)
    aliases = _aliases(model)
    flat = {MODEL + k: v for k, v in msd.items() if k not in aliases}
    meta: dict[str, Any] = {}
    if optimizer is not None:
        fresh = not optimizer.state
        osd = get_optimizer_state_dict(model, optimizer)
        if fresh:  # DCP's state-dict API initialised the moments with a zero step; a fresh optimizer has none
            optimizer.state.clear()
            osd["state"] = {}
        tensors, scalars = _split_optimizer_state(osd)
        flat.update(tensors)
        meta = {"param_groups": _jsonable_groups(osd["param_groups"]), "scalars": scalars}
    _expert_shards_as_global(model, flat)
    flat.update(_rng_tensors(rank))
    return flat, aliases, meta


def _expert_shards_as_global(model: torch.nn.Module, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace expert-parallel shards in ``flat`` (weights and their AdamW moments) by DTensor views of their global
    tensors, in place; returns the replaced local tensors (which a load fills through the views).

    Expert parallelism keeps plain (E/ep, ...) tensors under the unsharded names (see
    :mod:`condformer.parallel.expert_checkpoint`); as views, each expert is saved once with its global shape and a
    checkpoint loads on any ep size, or into one unsharded process.
    """
    if not any(getattr(m, "expert_parallel", None) is not None for m in model.modules()):
        return {}
    from condformer.parallel.expert_checkpoint import expert_views

    views = expert_views(model)
    originals: dict[str, torch.Tensor] = {}
    for key, t in list(flat.items()):
        if key.startswith(MODEL):
            fqn = key.removeprefix(MODEL)
        elif key.startswith(OPTIM):
            fqn = key.removeprefix(OPTIM).rsplit(".", 1)[0]
        else:
            continue
        if fqn in views and isinstance(t, torch.Tensor) and t.dim() > 0:  # AdamW's step count stays a scalar
            originals[key] = t
            flat[key] = views[fqn](t)
    return originals


# -- save -----------------------------------------------------------------------------------------


def save_sharded(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 state: dict[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig | None,
                 keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX`` as a sharded checkpoint; collective: every rank calls it.

    Each rank writes only its own shards (FSDP2 DTensors, or plain tensors split between ranks by DCP's
    dedup when replicated). ``state`` (JSON) is stored in ``state.json`` with the step, the configs and the
    optimizer's param_groups, as the single-file checkpoint does. Crash-safe like it: nothing becomes a
    checkpoint that :func:`~condformer.run_layout.resolve_checkpoint` picks until every rank has written.
    Returns the checkpoint directory on every rank.
    """
    rank, _ = _rank_world()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
        (tmp / SHARDED_DIR).mkdir(parents=True)

    _agree(_attempt(prepare, lambda e: f"cannot prepare '{tmp}': {_first_line(e)}") if rank == 0 else None,
           f"preparing '{tmp}'")
    gathered: list[tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]] = []
    _agree(_attempt(lambda: gathered.append(_gather_for_save(model, optimizer, rank)),
                    lambda e: f"cannot collect the state to save: {_first_line(e)}"), "collecting the state to save")
    flat, aliases, meta = gathered[0]
    try:
        with _single_process_quiet():
            dcp.save(flat, storage_writer=ShardWriter(tmp / SHARDED_DIR, aliases))
    except CheckpointException as e:  # raised on every rank together: DCP gathers each rank's failure
        raise CheckpointError(f"saving the sharded checkpoint '{final.name}' failed on {_first_line(e)}; "
                              f"the previous checkpoint is still the current one") from None

    def publish() -> None:
        payload = {"step": step, "model": model_cfg.to_dict(),
                   "train": None if train_cfg is None else train_cfg.to_dict(), "optimizer": meta, **state}
        publish_checkpoint(tmp, final, payload, keep)

    _agree(_attempt(publish, lambda e: f"cannot publish '{final}': {_first_line(e)}") if rank == 0 else None,
           f"publishing '{final}'")
    return final


# -- load -----------------------------------------------------------------------------------------


def _resolve(ckpt_dir: str | Path) -> Path:
    ck = resolve_checkpoint(ckpt_dir)
    if ck is None:
        raise CheckpointError(f"no checkpoint found in '{ckpt_dir}'; expected {STATE_FILE} or checkpoints/latest "
                              f"inside it")
    return ck


def _read_all(ckpt_dir: str | Path) -> tuple[Checkpoint, dict[str, Any]]:
    ck = read_checkpoint(_resolve(ckpt_dir))
    return ck, read_index(ck.path)


def _optimizer_plan(model: torch.nn.Module, optimizer: torch.optim.Optimizer, index: dict[str, Any],
                    meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The optimizer's current FQN-keyed state dict, and the tensors of it that the checkpoint holds.

    A parameter that never received a gradient before the save (an exit outside the curriculum so far) has
    no saved moments; it keeps none after the load either, so its first update starts them as a fresh run.
    """
    if not meta.get("param_groups"):
        raise CheckpointError("the checkpoint has no optimizer state; it cannot be resumed")
    osd = get_optimizer_state_dict(model, optimizer)  # initialises the moments (zero-lr step) to load into
    if not osd["state"] and any(k.startswith(OPTIM) for k in index["tensors"]):
        raise CheckpointError("the optimizer holds gradients but no state, so its moments cannot be loaded; "
                              "load the checkpoint before the first backward pass")
    tensors, _ = _split_optimizer_state(osd)
    return osd, {k: v for k, v in tensors.items() if k in index["tensors"]}


def load_sharded(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 rng: bool = True) -> Checkpoint:
    """Load a sharded checkpoint (or a run's current one) into ``model`` (and ``optimizer``); collective.

    The model may be sharded differently from the saving run (another world size, FSDP2 or not: one
    process without a process group loads into a plain model): DCP reads, on each rank, the saved chunks
    that overlap its own shards. Names and global shapes are checked against the index first; any
    mismatch, on any rank, is one ``CheckpointError`` on every rank. ``rng``: restore this rank's random
    generators when the world size is the one that saved (with another, the draws cannot continue as an
    uninterrupted run's would anyway). Returns the checkpoint (configs and JSON state).
    """
    rank, world = _rank_world()
    found: list[tuple[Checkpoint, dict[str, Any]]] = []
    _agree(_attempt(lambda: found.append(_read_all(ckpt_dir)),
                    lambda e: f"cannot read checkpoint '{ckpt_dir}': {_first_line(e)}"), "reading the checkpoint")
    ck, index = found[0]
    msd = get_model_state_dict(model)
    aliases = _aliases(model)
    flat = {MODEL + k: v for k, v in msd.items() if k not in aliases}
    meta: dict[str, Any] = ck.state.get("optimizer") or {}
    plan: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

    locals_: dict[str, torch.Tensor] = {}

    def check() -> None:
        if optimizer is not None:
            plan.append(_optimizer_plan(model, optimizer, index, meta))
            flat.update(plan[0][1])
        locals_.update(_expert_shards_as_global(model, flat))
        _check_fit(index, {k: v.shape for k, v in flat.items()}, ck.path, optimizer is not None)

    _agree(_attempt(check, lambda e: f"checkpoint '{ck.path}' does not fit the model: {_first_line(e)}"),
           "checking the checkpoint")
    same_world = index["world_size"] == world
    if rng and same_world:
        flat.update({k: v.clone() for k, v in _rng_tensors(rank).items() if k in index["tensors"]})
    try:
        with _single_process_quiet():
            dcp.load(flat, storage_reader=ShardReader(ck.path / SHARDED_DIR, index))
    except CheckpointException as e:
        raise CheckpointError(f"loading '{ck.path}' failed on {_first_line(e)}") from None

    flat.update(locals_)  # the expert shards, filled through their global views

    def apply() -> None:
        full = {k.removeprefix(MODEL): v for k, v in flat.items() if k.startswith(MODEL)}
        full.update({alias: full[kept] for alias, kept in aliases.items()})
        set_model_state_dict(model, full)
        if optimizer is not None:
            _apply_optimizer(model, optimizer, plan[0][0], flat, meta)
        if rng and same_world:
            _restore_rng(flat, rank)

    _agree(_attempt(apply, lambda e: f"checkpoint '{ck.path}' does not fit the model: {_first_line(e)}"),
           "applying the checkpoint")
    return ck


def _apply_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any],
                     flat: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Hand the loaded moments and the saved hyperparameters (JSON param_groups) to the optimizer."""
    state: dict[str, dict[str, Any]] = {}
    for fqn, st in osd["state"].items():
        loaded = {k: flat[f"{OPTIM}{fqn}.{k}"] for k in st if f"{OPTIM}{fqn}.{k}" in flat}
        loaded.update(meta.get("scalars", {}).get(fqn, {}))
        if loaded:
            state[fqn] = loaded
    # strict=False: parameters without saved moments (never updated before the save) keep none
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(strict=False))


def _restore_rng(flat: dict[str, torch.Tensor], rank: int) -> None:
    if f"{RNG}{rank}.cpu" in flat:
        torch.set_rng_state(flat[f"{RNG}{rank}.cpu"])
    if f"{RNG}{rank}.cuda" in flat and torch.cuda.is_available():
        torch.cuda.set_rng_state(flat[f"{RNG}{rank}.cuda"])


# -- consolidate ----------------------------------------------------------------------------------


def _full_tensors(folder: Path, index: dict[str, Any], prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Each ``prefix`` tensor of the index assembled from its chunks, read with ``safe_open`` slices."""
    handles: dict[str, Any] = {}
    try:
        for key, t in sorted(index["tensors"].items()):
            if not key.startswith(prefix):
                continue
            full = torch.empty(t["shape"], dtype=_dtype(t["dtype"]))
            for c in t["chunks"]:
                if math.prod(c["sizes"]) == 0:
                    continue
                if c["file"] not in handles:
                    handles[c["file"]] = safe_open(str(folder / c["file"]), framework="pt")
                region = tuple(slice(o, o + s) for o, s in zip(c["offsets"], c["sizes"], strict=True))
                full[region] = handles[c["file"]].get_tensor(key)
            yield key.removeprefix(prefix), full
    finally:
        handles.clear()


def consolidate(ckpt_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write a sharded checkpoint's model as one ``model.safetensors`` (unsharded names and shapes).

    Runs in one process, with or without a process group (it uses none): the export and inference tools
    read single files. Tied names are stored once, as ``safetensors.torch.save_model`` stores them, so
    :func:`condformer.checkpoint.load_weights` reads the result. ``out_file`` defaults to the checkpoint's
    own ``model.safetensors``, which makes it loadable by every single-file tool. Written atomically.
    """
    ck = _resolve(ckpt_dir)
    index = read_index(ck)
    out = Path(out_file) if out_file is not None else ck / MODEL_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tensors = dict(_full_tensors(ck / SHARDED_DIR, index, MODEL))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot consolidate '{ck}' into '{out}': {_first_line(e)}") from None
    return out
