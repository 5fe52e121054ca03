"""The training loop: AdamW, warmup + cosine, accumulation, budgets, evaluation, checkpoints, DDP.

Resuming continues *exactly*: batches are a pure function of (seed, step, rank) (see
``TokenData.get_batch``) and MLM masks of (seed, step), so the only state is the weights, the optimizer
and the step, all in the checkpoint. A stopped-and-resumed run logs the same rows as an uninterrupted
one (tested): a Ctrl-C is held until the step under way is applied and logged, and a resume drops the
rows logged after its checkpoint and first runs an evaluation that the interruption cut short.

A resume continues with the run's *saved* configs (its schedule, data and model cannot change midway
and still continue exactly); settings given that differ from them are named on stderr as ignored. A
finished run resumed trains no steps: to train longer, start a new run with the larger budget.

A run directory is locked (``RUN/.lock``, ``flock``) for the whole run: a second trainer on it gets a
one-line error instead of interleaving its log and checkpoints with the first one's.

Multi-process: launch with ``torchrun --nproc_per_node=N -m condformer.cli train ...``; each rank takes
its slice of the global batch, DDP averages gradients (gloo on CPU, NCCL on GPU), rank 0 writes logs and
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from condformer.checkpoint import (
    Checkpoint,
    check_run_dir,
    check_weights_fit,
    read_checkpoint,
    resolve_checkpoint,
    run_lock,
    write_json_atomic,
    write_text_atomic,
)
from condformer.config import EXECUTION_SETTINGS, ModelConfig, TrainConfig
from condformer.data import TokenData, prepare_data, tokenizer_from_dict
from condformer.errors import ConfigError, DataError, TrainingError
from condformer.flops import count_flops
from condformer.learning_rates import with_default_lr
from condformer.model import IGNORE_INDEX, Transformer
from condformer.optim import before_optimizer_step, lr_at, make_optimizer, set_lr
from condformer.parallel.runtime import Layout
from condformer.parallel.sharded_checkpoint import is_sharded
from condformer.trainable import apply_trainable


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    tokens: int
    train_flops: float
    val_loss: float
    val_bits_per_byte: float | None
    train_loss: float
    tokens_per_s: float | None  # over the steps this call ran; None when it ran none (a finished run resumed)
    elapsed_s: float
    params: int
    skipped_steps: int  # updates dropped for a non-finite loss or gradient, over the whole run
    data: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- distributed -------------------------------------------------------------------------------
def _launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher speaking its protocol) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _setup_distributed(device: str, cfg: TrainConfig) -> tuple[int, int, bool]:
    """(rank, world_size, whether we created the process group); joins torchrun's group when launched by it.

    FSDP and expert parallelism need a process group even on one rank (``torchrun --nproc_per_node=1``); without
    torchrun they are a one-line error instead of a hang waiting for a rendezvous that never comes.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    sharded = cfg.parallel == "fsdp" or cfg.expert_parallel > 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (sharded and _launched_by_torchrun()):
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        return dist.get_rank(), dist.get_world_size(), True
    if sharded:
        what = "--parallel fsdp" if cfg.parallel == "fsdp" else f"--expert-parallel {cfg.expert_parallel}"
        raise ConfigError(f"{what} needs a process group: launch with torchrun --nproc_per_node=N -m condformer.cli "
                          f"train ... (N = 1 works too)")
    return 0, 1, False


_PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "peer",
                 "nccl communicator was aborted")


def _collective_failure(e: BaseException, rank: int, timeout_s: float) -> TrainingError | None:
    """A one-line error for a collective that failed because another rank died or hangs; None for anything else.

    Without a timeout the survivors of a dead rank would wait forever inside an all-reduce; torch raises
    (gloo: the peer's connection closes, or the timeout passes; NCCL: the watchdog aborts), and this names it.
    """
    if not isinstance(e, (RuntimeError, dist.DistError)) or not any(k in str(e).lower() for k in _PEER_FAILURE):
        return None
    cause = str(e).splitlines()[0][:120]
    return TrainingError(f"rank {rank}: a collective failed or waited more than {timeout_s:g} s ({cause}); another "
                         f"rank probably died or hangs: see its output, then continue with --resume from the last "
                         f"checkpoint").on_this_rank()


def _all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


