"""What a benchmark measures and how carefully: :class:`BenchConfig` and its model-independent checks.

Kept apart from the timing code so that the CLI and ``condformer compare`` can build and validate a
configuration (and a memory child can receive one by pickling) without loading anything heavier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from condformer.config import ModelConfig
from condformer.errors import ConfigError

MODES = ("train", "forward", "generate")
DTYPES = ("fp32", "bf16")


@dataclass
class BenchConfig:
    """What to benchmark and how carefully. See the module docstring for why the protocol is as it is."""

    # model A: a preset name, a config (or a .json/.yaml config file), or a run directory (trained weights)
    preset: str | ModelConfig
    vs: str | ModelConfig | None = None  # model B, the baseline (typically A's dense twin)
    mode: str = "train"  # "train" | "forward" | "generate"
    seq_len: int = 256
    batch_size: int = 8
    repeats: int = 7  # timed measurements per model; the median is reported
    warmup: int = 2  # untimed iterations per model first (allocator, kernel selection, lazy init)
    min_time_s: float = 0.2  # each measurement repeats the op until at least this long (>= 1 iteration)
    new_tokens: int = 32  # generate mode: tokens decoded after a prompt of seq_len - new_tokens tokens
    device: str = "auto"  # "auto": cuda if available else cpu
    dtype: str = "fp32"  # "fp32" | "bf16" (autocast)
    memory: bool = True  # measure the peak extra memory of one iteration
    max_retries: int = 3  # re-measurements allowed for one disturbed measurement
    contention_threshold: float = 0.3  # other processes' CPU use, in cores, that disturbs a measurement
    seed: int = 0
    # forward mode: "topk" times routed layers at their static capacity (what count_flops counts);
    # "causal" times their learned per-token decisions (meaningful for trained weights only)
    eval_routing: str = "topk"
    data: str | None = None  # None: random tokens; a corpus spec ("stdlib", PATH): real text from its val split
    # generate mode, model A only (the baseline decodes at full depth; an exit model through its exit decoder
    # with every exit off): early-exit confidence thresholds (None: A's configured/calibrated ones), or
    # self-speculative decoding with a draft of E layers
    exit_threshold: float | list[float] | None = None
    speculative: int | None = None
    draft_tokens: int = 4
    draft_confidence: float | None = None  # adaptive drafting (speculative): stop a draft below this confidence
    # train and forward modes: run both models through torch.compile (the warm-up pays the compilation)
    compile: bool = False
    # model A's inference settings (the model's settings surface, e.g. {"moe_top_k": 1, "mod_threshold": 0.5}),
    # for forward and generate; the baseline keeps its own
    inference: dict = field(default_factory=dict)

    def validate(self) -> BenchConfig:
        """Check the fields that do not depend on the models; one-line :class:`ConfigError` otherwise."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown bench mode '{self.mode}'; choose one of: {', '.join(MODES)}")
        if self.eval_routing not in ("topk", "causal"):
            raise ConfigError(f"unknown eval_routing '{self.eval_routing}'; choose topk or causal")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown bench dtype '{self.dtype}'; choose one of: {', '.join(DTYPES)}")
        for name in ("seq_len", "batch_size", "repeats"):
            _check_int(self, name, minimum=1)
        for name in ("warmup", "max_retries", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("min_time_s", "contention_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if self.mode != "generate" and (self.exit_threshold is not None or self.speculative is not None):
            raise ConfigError("--exit-threshold and --speculative time generation; use --mode generate")
        if self.exit_threshold is not None and self.speculative is not None:
            raise ConfigError("--speculative verifies every token at full depth; it takes no --exit-threshold")
        if self.draft_confidence is not None and self.speculative is None:
            raise ConfigError("--draft-confidence stops a self-speculative draft early; add --speculative E")
        if self.inference and self.mode == "train":
            raise ConfigError("inference settings (--moe-top-k, --mod-threshold) change evaluation and decoding, "
                              "not training; use --mode forward or generate")
        if self.compile and self.mode == "generate":
            raise ConfigError("--compile applies to --mode train and forward (decoding is not compiled); drop "
                              "--compile or pick another mode")
        if self.mode == "generate":
            _check_int(self, "new_tokens", minimum=1)
            _check_int(self, "draft_tokens", minimum=1)
            if self.new_tokens >= self.seq_len:
                raise ConfigError(
                    f"new_tokens ({self.new_tokens}) must be < seq_len ({self.seq_len}) in generate mode: the "
                    f"prompt is seq_len - new_tokens tokens long; raise seq_len or lower new_tokens"
                )
        return self


def _check_int(obj: Any, name: str, minimum: int) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {v!r}")
