"""How one training run is spread over its ranks: the single object the trainer asks, so ``train.py`` stays one loop.

The trainer asks :meth:`Layout.build` for the model (the same on every rank: same seed; under FSDP only a meta-device
structure, with the values on rank 0 alone), then hands it to :meth:`Layout.wrap`, which applies, in the one order
that works:

1. activation checkpointing (a flag the layer loop reads: :mod:`~condformer.parallel.activation_checkpoint`);
2. expert parallelism (each rank keeps its slice of every MoE layer's experts; before FSDP, which must know which
   weights are experts; :mod:`~condformer.parallel.expert_parallel`);
3. FSDP2 over every rank, experts in groups of their own over the ranks holding the same ones
   (:mod:`~condformer.parallel.fsdp`), then the shards allocated and filled (:mod:`~condformer.parallel.meta_init`),
   or DDP;
4. the optimizer, built on the final parameters (FSDP replaces them by DTensors), then its saved state.

During a step it says how to hold gradient synchronisation during accumulation, what to do after the last
backward (expert gradients scaled and summed over expert replicas), and how to clip (a norm over sharded gradients). For
checkpoints it chooses the format: ``full`` (one safetensors file, what a single process writes, gathered on
rank 0) or ``sharded`` (every rank writes its shards with ``torch.distributed.checkpoint``: the only way for a
model that does not fit on one rank); either resumes on any number of ranks, and ``auto`` is sharded under FSDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condformer.checkpoint import (
    Checkpoint,
    load_optimizer,
    load_rng_state,
    load_weights,
    read_optimizer_state,
    save_checkpoint,
)
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.model import build_model
from condformer.parallel.activation_checkpoint import apply_activation_checkpointing


@dataclass
class Layout:
    """The run's parallel layout (from its TrainConfig) on this rank."""

    cfg: TrainConfig
    rank: int
    world: int
    device: str
    # FSDP's deferred initialisation: rank 0's unsharded CPU model, from build() until wrap() has used it
    _source: nn.Module | None = None

    @property
    def fsdp(self) -> bool:
        return self.cfg.parallel == "fsdp"

    @property
    def ep(self) -> int:
        return self.cfg.expert_parallel

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether this run writes sharded checkpoints (each rank its shards) instead of one gathered file."""
        return self.cfg.checkpoint_format == "sharded" or (self.cfg.checkpoint_format == "auto" and self.fsdp)

    def check(self, model_cfg: ModelConfig | None = None, resuming_single_file: bool = False) -> None:
        """One-line errors for layouts that cannot work, before anything is built.

        ``resuming_single_file``: the run resumes from a single-file checkpoint (not a sharded one).
        """
        if self.fsdp and self.ep > 1 and resuming_single_file:
            # FSDP builds the optimizer on sharded parameters; a single file's expert moments are the full (E, ...)
            # ones, which nothing would slice between the two shardings
            raise ConfigError("a single-file checkpoint cannot be resumed with --parallel fsdp and --expert-parallel "
                              "together; resume it with one of them (its next checkpoints are sharded, and those "
                              "resume with both)")
        exits = None if model_cfg is None else model_cfg.exits
        if (self.fsdp or self.ep > 1) and exits is not None and (exits.halting != "none" or exits.thresholds):
            # a layer's forward is collective under FSDP (all-gather) and EP (all-to-all): every rank must run it
            raise ConfigError("this model's exits stop tokens at depths that differ between ranks (confidence "
                              "thresholds or halting), but --parallel fsdp and --expert-parallel need every rank to "
                              "run every layer; train it with DDP, or without thresholds and calibrate afterwards")
        if self.ep > 1 and self.world % self.ep:
            raise ConfigError(f"expert_parallel {self.ep} does not divide the {self.world} ranks; choose a divisor "
                              f"of {self.world}")
        if self.cfg.checkpoint_format == "sharded" and not self.fsdp:
            raise ConfigError("checkpoint_format 'sharded' needs --parallel fsdp (a DDP rank holds every weight: its "
                              "checkpoints are the single file); drop it or add --parallel fsdp")
        if self.fsdp and self.ep > 1 and not self.sharded_checkpoints:
            raise ConfigError("--parallel fsdp with --expert-parallel saves sharded checkpoints only; drop "
                              "--checkpoint-format full")
        if self.cfg.compile and self.ep > 1:
            raise ConfigError("--compile with --expert-parallel is not supported (the all-to-all needs the split "
                              "sizes on the host, a graph break per layer); drop one of them")

    # -- building ---------------------------------------------------------------------------------------
    def build(self, model_cfg: ModelConfig, weights: Checkpoint | None = None, *,
              sharded_resume: bool = False) -> nn.Module:
        """The model this rank starts from, seeded by the caller; ``weights``: a single-file checkpoint to load.

        DDP and one process: the whole model on the device, on every rank. FSDP: its structure on the meta
        device, and on rank 0 alone an unsharded CPU copy holding the values (initialisation, then ``weights``),
        which :meth:`wrap` hands out shard by shard (:mod:`~condformer.parallel.meta_init`); with
        ``sharded_resume`` (a sharded checkpoint fills the shards) there is no copy at all. Every rank leaves
        with rank 0's random-generator state, as if each had built the model itself.
        """
        if not self.fsdp:
            model = build_model(model_cfg)
            if weights is not None:
                load_weights(weights, model)
            return model.to(self.device)
        from condformer.parallel.meta_init import build_on_meta

        model = build_on_meta(model_cfg)
        if sharded_resume:
            return model
        if self.rank == 0:
            self._source = build_model(model_cfg)
            if weights is not None:
                load_weights(weights, self._source)
        if self.world > 1:
            rng = torch.get_rng_state().to(self.device)
            torch.distributed.broadcast(rng, src=0)
            torch.set_rng_state(rng.cpu())
        return model

    def wrap(self, raw_model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
             ck: Checkpoint | None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(the model to call, its optimizer) with ``ck``'s optimizer state (and sharded weights) loaded.

        ``raw_model`` holds the full weights already unless ``ck`` is a sharded checkpoint (loaded here, after
        sharding: every rank reads only its shards).
        """
        from condformer.parallel import sharded_checkpoint

        sharded_ck = ck is not None and sharded_checkpoint.is_sharded(ck.path)
        apply_activation_checkpointing(raw_model, self.cfg.activation_checkpointing)
        if self.fsdp:
            return self._wrap_fsdp(raw_model, make_optimizer, ck, sharded_ck)
        optimizer = make_optimizer(raw_model)
        if sharded_ck:  # every rank reads the whole of each tensor: a DDP rank holds them all
            sharded_checkpoint.load_sharded(ck.path, raw_model, optimizer)
        elif ck is not None:
            load_optimizer(ck, optimizer)
        model: nn.Module = raw_model
        if self.ep > 1:
            from condformer.parallel.expert_parallel import shard_experts

            shard_experts(raw_model, self.ep, optimizer=optimizer)  # also slices the loaded optimizer state
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # an exit curriculum leaves some exits' parameters out of a step's graph
            unused = raw_model.cfg.exits is not None and raw_model.cfg.exits.curriculum != "none"
            model = DistributedDataParallel(raw_model, device_ids=[self.device] if self.device.startswith("cuda")
                                            else None, find_unused_parameters=unused)
        return model, optimizer

    def _wrap_fsdp(self, raw_model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                   ck: Checkpoint | None, sharded_ck: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        from condformer.parallel import fsdp, sharded_checkpoint

        if self.ep > 1:
            from condformer.parallel.expert_parallel import shard_experts

            shard_experts(raw_model, self.ep, device=self.device)
        # FSDP's parameter dtype follows --dtype: auto is bf16 (fp32 reduction) on CUDA and fp32 on the CPU; the
        # experts go to groups of their own, over the ep groups holding the same ones
        fsdp.shard_model(raw_model, precision=self.cfg.dtype, offload=self.cfg.fsdp_offload,
                         reshard_after_forward=self.cfg.fsdp_reshard_after_forward, device=self.device)
        from condformer.parallel.meta_init import is_meta, materialize

        if is_meta(raw_model):  # built by build(): shards allocated here, filled from rank 0 or the checkpoint
            if not sharded_ck and self.rank == 0 and self._source is None:
                raise ConfigError("the model is on the meta device but rank 0 holds no source for its values; "
                                  "build it with Layout.build")
            materialize(raw_model, self.device, self._source, from_source=not sharded_ck)
            self._source = None
        optimizer = make_optimizer(raw_model)
        if self.ep > 1:
            from condformer.parallel.expert_parallel import split_expert_groups

            split_expert_groups(optimizer, raw_model)
        if sharded_ck:
            sharded_checkpoint.load_sharded(ck.path, raw_model, optimizer)
        elif ck is not None:  # a single-file checkpoint: weights are in already, the optimizer state from rank 0
            fsdp.load_full_state(raw_model, optimizer, None, read_optimizer_state(ck) if self.rank == 0 else {})
        return raw_model, optimizer

    # -- a step -----------------------------------------------------------------------------------------
    def sync_gradients(self, model: nn.Module, raw_model: nn.Module,
                       last_micro: bool) -> contextlib.AbstractContextManager:
        """Hold the gradient reduction on every micro-batch but the last (accumulation): DDP's ``no_sync`` on the
        called model, FSDP's switch on the sharded module itself."""
        if self.fsdp:
            raw_model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        if self.world == 1 or last_micro:
            return contextlib.nullcontext()
        return model.no_sync()

    def after_backward(self, raw_model: nn.Module) -> None:
        """Expert gradients summed over the ep groups holding the same experts (a no-op when world == ep)."""
        if self.ep > 1:
            from condformer.parallel.expert_parallel import reduce_expert_grads

            reduce_expert_grads(raw_model)

    def clip(self, raw_model: nn.Module, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm (every rank the same), gradients scaled to ``max_norm`` when above it."""
        params = list(params)
        if self.ep > 1:
            from condformer.parallel.expert_parallel import clip_grad_norm_

            return clip_grad_norm_(raw_model, params, max_norm)
        if self.fsdp:
            from condformer.parallel.fsdp import clip_grad_norm

            return clip_grad_norm(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, out: Path, step: int, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], model_cfg: ModelConfig) -> None:
        """Write the step's checkpoint; every rank calls it (gathers and sharded writes are collective)."""
        cfg = self.cfg
        if self.sharded_checkpoints:
            from condformer.parallel.sharded_checkpoint import save_sharded

            save_sharded(out, step, raw_model, optimizer, state, model_cfg, cfg, cfg.keep_checkpoints)
            return
        if self.fsdp:
            from condformer.parallel.fsdp import consolidate

            full_model, full_optimizer = consolidate(raw_model, optimizer)
            if self.rank == 0:
                save_checkpoint(out, step, full_model, full_optimizer, state, model_cfg, cfg, cfg.keep_checkpoints)
            return
        with self._gathered_experts(raw_model, optimizer):
            if self.rank == 0:
                save_checkpoint(out, step, raw_model, optimizer, state, model_cfg, cfg, cfg.keep_checkpoints)

    @contextlib.contextmanager
    def _gathered_experts(self, raw_model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        if self.ep == 1:
            yield
            return
        from condformer.parallel.expert_checkpoint import gathered_experts

        with gathered_experts(raw_model, optimizer):
            yield

    def restore_rng(self, ck: Checkpoint) -> None:
        """A single-file checkpoint's generator state (a sharded one restores each rank's in ``load_sharded``)."""
        from condformer.parallel.sharded_checkpoint import is_sharded

        if not is_sharded(ck.path):
            load_rng_state(ck)
