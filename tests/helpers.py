"""Small assertions shared by the routing test modules."""

from __future__ import annotations

import pytest
import torch

from condformer.errors import ConfigError


def perturb_(model, scale: float = 0.05, expert_bias: float = 0.0):
    """Move every parameter (and, with ``expert_bias`` > 0, MoE's aux-free bias) off its initialisation, in place:
    zero-initialised routers and branches, unit norm gains and zero biases hide bugs. Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        if expert_bias:
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.add_(expert_bias * torch.randn_like(b))
    return model


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


def decode_with_cache(model, tokens_BT: torch.Tensor, prompt_len: int, full_logits: torch.Tensor,
                      atol: float) -> object:
    """Prefill ``prompt_len`` tokens into a fresh KV cache, then decode the rest one token at a time,
    asserting every step's logits equal ``full_logits`` (one forward pass over all tokens). Returns the cache."""
    from condformer.cache import KVCache

    B, T = tokens_BT.shape
    cache = KVCache.for_model(model, B, T)
    out = model(tokens_BT[:, :prompt_len], cache=cache)
    torch.testing.assert_close(out.logits, full_logits[:, :prompt_len], rtol=0, atol=atol)
    for t in range(prompt_len, T):
        out = model(tokens_BT[:, t:t + 1], positions_BT=torch.full((B, 1), t), cache=cache)
        torch.testing.assert_close(out.logits[:, 0], full_logits[:, t], rtol=0, atol=atol)
    return cache
