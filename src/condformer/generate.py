"""Sampling with a KV cache: greedy, temperature, top-k and top-p, batched prompts, streaming.

Batched prompts of different lengths are left-padded; padding is marked invalid (attention ignores it)
and each sequence's positions start at 0 at its first real token, so a prompt gives the same logits
alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from condformer.cache import KVCache
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
        if not self.greedy and not self.temperature > 0:
            raise CondformerError(f"temperature must be > 0 (use --greedy for argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CondformerError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise CondformerError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last-position logits."""
    logits_BV = logits_BV.float()
    if cfg.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / cfg.temperature
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
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``cfg.max_new_tokens`` tokens; return only the new tokens.

    ``on_tokens`` receives each step's sampled tokens (B,) as they are produced, for streaming.
    """
    cfg.validate()
    if not model.cfg.causal:
        raise CondformerError("generation needs a decoder; this checkpoint is an encoder (masked LM)")
    device = next(model.parameters()).device
    tokens, positions, valid = left_pad(prompts, pad_id, device)
    B, T = tokens.shape
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if longest > model.cfg.max_seq_len:
        raise CondformerError(
            f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
            f"the model's max_seq_len {model.cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens"
        )
    was_training = model.training
    model.eval()
    cache = KVCache.for_model(model, B, T + cfg.max_new_tokens)
    out = model(tokens, positions_BT=positions, valid_BT=None if bool(valid.all()) else valid, cache=cache)
    next_pos = positions[:, -1:] + 1
    new: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(cfg.max_new_tokens):
        tok = sample_next(out.logits[:, -1], cfg, generator)
        new.append(tok)
        if on_tokens is not None:
            on_tokens(tok)
        if cfg.eos_id is not None:
            done |= tok == cfg.eos_id
            if bool(done.all()):
                break
        if len(new) == cfg.max_new_tokens:
            break
        out = model(tok[:, None], positions_BT=next_pos, cache=cache)
        next_pos = next_pos + 1
    model.train(was_training)
    result = torch.stack(new, dim=1).tolist()
    if cfg.eos_id is not None:  # cut each sequence after its first eos
        result = [row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row for row in result]
    return result
