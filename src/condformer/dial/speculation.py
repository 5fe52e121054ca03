"""Choosing self-speculative decoding's settings by measured speed: draft depth, draft length, adaptive stopping.

Self-speculation's output does not depend on its settings (greedy: exactly the full model's tokens; sampling: the
full model's distribution), so there is no quality to control, only speed, and speed is what this machine, this
model and this text make of the drafts' acceptance. :func:`tune_speculation` therefore times every candidate
(draft exit E, draft length K, adaptive confidence c or a fixed length) on calibration prompts against plain
full-depth decoding of the same prompts in the same process, paired per repeat (the order alternates), and picks
the fastest by median time. ``generate --speculative E --draft-tokens K --draft-confidence c`` then uses it.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from condformer.errors import CondformerError

DRAFT_CONFIDENCES = (None, 0.2, 0.4, 0.6, 0.8)  # None: always the full draft length


@dataclass
class SpeculationChoice:
    """Every candidate's median decode time and speedup over full depth, and the fastest."""

    new_tokens: int
    n_prompts: int
    full_s: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"new_tokens": self.new_tokens, "n_prompts": self.n_prompts, "full_s": self.full_s,
                "candidates": self.candidates, "best": self.best}


def draft_depths(model: torch.nn.Module) -> list[int]:
    """The depths a draft can stop at: every exit but the last (the full model)."""
    exits = getattr(model, "exits", None)
    if exits is None:
        raise CondformerError("self-speculative decoding drafts with an exit head; this model has none (train an "
                              "exit preset such as tiny-exit)")
    return [layer + 1 for layer in exits.exit_layers[:-1]]


@torch.no_grad()
def tune_speculation(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, new_tokens: int = 64,
                     depths: Sequence[int] | None = None, draft_tokens: Sequence[int] = (2, 4, 6),
                     confidences: Sequence[float | None] = DRAFT_CONFIDENCES, repeats: int = 3,
                     progress: Callable[[int, int], None] | None = None) -> SpeculationChoice:
    """Time greedy decoding of ``new_tokens`` after each prompt (one at a time, batch 1) for every (E, K, c) and
    at full depth; the fastest candidate by median over ``repeats`` (each repeat times full depth and the
    candidate back to back, in alternating order)."""
    from condformer.generation import SamplingConfig, generate

    if not prompts or any(len(p) == 0 for p in prompts):
        raise CondformerError("speculation tuning needs at least one non-empty calibration prompt")
    if repeats < 1 or new_tokens < 2:
        raise CondformerError(f"repeats must be >= 1 and new_tokens >= 2, got {repeats} and {new_tokens}")
    depths = list(draft_depths(model) if depths is None else depths)
    cfg = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    was_training = model.training
    model.eval()

    def run(settings: dict[str, Any] | None) -> tuple[float, list[list[int]], dict]:
        stats: dict = {}
        out = []
        t0 = time.perf_counter()
        for p in prompts:
            kw = {} if settings is None else {"speculative": settings["draft_layers"],
                                              "draft_tokens": settings["draft_tokens"],
                                              "draft_confidence": settings["draft_confidence"]}
            one: dict = {}
            out.append(generate(model, [list(p)], cfg, stats=one, **kw)[0])
            for k in ("drafted", "accepted", "rounds"):
                stats[k] = stats.get(k, 0) + one.get(k, 0)
        return time.perf_counter() - t0, out, stats

    grid = [{"draft_layers": E, "draft_tokens": K, "draft_confidence": c}
            for E, K, c in itertools.product(depths, draft_tokens, confidences)]
    try:
        _, reference, _ = run(None)  # warm-up, and the output every candidate must reproduce
        full_times: list[float] = []
        result = SpeculationChoice(new_tokens, len(prompts), 0.0)
        for i, settings in enumerate(grid):
            times, base = [], []
            stats: dict = {}
            for r in range(repeats):
                order = (None, settings) if r % 2 == 0 else (settings, None)
                for which in order:
                    t, out, st = run(which)
                    if which is None:
                        base.append(t)
                    else:
                        times.append(t)
                        stats = st
                        if out != reference:  # cannot happen unless decoding is broken: refuse to report it
                            raise CondformerError(f"self-speculative output differs from full-depth decoding for "
                                                  f"{settings}; this is a bug, please report it")
            full_times += base
            rate = stats["accepted"] / stats["drafted"] if stats.get("drafted") else None
            result.candidates.append({**settings, "median_s": statistics.median(times),
                                      "speedup": statistics.median(b / t for b, t in zip(base, times, strict=True)),
                                      "acceptance_rate": rate,
                                      "drafts_per_round": stats["drafted"] / stats["rounds"] if stats.get("rounds")
                                      else None})
            if progress is not None:
                progress(i + 1, len(grid))
        result.full_s = statistics.median(full_times)
        result.best = max(result.candidates, key=lambda c: c["speedup"])
        return result
    finally:
        model.train(was_training)


def read_speculation(run_dir: Any) -> dict[str, Any]:
    """The fastest self-speculation settings ``condformer dial --speculation`` measured for ``run_dir``."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "dial.json"
    try:
        best = json.loads(path.read_text(encoding="utf-8"))["speculation"]["best"]
        return {"draft_layers": int(best["draft_layers"]), "draft_tokens": int(best["draft_tokens"]),
                "draft_confidence": None if best["draft_confidence"] is None else float(best["draft_confidence"])}
    except FileNotFoundError:
        raise CondformerError(f"'{run_dir}' has no dial.json; run condformer dial {run_dir} --speculation first, "
                              f"or give --speculative E") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CondformerError(f"'{path}' holds no tuned self-speculation; run condformer dial {run_dir} "
                              f"--speculation, or give --speculative E") from None
