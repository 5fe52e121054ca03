"""Fixtures shared by the routing conformance suites (imported by name into each test module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test draws the same random inputs however the suite is ordered or filtered."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    """These models are tiny: intra-op threads only add synchronisation (100x slower on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
