"""Analytic FLOPs of one timed iteration: the "should save" side that a measured speedup is compared with.

Counted without building a model (and, in generate mode, per decode step) so that the ideal speedup is
known for any configuration, consistent with :mod:`condformer.flops`.
"""

from __future__ import annotations

from fractions import Fraction

from condformer.bench.config import BenchConfig
from condformer.config import ModelConfig
from condformer.flops import count_flops, eval_config, head_forward_flops, layer_forward_flops


def forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one sequence, as :func:`count_flops` counts them but without building a model."""
    layers = sum(layer_forward_flops(cfg, i, seq_len) for i in range(cfg.n_layers))
    return layers + head_forward_flops(cfg, seq_len)


def generate_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> int:
    """Approximate FLOPs of one sequence's greedy generation: prefill plus ``new_tokens - 1`` decode steps.

    ``generate`` runs the prompt once (prefill, which yields the first new token), then one forward
    pass per further token. Prefill costs ``forward_flops(P)``; its attention is the full masked
    rectangle, which is what SDPA computes with an explicit mask. A decode step of the token at
    position t has t + 1 keys (t cached plus itself) and is counted as ``forward_flops(t + 1) / (t + 1)``:
    the per-token cost of a length-(t+1) sequence whose queries each see all t+1 keys. For a dense layer
    this is exact (projections + FFN for one token, attention over t + 1 keys, the head for one token);
    for a routed layer it is the *expected* per-token cost at the router's capacity, with a cache
    holding the routed fraction of the keys. Sampling (argmax) and cache writes are not counted,
    consistent with :mod:`condformer.flops`.
    """
    total = Fraction(forward_flops(cfg, prompt_len))
    for t in range(prompt_len, prompt_len + new_tokens - 1):
        total += Fraction(forward_flops(cfg, t + 1), t + 1)
    return round(total)


def flops_per_iter(mcfg: ModelConfig, cfg: BenchConfig) -> int:
    """FLOPs of one timed iteration of ``cfg.mode`` over the whole batch."""
    if cfg.mode == "generate":
        return cfg.batch_size * generate_flops(eval_config(mcfg), cfg.seq_len - cfg.new_tokens, cfg.new_tokens)
    if cfg.mode == "train":
        return cfg.batch_size * count_flops(mcfg, cfg.seq_len).train_flops
    return cfg.batch_size * count_flops(mcfg, cfg.seq_len, training=False).forward_flops
