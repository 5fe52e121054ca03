"""Moved to :mod:`condformer.streams.altup` (AltUp is a residual stream, not a router); kept for old imports."""

from condformer.streams.altup import (  # noqa: F401
    AltUp,
    GemmaCoefficients,
    ScalarCoefficients,
    altup_layer_flops,
)