def _resolve_device(cfg: TrainConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _autocast(cfg: TrainConfig, device: str) -> contextlib.AbstractContextManager:
    kind = device.split(":")[0]
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and kind == "cuda"):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stable_seed(*parts: object) -> int:
    """A seed derived from ``parts`` that is the same in every process (``hash()`` is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _prepare_on_each_node(cfg: TrainConfig, tokenizer: Any, rank: int, world: int, device: str = "cpu") -> TokenData:
    """The run's tokens on every rank, prepared once per machine.

    The first rank of each node (torchrun's ``LOCAL_RANK`` 0) tokenises (and trains a BPE) into its cache while the
    others wait at a barrier, then they load the cached files: one preparation per node whether or not nodes share
    a file system (the cache writes are atomic, so two nodes writing one shared cache is safe). Every rank then
    checks its data fingerprint against rank 0's, so nodes that found different corpora stop with one line
    instead of silently training on different data.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    data = prepare_data(cfg.data, tokenizer, cfg.val_fraction) if local_rank == 0 else None
    if world > 1:
        dist.barrier()
    if data is None:
        data = prepare_data(cfg.data, tokenizer, cfg.val_fraction)
    if world > 1:
        digest = hashlib.sha256(json.dumps(data.fingerprint, sort_keys=True, default=str).encode()).digest()
        mine = torch.tensor(list(digest[:8]), dtype=torch.long, device=device)  # NCCL reduces device tensors
        first = mine.clone()
        dist.broadcast(first, src=0)
        agree = torch.tensor([int(torch.equal(mine, first))], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)
        if not int(agree):
            raise DataError(f"rank {rank}: the ranks prepared different data ({cfg.data!r}: this rank's fingerprint "
                            f"{data.fingerprint}); give every node the same corpus, or a path on a shared file system")
    return data


# -- batches -----------------------------------------------------------------------------------
def mlm_mask(x_BT: torch.Tensor, mask_id: int, vocab_size: int, prob: float, seed: int, step: int,
             n_special: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019): pick ``prob`` of tokens; 80% -> mask, 10% random, 10% kept.

    The generator is seeded from (seed, step), so masks are reproducible on resume.
    """
    g = torch.Generator().manual_seed(stable_seed(seed, step, "mlm"))
    u = torch.rand(x_BT.shape, generator=g)
    chosen = u < prob
    targets = torch.where(chosen, x_BT, torch.full_like(x_BT, IGNORE_INDEX))
    inputs = x_BT.clone()
    inputs[chosen & (u < prob * 0.8)] = mask_id
    rand = chosen & (u >= prob * 0.8) & (u < prob * 0.9)
    inputs[rand] = torch.randint(0, vocab_size - n_special, x_BT.shape, generator=g)[rand]
    return inputs, targets


def make_batch(data: TokenData, model_cfg: ModelConfig, cfg: TrainConfig, split: str, step: int,
               rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.get_batch(split, step, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world)
    if model_cfg.causal:
        return x, y
    return mlm_mask(x, data.tokenizer.mask_id, model_cfg.vocab_size, cfg.mlm_probability, cfg.seed,
                    step * world + rank)


# -- evaluation --------------------------------------------------------------------------------
EVAL_SEED = 0  # seed 0's validation batches: results of seed-0 runs are unchanged by fixing it
@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, model_cfg: ModelConfig, cfg: TrainConfig,
             device: str, rank: int = 0, world: int = 1) -> dict[str, float | None]:
    """Mean loss over ``cfg.eval_batches`` fixed validation batches (the same every evaluation).

    The batches (and MLM masks) are drawn with :data:`EVAL_SEED`, not the run's seed: runs that differ only
    in their training seed are then scored on the same tokens, so seed-to-seed spread measures training,
    not which validation windows were drawn.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    fixed = dataclasses.replace(cfg, seed=EVAL_SEED)
    with _autocast(cfg, device):
        for i in range(cfg.eval_batches):
            x, y = make_batch(data, model_cfg, fixed, "val", i, rank, world)
            total += model(x.to(device), y.to(device)).loss.float()
    model.train(was_training)
    loss = float(_all_mean(total / cfg.eval_batches, world))
    bpb = loss / math.log(2) / data.bytes_per_token("val") if model_cfg.causal else None
    return {"val_loss": loss, "val_bits_per_byte": bpb}


# -- the loop ----------------------------------------------------------------------------------
def plan_steps(model_cfg: ModelConfig, cfg: TrainConfig, world: int) -> tuple[int, float]:
    """Number of optimizer steps the budget allows, and training FLOPs per step (analytic)."""
    seqs_per_step = cfg.batch_size * cfg.grad_accum * world
    flops_per_step = count_flops(model_cfg, cfg.seq_len).train_flops * seqs_per_step
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.budget_tokens is not None:
        limits.append(cfg.budget_tokens // (seqs_per_step * cfg.seq_len))
    if cfg.budget_flops is not None:
        limits.append(int(cfg.budget_flops // flops_per_step))
    steps = min(limits)
    if steps < 1:
        raise ConfigError(
            f"the budget allows no full step (one step = {seqs_per_step * cfg.seq_len} tokens, "
            f"{flops_per_step:.3g} FLOPs); raise the budget or lower --batch-size/--seq-len"
        )
    return steps, flops_per_step


_ROW_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "train_flops", "tokens_per_s")


class _Logger:
    """JSONL (always) and TensorBoard (when installed and enabled) on rank 0.

    On resume the log is cut back to the checkpoint's step (every rank reads it, so that they agree on
    whether that step's evaluation is missing); ``last`` and ``last_train`` are its last row and last
    training row.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled, self.path, self.tb = enabled, out_dir / "log.jsonl", None
        self.last: dict[str, Any] | None = None
        self.last_train: dict[str, Any] | None = None
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    keep.append(line)
                    self.last = row
                    self.last_train = row if "loss" in row else self.last_train
            if enabled:
                write_text_atomic(self.path, "".join(k + "\n" for k in keep))
        elif resume_step is None and enabled:
            self.path.write_text("", encoding="utf-8")
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def evaluated(self, step: int) -> bool:
        """Whether the log already holds the evaluation after ``step`` (it is the last row of a step)."""
        return self.last is not None and self.last.get("step") == step and "val_loss" in self.last

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _warn(message: str) -> None:
    """One line on stderr that does not tear the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"condformer: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _deferred_interrupt(announce: bool) -> Iterator[Callable[[], None]]:
    """Hold a Ctrl-C until the next step boundary; yields the check to call there.

    Python raises KeyboardInterrupt between any two bytecodes: inside ``optimizer.step()`` (some
    parameters updated) or between an update and its log row, states a checkpoint cannot describe. A
    second Ctrl-C interrupts at once. Only the main thread receives signals; elsewhere nothing is held.
    """
    pending: list[bool] = []

    def check() -> None:
        if pending:
            raise KeyboardInterrupt

    def hold(signum: int, frame: Any) -> None:
        check()
        pending.append(True)
        if announce:  # os.write: print() may be mid-call in the interrupted frame
            os.write(2, b"condformer: stopping after this step (Ctrl-C again to stop at once)\n")

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield check
        return
    signal.signal(signal.SIGINT, hold)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    check()  # a Ctrl-C during the final evaluation or checkpoint: the run is saved, now stop


def _ignored_settings(model_cfg: ModelConfig, cfg: TrainConfig, ck: Checkpoint) -> list[str]:
    """The given settings that a resume does not use because the run's saved ones differ.

    The vocabulary is left out: the run's tokenizer decides it.
    """
    given = {f"model.{k}": v for k, v in model_cfg.to_dict().items() if k != "vocab_size"}
    saved = {f"model.{k}": v for k, v in ck.model_cfg.to_dict().items() if k != "vocab_size"}
    if ck.train_cfg is not None:
        given.update({k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_SETTINGS})
        saved.update(ck.train_cfg.to_dict())
    return [k if k.startswith("model.") else f"{k}={v!r} (the run's: {saved[k]!r})"
            for k, v in given.items() if k in saved and v != saved[k]]


def _same_global_batch(cfg: TrainConfig, saved_world: int, world: int, announce: bool) -> TrainConfig:
    """The run's settings for resuming on ``world`` ranks a run saved on ``saved_world``: the same global batch.

    ``batch_size`` is per rank, and a step's rows are a pure function of the step over the *global* batch (rank r
    takes rows [r*B, (r+1)*B)), so keeping batch_size x ranks fixed continues the same trajectory on any number of
    ranks that divides it (masked-LM masks excepted: they are drawn per rank).
    """
    if saved_world == world:
        return cfg
    rows = cfg.batch_size * saved_world
    if rows % world:
        raise ConfigError(f"the run was saved on {saved_world} ranks with a global batch of {rows} rows, which "
                          f"{world} ranks cannot share; resume on a number of ranks that divides {rows}")
    if announce:
        _warn(f"resuming a run saved on {saved_world} ranks on {world}: batch_size per rank {cfg.batch_size} -> "
              f"{rows // world} (the same global batch of {rows} rows)")
    return dataclasses.replace(cfg, batch_size=rows // world)


def _stats_to_floats(acc: dict[str, torch.Tensor], n: int, world: int = 1) -> dict[str, float]:
    """The logged statistics: means over the micro-batches since the last row and, under torch.distributed,
    over the ranks (one all-reduce; every rank runs the same model, so all hold the same keys)."""
    if world > 1 and acc:
        keys = sorted(acc)
        device = next((v.device for v in acc.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        values = torch.stack([torch.as_tensor(acc[k], dtype=torch.float32, device=device) for k in keys])
        dist.all_reduce(values)
        return {k: float(v) / (n * world) for k, v in zip(keys, values.tolist(), strict=True)}
    return {k: float(v) / n for k, v in acc.items()}


def train(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, data: TokenData | None = None,
          on_step: Callable[[], None] | None = None) -> TrainResult:
    """Train ``model_cfg`` under ``cfg`` into ``out_dir``; return the final metrics.

    ``stop_after`` ends the run (with a checkpoint) after that many steps in total, as an interruption
    would; a later ``resume=True`` call continues it exactly (``resume=True`` on a directory with nothing to
    resume is an error). ``on_step`` is called after every optimizer step, once its log row, evaluation and
    checkpoint are written (including steps completed before a resume, once each), e.g. to drive a
    caller's progress bar.
    """
    cfg.validate()
    out = Path(out_dir)
    device = _resolve_device(cfg)
    rank, world, owns_group = _setup_distributed(device, cfg)
    try:
        cfg = with_default_lr(cfg, model_cfg, world)  # lr null: the model's recommended rate, saved as a number
        result = _train(model_cfg, cfg, out, device, rank, world, resume, progress, stop_after, data, on_step)
        if owns_group:  # rank 0 may still be writing its checkpoint: tearing gloo down under it aborts a rank
            dist.barrier()
        return result
    except Exception as e:
        failure = _collective_failure(e, rank, cfg.dist_timeout_s) if world > 1 else None
        if failure is None:
            raise
        raise failure from None
    finally:
        if owns_group:
            with contextlib.suppress(Exception):  # a group whose peer died may fail to tear down: nothing to keep
                dist.destroy_process_group()


def _train(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, device: str, rank: int, world: int, resume: bool,
           progress: bool, stop_after: int | None, data: TokenData | None,
           on_step: Callable[[], None] | None = None) -> TrainResult:
    check_run_dir(out, resume)  # before the lock: a mistaken --resume creates nothing
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(run_lock(out))
        check_run_dir(out, resume)  # again under the lock: another trainer may have finished meanwhile
        return _run(model_cfg, cfg, out, device, rank, world, resume, progress, stop_after, data, on_step)


def _run(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, device: str, rank: int, world: int, resume: bool,
         progress: bool, stop_after: int | None, data: TokenData | None,
         on_step: Callable[[], None] | None) -> TrainResult:
    is_main = rank == 0

    ck = None
    if resume and resolve_checkpoint(out) is not None:
        ck = read_checkpoint(out)
        ignored = _ignored_settings(model_cfg, cfg, ck)
        if ignored and is_main:
            _warn(f"--resume continues '{out}' with its saved settings; ignored: {', '.join(ignored)}")
        given = cfg
        model_cfg, cfg = ck.model_cfg, ck.train_cfg or cfg
        # how to run may change on a resume (ranks, sharding, recomputation); what the run computes may not
        cfg = dataclasses.replace(cfg, **{k: getattr(given, k) for k in EXECUTION_SETTINGS})
        cfg = _same_global_batch(cfg, int(ck.state.get("world_size", world)), world, is_main)

    init = None  # the run a fine-tuning run starts from (its weights, on a fresh start only)
    tokenizer: Any = cfg.tokenizer
    if cfg.init_from is not None:
        init = read_checkpoint(cfg.init_from) if ck is None else None
        if ck is None:
            model_cfg = init.model_cfg
        # the model's own tokenizer: the source run's on a fresh start, this run's saved copy on a resume
        # (so a resume does not need the source run any more)
        saved = (init or ck).state.get("tokenizer")
        if saved is not None:
            tokenizer = tokenizer_from_dict(saved)
    if data is None:
        data = _prepare_on_each_node(cfg, tokenizer, rank, world, device)
    if cfg.init_from is not None:  # a pretrained vocabulary may be padded past its tokenizer: keep the model's
        cfg = dataclasses.replace(cfg, tokenizer=data.tokenizer.name)  # what the run's config.json names
        if data.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {data.tokenizer.vocab_size} tokens, more than the vocabulary of "
                              f"the model in '{cfg.init_from}' ({model_cfg.vocab_size})")
    elif model_cfg.vocab_size != data.tokenizer.vocab_size:
        model_cfg.vocab_size = data.tokenizer.vocab_size  # the tokenizer decides the vocabulary
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}; "
                          f"lower --seq-len or raise max_seq_len in the config")
    model_cfg.validate()
    layout = Layout(cfg, rank, world, device)
    layout.check(model_cfg, resuming_single_file=ck is not None and not is_sharded(ck.path))
    total_steps, flops_per_step = plan_steps(model_cfg, cfg, world)
    if ck is not None or init is not None:
        check_weights_fit(ck or init, model_cfg)  # before allocating: a config asking for a huge model is refused

    torch.manual_seed(cfg.seed)
    sharded_resume = ck is not None and is_sharded(ck.path)  # a sharded checkpoint loads into the shards (wrap)
    # fine-tuning: the source run's weights (a fresh optimizer and schedule); a resume: the checkpoint's. Under
    # FSDP the model is only a structure here, and rank 0 alone holds the values until wrap() shards them
    raw_model: Transformer = layout.build(model_cfg, init or (None if sharded_resume else ck),
                                          sharded_resume=sharded_resume)
    # the parameters a conversion added (``condformer convert``): role ``new`` and their own rate (lr_new)
    new_params = frozenset((ck or init).state.get("new_parameters", ()) if (ck or init) is not None else ())
    n_trained, n_params = apply_trainable(raw_model, cfg.trainable, new_params)
    if is_main and cfg.trainable is not None:
        print(f"condformer: training {n_trained:,} of {n_params:,} parameters ({', '.join(cfg.trainable)}); the rest "
              f"are frozen", file=sys.stderr, flush=True)
    start_step = 0
    if ck is not None:
        layout.restore_rng(ck)
        start_step = ck.state["step"]
    n_params = raw_model.num_params(non_embedding=False)  # before expert parallelism keeps a slice per rank
    # activation checkpointing, expert parallelism, FSDP or DDP; the optimizer (and its saved state) on the result
    model, optimizer = layout.wrap(raw_model, lambda m: make_optimizer(m, cfg, new_params), ck)
    if cfg.compile:
        model = torch.compile(model)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict()})
    logger = _Logger(out, is_main, cfg.tensorboard, start_step if ck is not None else None)
    skipped_before = int(ck.state.get("skipped_steps", 0)) if ck is not None else 0
    skipped, saved_step = 0, start_step if ck is not None else None

    def checkpoint(step: int) -> None:  # a step already saved is not saved again (a Ctrl-C right after one)
        nonlocal saved_step
        if step != saved_step:  # every rank: sharded and gathered saves are collective; rank 0 writes the files
            extra = {"tokenizer": data.tokenizer.to_dict(), "data": data.fingerprint,
                     "skipped_steps": skipped_before + skipped, "world_size": world}
            if new_params:
                extra["new_parameters"] = sorted(new_params)
            layout.save(out, step, raw_model, optimizer, extra, model_cfg)
        saved_step = step

    def eval_due(done: int) -> bool:
        return done % cfg.eval_every == 0 or done == total_steps

    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    bar = _progress(range(start_step, end_step), total_steps, start_step, progress and is_main)
    if on_step is not None:
        for _ in range(start_step):
            on_step()
    last_loss, stat_acc, n_acc, last_stats = float("nan"), {}, 0, {}
    if logger.last_train is not None:  # a resume that runs no step still reports the run's last loss
        last_loss = logger.last_train["loss"]
        last_stats = {k: v for k, v in logger.last_train.items() if k not in _ROW_KEYS}
    train_time, logged_time, logged_step, metrics = 0.0, 0.0, start_step, {}
    completed = start_step  # steps whose update (or deliberate skip) is fully applied
    row: dict[str, Any] | None = None  # the log row of the step under way, written once its update is applied

    def write_row() -> None:
        nonlocal row, logged_time, logged_step
        done = row["step"]
        throughput = tokens_per_step * (done - logged_step) / max(train_time - logged_time, 1e-9)
        logger.log({**row, "tokens_per_s": throughput, **last_stats})
        row, logged_time, logged_step = None, train_time, done

    trained = [p for p in raw_model.parameters() if p.requires_grad]
    model.train()
    with _deferred_interrupt(announce=is_main) as check_interrupt:
        try:
            if ck is not None and start_step > 0 and eval_due(start_step) and not logger.evaluated(start_step):
                metrics = evaluate(model, data, model_cfg, cfg, device, rank, world)  # an interrupt cut it short
                logger.log({"step": start_step, **metrics})
            for step in bar:
                check_interrupt()  # a Ctrl-C is taken here, where weights, step and log agree
                t0 = time.perf_counter()
                lr = lr_at(step, cfg, total_steps)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    x, y = make_batch(data, model_cfg, cfg, "train", step * cfg.grad_accum + micro, rank, world)
                    sync = layout.sync_gradients(model, raw_model, last_micro=micro == cfg.grad_accum - 1)
                    with sync, _autocast(cfg, device):
                        o = model(x.to(device), y.to(device))
                        (o.train_loss / cfg.grad_accum).backward()
                    loss_sum += o.loss.detach().float() / cfg.grad_accum
                    for k, v in o.stats.items():
                        stat_acc[k] = stat_acc.get(k, 0) + (v.float() if isinstance(v, torch.Tensor) else v)
                    n_acc += 1
                layout.after_backward(raw_model)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = layout.clip(raw_model, trained, max_norm)
                loss_avg = _all_mean(loss_sum, world)
                done = step + 1
                if not bool(torch.isfinite(loss_avg) & torch.isfinite(grad_norm)):  # one host sync per step
                    if cfg.on_nonfinite == "stop":
                        raise TrainingError(
                            f"non-finite loss or gradient at step {step} (loss={float(loss_avg)}); lower --lr, "
                            f"or set on_nonfinite='skip' to drop such steps"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    before_optimizer_step(raw_model, skip=True)
                    skipped += 1
                    completed = done
                    if is_main:
                        _warn(f"step {step}: non-finite loss or gradient (loss={float(loss_avg)}); its update "
                              f"is skipped (on_nonfinite='skip')")
                else:
                    last_loss = float(loss_avg)
                    if done % cfg.log_every == 0 or done == total_steps:  # the row is built before the update
                        last_stats = _stats_to_floats(stat_acc, max(n_acc, 1), world)
                        row = {"step": done, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                               "tokens": done * tokens_per_step, "train_flops": done * flops_per_step}
                        stat_acc, n_acc = {}, 0
                    before_optimizer_step(raw_model)
                    optimizer.step()
                    completed = done
                    optimizer.zero_grad(set_to_none=True)
                    train_time += time.perf_counter() - t0
                    if is_main:
                        bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
                    if row is not None:
                        write_row()
                if eval_due(done):
                    metrics = evaluate(model, data, model_cfg, cfg, device, rank, world)
                    logger.log({"step": done, **metrics})
                if done % cfg.checkpoint_every == 0 and done != total_steps:
                    checkpoint(done)
                if on_step is not None:
                    on_step()
            final_step = end_step
            checkpoint(final_step)
            if not metrics or final_step != total_steps:
                metrics = evaluate(model, data, model_cfg, cfg, device, rank, world)
        except KeyboardInterrupt:
            # keep the work done so far: the applied update's row, then a checkpoint that resumes exactly
            if row is not None and row["step"] == completed:
                write_row()
            checkpoint(completed)
            raise
        finally:
            logger.close()
    skipped_total = skipped_before + skipped
    if skipped_total and is_main:
        _warn(f"{skipped_total} of {final_step} steps were skipped for a non-finite loss or gradient")
    ran = final_step - start_step - skipped
    return TrainResult(
        out_dir=str(out), steps=final_step, tokens=final_step * tokens_per_step,
        train_flops=final_step * flops_per_step, val_loss=metrics["val_loss"],
        val_bits_per_byte=metrics["val_bits_per_byte"], train_loss=last_loss,
        tokens_per_s=ran * tokens_per_step / train_time if ran > 0 and train_time > 0 else None,
        elapsed_s=train_time, params=n_params, skipped_steps=skipped_total,
        data=data.fingerprint, stats=last_stats,
    )


def _progress(it: range, total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True, file=sys.stderr)
