"""Key/value cache for generation, with each cached token's position and validity.

Every layer has its own slot. A slot stores keys/values only for the tokens its layer actually
processed, together with their original positions and a validity flag, in preallocated buffers (static
shapes, no reallocation per step). Padding (left-padded batched prompts) or a token that skipped a
routed layer is stored as an invalid entry, which attention masks out, so batched decoding needs no
ragged tensors.
"""

from __future__ import annotations

import torch


class LayerKV:
    def __init__(self, batch: int, n_heads: int, head_dim: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, n_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # slots filled; the same for every row, a Python int (no device sync)
        self.all_valid = True  # no entry was ever marked invalid (padding, a routed layer's skipped token)
        self.monotonic = False  # set by KVCache: every query comes after every cached entry

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, pos_BT: torch.Tensor,
               valid_BT: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Store T new entries; return all entries so far as (k, v, pos, valid)."""
        t = k_BHTd.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} entries > capacity {self.capacity}")
        self.k[:, :, self.length:end] = k_BHTd
        self.v[:, :, self.length:end] = v_BHTd
        self.pos[:, self.length:end] = pos_BT
        self.valid[:, self.length:end] = True if valid_BT is None else valid_BT
        self.all_valid = self.all_valid and valid_BT is None
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end], self.valid[:, :end]

    @property
    def needs_mask(self) -> bool:
        """Whether one new query must be masked against the entries: not when every entry is valid and none
        lies after it (a decoder's next token). Plain SDPA then skips building and applying a (1, S) mask in
        every layer of every step (measured: ~1 ms per token of SmolLM2-135M at 1k tokens of context)."""
        return not (self.monotonic and self.all_valid)

    def truncate_after(self, max_pos: int) -> None:
        """Drop the entries after position ``max_pos`` (rejected speculative tokens).

        Needs one row whose entries are in position order, as they are when one sequence is decoded.
        """
        if self.pos.shape[0] != 1:
            raise RuntimeError("truncate_after needs a cache of one sequence")
        self.length = int((self.pos[0, : self.length] <= max_pos).sum())


    def invalidate_after(self, max_pos_B: torch.Tensor) -> None:
        """Mark row b's entries after position ``max_pos_B[b]`` invalid (rejected speculative tokens of a batch).

        Rows accept different numbers of drafts, so the entries cannot be cut off at one length as
        :meth:`truncate_after` does; they stay in place, masked out, and later entries reuse their positions.
        """
        n = self.length
        self.valid[:, :n] &= self.pos[:, :n] <= max_pos_B[:, None]
        self.all_valid = False


class KVCache:
    """One :class:`LayerKV` per layer, sized for ``capacity`` tokens per sequence."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 monotonic: bool = False) -> None:
        """``monotonic=True`` promises that every forward feeds tokens at positions after all cached ones (what
        a decoding loop does; a rejected speculative suffix is truncated first), so a single new query needs
        no causal mask against the cache."""
        device = torch.device(device)
        self.layers = [LayerKV(batch, n_heads, head_dim, capacity, device, dtype) for _ in range(n_layers)]
        for layer in self.layers:
            layer.monotonic = monotonic

    def truncate_after(self, max_pos: int) -> None:
        """Forget every layer's entries after position ``max_pos`` (one sequence)."""
        for layer in self.layers:
            layer.truncate_after(max_pos)

    def invalidate_after(self, max_pos_B: torch.Tensor) -> None:
        """Per row: forget every layer's entries after position ``max_pos_B[b]`` (a batch of sequences)."""
        for layer in self.layers:
            layer.invalidate_after(max_pos_B)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int, *, monotonic: bool = False) -> KVCache:
        cfg = model.cfg
        p = next(model.parameters())
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return cls(cfg.n_layers, batch, cfg.kv_heads, cfg.head_size, capacity, p.device, dtype, monotonic=monotonic)
