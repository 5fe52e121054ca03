"""Residual streams: how the token state enters the layers, what each layer reads, how its output merges back.

``dense`` is the ordinary residual stream (a layer reads the state and returns the new one); ``altup`` keeps
K d-wide blocks around the same d-wide layers. The model's one layer loop only talks to this protocol, so
every depth policy (early exits, layer dropout, speculation) works on every stream.
"""

from condformer.streams.base import DenseStream, ResidualStream

__all__ = ["DenseStream", "ResidualStream"]
