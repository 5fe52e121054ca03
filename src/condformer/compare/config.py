"""What a study trains and measures: :class:`StudyConfig`, the named budgets, and where a run lives on disk.

Kept apart from the study loop because the loop, the analysis, the report and the CLI all read these settings,
and the run layout (:func:`run_dir`) must be the same for each of them. The technique names come from
:mod:`condformer.presets` (:func:`~condformer.presets.technique_presets`), so a technique exists for a study
exactly when its presets do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condformer.errors import ConfigError
from condformer.presets import SIZES, technique_presets


def _techniques() -> dict[str, str]:
    """Technique name -> preset suffix after the size, read off the first size (the test checks every size)."""
    size = next(iter(SIZES))
    return {technique: name[len(size):] for technique, name in technique_presets(size).items()}


# technique name (as `--presets` takes it) -> preset suffix after the size; "dense" is the size itself
TECHNIQUES: dict[str, str] = _techniques()
DEFAULT_PRESETS = ("dense", "mod", "moe", "altup", "sasp", "exit")
"""The default study: every technique that has landed."""
EXIT_TOLERANCE = 0.01
"""Early-exit runs are calibrated after training to this relative validation-loss increase (the issue's 1%)."""

BUDGETS: dict[str, dict[str, Any]] = {
    # finishes in under 10 minutes on 2 CPU cores with the default presets (the README's main job)
    "quick": dict(size="tiny", budget_flops=3.0e12, seq_len=128, batch_size=8, warmup_steps=30, eval_every=100,
                  eval_batches=8, bench_repeats=3, bench_batch_size=8),
    # about 20 minutes on 2 CPU cores for the default presets: the per-technique studies' budget (RESULTS.md)
    "cpu": dict(size="tiny", budget_flops=2.127e13, seq_len=256, batch_size=16, warmup_steps=100, eval_every=200,
                eval_batches=20, bench_repeats=5, bench_batch_size=16),
    # one GPU: a 6 x 256 model for ~100M tokens
    "gpu": dict(size="small", budget_flops=3.0e15, seq_len=512, batch_size=32, warmup_steps=200, eval_every=500,
                eval_batches=40, bench_repeats=7, bench_batch_size=32),
}


@dataclass
class StudyConfig:
    """What a study trains and measures. ``budget`` names a row of :data:`BUDGETS`; explicit fields win."""

    presets: list[str] = field(default_factory=lambda: list(DEFAULT_PRESETS))
    size: str = "tiny"
    budget_flops: float = 3.0e12
    data: str = "stdlib"
    tokenizer: str = "byte"  # byte | bpe[:N] | run:PATH (a run's tokenizer, e.g. an imported model's)
    seeds: int = 1
    seq_len: int = 128
    batch_size: int = 8
    lr: float | None = None  # None: each preset at its own recommended rate (condformer.learning_rates)
    warmup_steps: int = 30
    eval_every: int = 100
    eval_batches: int = 8
    bench_modes: list[str] = field(default_factory=lambda: ["train", "forward"])
    bench_repeats: int = 3
    bench_batch_size: int = 8
    device: str = "auto"
    analysis_windows: int = 16  # validation windows the routing analysis looks at

    @classmethod
    def from_budget(cls, budget: str, **overrides: Any) -> StudyConfig:
        if budget not in BUDGETS:
            raise ConfigError(f"unknown study budget '{budget}'; choose one of: {', '.join(BUDGETS)}")
        return cls(**{**BUDGETS[budget], **{k: v for k, v in overrides.items() if v is not None}})

    def validate(self) -> StudyConfig:
        from condformer.presets import SIZES

        if not self.presets:
            raise ConfigError("a study needs at least one preset; pass --presets dense,mod,...")
        if self.size not in SIZES:
            raise ConfigError(f"unknown size '{self.size}'; choose one of: {', '.join(SIZES)}")
        if not (isinstance(self.budget_flops, (int, float)) and self.budget_flops > 0):
            raise ConfigError(f"budget_flops must be > 0, got {self.budget_flops!r}")
        for name in ("seeds", "seq_len", "batch_size", "eval_every", "eval_batches", "bench_repeats",
                     "bench_batch_size", "analysis_windows"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not (self.lr > 0 and math.isfinite(self.lr))):
            raise ConfigError(f"lr must be a finite number > 0, or null for each preset's own rate; got {self.lr!r}")
        for mode in self.bench_modes:
            if mode not in ("train", "forward", "generate"):
                raise ConfigError(f"unknown bench mode '{mode}'; choose from train, forward, generate")
        self.resolved()
        return self

    def resolved(self) -> list[tuple[str, str]]:
        """(label, preset name) per study entry; ``dense`` first (every speedup is measured against it)."""
        from condformer.presets import presets

        known = set(presets())
        out: list[tuple[str, str]] = []
        for label in self.presets:
            if label in TECHNIQUES:
                name = self.size + TECHNIQUES[label]
            elif label in known:
                name = label
            else:
                raise ConfigError(f"unknown study preset '{label}'; use a technique ({', '.join(TECHNIQUES)}) "
                                  f"or a preset name (see `condformer presets`)")
            if name not in known:
                raise ConfigError(f"preset '{name}' does not exist; see `condformer presets`")
            if all(name != n for _, n in out):
                out.append((label, name))
        dense = [e for e in out if e[1] == self.size]
        if not dense:
            out.insert(0, ("dense", self.size))  # the baseline is always part of the study
        else:
            out.remove(dense[0])
            out.insert(0, dense[0])
        return out

    def lr_of(self, preset: str) -> float:
        """The peak rate ``preset`` trains at: the study's ``lr``, or the preset's own recommended rate."""
        from condformer.learning_rates import recommended_lr
        from condformer.presets import preset as make

        if self.lr is not None:
            return float(self.lr)
        return recommended_lr(make(preset), self.batch_size * self.seq_len)

    def run_key(self, preset: str, seed: int) -> dict[str, Any]:
        """Everything a finished run depends on: a run is reused only when its key matches."""
        return {"preset": preset, "seed": seed, "budget_flops": self.budget_flops, "data": self.data,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "lr": self.lr_of(preset),
                "warmup_steps": self.warmup_steps, "eval_every": self.eval_every, "eval_batches": self.eval_batches}


def run_dir(out: Path, preset: str, seed: int) -> Path:
    """Where a study keeps one run: the one definition the loop, the analysis and the resume check share."""
    return out / "runs" / preset / f"seed{seed}"
