"""Small assertions shared by the routing test modules."""

from __future__ import annotations

import pytest
import torch

from condformer.errors import ConfigError


def one_line_error(fn, cls=ConfigError) -> str:
    """Call ``fn``, expect ``cls``, check the message is one non-empty line, and return it."""
    with pytest.raises(cls) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens by re-running the whole sequence each step (no cache): the generation reference."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]
