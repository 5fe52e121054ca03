"""The built-in blocks, routers and FFNs: importing this module registers them (see :mod:`condformer.registry`).

A third-party component registers itself the same way, by being imported before a model is built.
"""

from condformer.layers import blocks, mlp, simplified
from condformer.routing import dense, mod, moe

__all__ = ["blocks", "dense", "mlp", "mod", "moe", "simplified"]
