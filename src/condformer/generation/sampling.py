"""What every decoder shares: sampling settings, the next-token distribution, left padding, request checks.

Kept apart from the decoding loops (:mod:`.decode`, :mod:`.speculative`, :mod:`.exit_decoder`) so each of
them imports it and none imports another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from condformer.errors import CondformerError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None  # stop a sequence when it samples this token

    def validate(self) -> SamplingConfig:
        if self.max_new_tokens < 1:
            raise CondformerError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise CondformerError(f"temperature must be a finite number > 0 (use --greedy for argmax), "
                                  f"got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CondformerError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise CondformerError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last-position logits."""
    if cfg.greedy:
        return logits_BV.float().argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits_BV, cfg), 1, generator=generator).squeeze(-1)


def sampling_probs(logits_BV: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution sampling draws from (B, V): temperature, then top-k and top-p truncation."""
    logits_BV = logits_BV.to(torch.promote_types(logits_BV.dtype, torch.float32)) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= cfg.top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV.softmax(dim=-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tokens_BT, positions_BT, valid_BT) for left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CondformerError("every prompt needs at least one token; pass a non-empty --prompt")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[i, T - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens.to(device), positions.to(device), valid.to(device)


def check_request(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> None:
    """One-line errors for what no decoder can do: bad sampling settings, an encoder, empty or too long prompts."""
    cfg.validate()
    if not model.cfg.causal:
        raise CondformerError("generation needs a decoder; this checkpoint is an encoder (masked LM)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CondformerError("every prompt needs at least one token; pass a non-empty --prompt")
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if longest > model.cfg.max_seq_len:
        raise CondformerError(
            f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
            f"the model's max_seq_len {model.cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens"
        )
