"""Rotary embeddings against an independent complex-number implementation, and the relative-position property."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from condformer.layers.rotary import Rotary


def rotate_ref(x: torch.Tensor, positions_BT: torch.Tensor, base: float) -> torch.Tensor:
    """Channel pairs (i, i + d/2) as complex numbers, multiplied by exp(1j * pos * base^(-2i/d)), in float64."""
    d = x.shape[-1]
    h = d // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    i = torch.arange(h, dtype=torch.float64)
    theta = torch.exp(-(2 * i / d) * torch.log(torch.tensor(base, dtype=torch.float64)))
    angles = positions_BT.double()[:, None, :, None] * theta  # (B, 1, T, h)
    zr = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((zr.real, zr.imag), dim=-1)


@pytest.mark.parametrize(("head_dim", "base"), [(8, 10000.0), (16, 10000.0), (32, 500.0)])
def test_rotary_matches_complex_reference_float64(head_dim, base):
    B, H, T = 3, 2, 10
    rot = Rotary(head_dim, base).double()
    x = torch.randn(B, H, T, head_dim, dtype=torch.float64)
    positions = torch.randint(0, 5000, (B, T))  # arbitrary, unsorted, different per row
    y = rot(x, positions)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, rotate_ref(x, positions, base), rtol=0, atol=1e-11)


def test_rotary_float32_close_to_reference():
    rot = Rotary(16)
    x = torch.randn(2, 2, 64, 16)
    positions = torch.arange(64).expand(2, 64)
    y = rot(x, positions)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), rotate_ref(x, positions, 10000.0), rtol=0, atol=2e-5)


def test_position_zero_is_identity_and_norm_is_preserved():
    rot = Rotary(16).double()
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(rot(x, torch.zeros(2, 5, dtype=torch.long)), x, rtol=0, atol=0)
    y = rot(x, torch.randint(1, 1000, (2, 5)))
    pair_norm = x[..., :8] ** 2 + x[..., 8:] ** 2
    torch.testing.assert_close(y[..., :8] ** 2 + y[..., 8:] ** 2, pair_norm, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, x)


def test_relative_position_property():
    d = 16
    rot = Rotary(d).double()
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(p: int, s: int) -> float:
        rq = rot(q, torch.tensor([[p]]))
        rk = rot(k, torch.tensor([[p + s]]))
        return float((rq * rk).sum())

    by_offset = {}
    for s in (0, 1, 3, 17):
        values = [score(p, s) for p in (0, 5, 123, 2047)]
        assert max(values) - min(values) < 1e-10 * max(1.0, abs(values[0])), (s, values)
        by_offset[s] = values[0]
    # the score does depend on the offset (otherwise the property above would be vacuous)
    distinct = sorted(by_offset.values())
    assert min(b - a for a, b in pairwise(distinct)) > 1e-6
