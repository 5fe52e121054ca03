"""The residual-stream protocol and the dense stream.

A stream's *state* is whatever it carries between layers: a (B, T, D) tensor for the dense stream, K blocks
(K, B, T, d) for AltUp. The layer loop never looks inside it; it asks the stream to

- ``read(i, state)``: what layer ``i`` computes on (a (B, T, d) tensor) and a private value for ``merge``;
- ``merge(i, state, private, out, ctx)``: the state after layer ``i`` produced ``out``;
- ``readout(state)``: what the final norm and the head (and every exit head) read, (B, T, head width);

and depth policies manipulate states per token or per row through ``where``, ``take_rows``/``put_rows`` and
``cat_time``, which only need to know where the batch and time dimensions are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condformer.context import Context


class ResidualStream:
    """Base class and protocol; the dense stream's behaviour (identity read, replace merge) is the default."""

    batch_dim = 0
    time_dim = 1

    def enter(self, h_BTE: torch.Tensor) -> torch.Tensor:
        """The embedding as the stream's initial state."""
        return h_BTE

    def read(self, i: int, state: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return state, None

    def merge(self, i: int, state: torch.Tensor, private: Any, out_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        return out_BTD

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def step(self, i: int, state: torch.Tensor, layer: nn.Module, ctx: Context) -> torch.Tensor:
        """Layer ``i`` on the state: read, compute, merge."""
        x_BTD, private = self.read(i, state)
        return self.merge(i, state, private, layer(x_BTD, ctx), ctx)

    # -- per-token and per-row manipulation, for depth policies ----------------------------------
    def where(self, take_new_BT: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per token: ``new`` where ``take_new_BT`` (B, T) is True, else ``old``."""
        shape = [1] * new.dim()
        shape[self.batch_dim], shape[self.time_dim] = take_new_BT.shape
        return torch.where(take_new_BT.view(shape), new, old)

    def take_rows(self, state: torch.Tensor, idx_B: torch.Tensor) -> torch.Tensor:
        return state.index_select(self.batch_dim, idx_B)

    def put_rows(self, state: torch.Tensor, idx_B: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state.index_copy(self.batch_dim, idx_B, rows)

    def cat_time(self, states: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(states, dim=self.time_dim)

    def batch_size(self, state: torch.Tensor) -> int:
        return state.shape[self.batch_dim]

    @staticmethod
    def report(stats: dict[str, Any]) -> list[dict[str, Any]]:
        """What ``condformer inspect`` shows of the stream, from a forward pass's statistics (dense: nothing)."""
        return []

    @staticmethod
    def layer_flops(cfg: Any, seq_len: int) -> int:
        """Forward FLOPs the stream adds to one layer for one sequence (dense: none)."""
        return 0


class DenseStream(ResidualStream):
    """The ordinary residual stream: each layer adds its update to one (B, T, D) state."""
