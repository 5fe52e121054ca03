"""Moved to :mod:`condformer.exits` (heads, halting, depth policies, cached decoding); kept for old imports."""

from condformer.exits.forward import ExitResult  # noqa: F401
from condformer.exits.halting import (  # noqa: F401
    Halting,
    confidence,
    layer_dropout_rate,
    oracle_exits,
    prefix_mean,
    rbf_smooth,
)
from condformer.exits.heads import EarlyExit, ExitHeads, set_exit_thresholds  # noqa: F401
from condformer.generation.exit_decoder import DecodeStats, ExitDecoder  # noqa: F401
from condformer.losses import IGNORE_INDEX, target_log_likelihood  # noqa: F401
