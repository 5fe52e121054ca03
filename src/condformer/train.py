"""The training loop: AdamW, warmup + cosine, accumulation, budgets, evaluation, checkpoints, DDP.

Resuming continues *exactly*: batches are a pure function of (seed, step, rank) (see
``TokenData.get_batch``) and MLM masks of (seed, step), so the only state is the weights, the optimizer
and the step, all in the checkpoint. A stopped-and-resumed run logs the same losses as an uninterrupted
one (tested).

Multi-process: launch with ``torchrun --nproc_per_node=N -m condformer.cli train ...``; each rank takes
its slice of the global batch, DDP averages gradients (gloo on CPU, NCCL on GPU), rank 0 writes logs and
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from condformer.checkpoint import (
    load_optimizer,
    load_rng_state,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from condformer.config import ModelConfig, TrainConfig
from condformer.data import TokenData, prepare_data
from condformer.errors import CheckpointError, ConfigError, TrainingError
from condformer.flops import count_flops
from condformer.model import IGNORE_INDEX, Transformer, build_model
from condformer.optim import before_optimizer_step, lr_at, make_optimizer


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    tokens: int
    train_flops: float
    val_loss: float
    val_bits_per_byte: float | None
    train_loss: float
    tokens_per_s: float
    elapsed_s: float
    params: int
    skipped_steps: int
    data: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- distributed -------------------------------------------------------------------------------
def _setup_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world_size, whether we created the process group); joins torchrun's group when launched by it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


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


class _Logger:
    """JSONL (always) and TensorBoard (when installed and enabled) on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled, self.path, self.tb = enabled, out_dir / "log.jsonl", None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop lines logged after the checkpoint
            keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        elif resume_step is None:
            self.path.write_text("", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

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


def _stats_to_floats(acc: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    return {k: float(v) / n for k, v in acc.items()}


def train(model_cfg: ModelConfig, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, data: TokenData | None = None,
          on_step: Callable[[], None] | None = None) -> TrainResult:
    """Train ``model_cfg`` under ``cfg`` into ``out_dir``; return the final metrics.

    ``stop_after`` ends the run (with a checkpoint) after that many steps in total, as an interruption
    would; a later ``resume=True`` call continues it exactly. ``on_step`` is called after every optimizer
    step (including steps completed before a resume, once each), e.g. to drive a caller's progress bar.
    """
    cfg.validate()
    out = Path(out_dir)
    device = _resolve_device(cfg)
    rank, world, owns_group = _setup_distributed(device)
    try:
        result = _train(model_cfg, cfg, out, device, rank, world, resume, progress, stop_after, data, on_step)
        if owns_group:  # rank 0 may still be writing its checkpoint: tearing gloo down under it aborts a rank
            dist.barrier()
        return result
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(model_cfg: ModelConfig, cfg: TrainConfig, out: Path, device: str, rank: int, world: int, resume: bool,
           progress: bool, stop_after: int | None, data: TokenData | None,
           on_step: Callable[[], None] | None = None) -> TrainResult:
    is_main = rank == 0

    ck = None
    if resume:
        if resolve_checkpoint(out) is not None:
            ck = read_checkpoint(out)
            model_cfg, cfg = ck.model_cfg, ck.train_cfg or cfg
    elif resolve_checkpoint(out) is not None:
        raise CheckpointError(
            f"'{out}' already holds checkpoints; pass --resume to continue it or choose another --out"
        )

    if data is None:
        # rank 0 tokenises (and trains a BPE) first; the others then load its cached files, so every
        # rank sees identical tokens
        if rank == 0:
            data = prepare_data(cfg.data, cfg.tokenizer, cfg.val_fraction)
        if world > 1:
            dist.barrier()
        if rank != 0:
            data = prepare_data(cfg.data, cfg.tokenizer, cfg.val_fraction)
    if model_cfg.vocab_size != data.tokenizer.vocab_size:
        model_cfg.vocab_size = data.tokenizer.vocab_size  # the tokenizer decides the vocabulary
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}; "
                          f"lower --seq-len or raise max_seq_len in the config")
    model_cfg.validate()
    total_steps, flops_per_step = plan_steps(model_cfg, cfg, world)

    torch.manual_seed(cfg.seed)
    raw_model: Transformer = build_model(model_cfg).to(device)
    optimizer = make_optimizer(raw_model, cfg)
    start_step = 0
    if ck is not None:
        load_weights(ck, raw_model)
        raw_model.to(device)
        load_optimizer(ck, optimizer)
        load_rng_state(ck)
        start_step = ck.state["step"]
    model: torch.nn.Module = raw_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw_model, device_ids=[device] if device.startswith("cuda") else None)
    if cfg.compile:
        model = torch.compile(model)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict()})
    logger = _Logger(out, is_main, cfg.tensorboard, start_step if ck is not None else None)
    state_extra = {"tokenizer": data.tokenizer.to_dict(), "data": data.fingerprint}

    def checkpoint(step: int) -> None:
        if is_main:
            save_checkpoint(out, step, raw_model, optimizer, state_extra, model_cfg, cfg, cfg.keep_checkpoints)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    bar = _progress(range(start_step, end_step), total_steps, start_step, progress and is_main)
    if on_step is not None:
        for _ in range(start_step):
            on_step()
    skipped, last_loss, stat_acc, n_acc, last_stats = 0, float("nan"), {}, 0, {}
    train_time, logged_time, logged_step, metrics = 0.0, 0.0, start_step, {}
    completed = start_step  # steps whose update (or deliberate skip) is fully applied
    model.train()
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = make_batch(data, model_cfg, cfg, "train", step * cfg.grad_accum + micro, rank, world)
                sync = contextlib.nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else model.no_sync()
                with sync, _autocast(cfg, device):
                    o = model(x.to(device), y.to(device))
                    (o.train_loss / cfg.grad_accum).backward()
                loss_sum += o.loss.detach().float() / cfg.grad_accum
                for k, v in o.stats.items():
                    stat_acc[k] = stat_acc.get(k, 0) + (v.float() if isinstance(v, torch.Tensor) else v)
                n_acc += 1
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            loss_avg = _all_mean(loss_sum, world)
            if not bool(torch.isfinite(loss_avg) & torch.isfinite(grad_norm)):  # one host sync per step
                if cfg.on_nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step} (loss={float(loss_avg)}); lower --lr, "
                        f"or set on_nonfinite='skip' to drop such steps"
                    )
                optimizer.zero_grad(set_to_none=True)
                before_optimizer_step(raw_model, skip=True)
                skipped += 1
                completed = step + 1
                if on_step is not None:
                    on_step()
                continue
            before_optimizer_step(raw_model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            if on_step is not None:
                on_step()
            train_time += time.perf_counter() - t0
            last_loss = float(loss_avg)
            done = step + 1
            if is_main:
                bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            if done % cfg.log_every == 0 or done == total_steps:
                last_stats = _stats_to_floats(stat_acc, max(n_acc, 1))
                logger.log({"step": done, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                            "tokens": done * tokens_per_step, "train_flops": done * flops_per_step,
                            "tokens_per_s": tokens_per_step * (done - logged_step)
                            / max(train_time - logged_time, 1e-9),
                            **last_stats})
                stat_acc, n_acc, logged_time, logged_step = {}, 0, train_time, done
            if done % cfg.eval_every == 0 or done == total_steps:
                metrics = evaluate(model, data, model_cfg, cfg, device, rank, world)
                logger.log({"step": done, **metrics})
            if done % cfg.checkpoint_every == 0 and done != total_steps:
                checkpoint(done)
        final_step = end_step
    except KeyboardInterrupt:
        # keep the work done so far: resuming from the last completed step continues exactly
        checkpoint(completed)
        logger.close()
        raise
    checkpoint(final_step)
    if not metrics or final_step != total_steps:
        metrics = evaluate(model, data, model_cfg, cfg, device, rank, world)
    logger.close()
    steps_run = max(final_step - start_step - skipped, 1)
    return TrainResult(
        out_dir=str(out), steps=final_step, tokens=final_step * tokens_per_step,
        train_flops=final_step * flops_per_step, val_loss=metrics["val_loss"],
        val_bits_per_byte=metrics["val_bits_per_byte"], train_loss=last_loss,
        tokens_per_s=steps_run * tokens_per_step / max(train_time, 1e-9), elapsed_s=train_time,
        params=raw_model.num_params(non_embedding=False), skipped_steps=skipped, data=data.fingerprint,
        stats=last_stats,
    )


def _progress(it: range, total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True, file=sys.stderr)
