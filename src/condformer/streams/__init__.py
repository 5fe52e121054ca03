"""Residual streams: how the token state enters the layers, what each layer reads, how its output merges back.

``dense`` is the ordinary residual stream (a layer reads the state and returns the new one); ``altup`` keeps
K d-wide blocks around the same d-wide layers. The model's one layer loop only talks to this protocol, so
every depth policy (early exits, layer dropout, speculation) works on every stream.
"""

from __future__ import annotations

from typing import Any

from condformer.streams.altup import AltUp
from condformer.streams.base import DenseStream, ResidualStream

__all__ = ["AltUp", "DenseStream", "ResidualStream", "stream_type"]


def stream_type(cfg: Any) -> type[ResidualStream]:
    """The residual stream a config's model runs in (for what is asked of it without a model, e.g. FLOPs)."""
    return AltUp if cfg.altup is not None else DenseStream
