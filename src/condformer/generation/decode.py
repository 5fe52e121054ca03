"""Sampling with a KV cache: greedy, temperature, top-k and top-p, batched prompts, streaming.

Batched prompts of different lengths are left-padded; padding is marked invalid (attention ignores it)
and each sequence's positions start at 0 at its first real token, so a prompt gives the same logits
alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from condformer.cache import KVCache
from condformer.errors import CondformerError
from condformer.generation.sampling import SamplingConfig, check_request, left_pad, sample_next
from condformer.generation.speculative import generate_speculative


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    speculative: int | None = None,
    draft_tokens: int = 4,
    stats: dict | None = None,
    draft_confidence: float | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``cfg.max_new_tokens`` tokens; return only the new tokens.

    ``on_tokens`` receives each step's sampled tokens (B,) as they are produced, for streaming.
    A model with early exits and thresholds (or a halting module) stops each token at its exit
    (:class:`~condformer.generation.exit_decoder.ExitDecoder`). ``speculative=E``: self-speculative decoding,
    drafting ``draft_tokens`` tokens at a time with the first E layers (:mod:`condformer.generation.speculative`),
    or fewer when ``draft_confidence`` is given (a round's draft stops below that exit confidence).
    ``stats``, when given, receives the run's exit depths or acceptance counts.
    """
    if draft_confidence is not None and speculative is None:
        raise CondformerError("draft_confidence stops a self-speculative draft early; pass speculative=E with it")
    if speculative is not None:
        return generate_speculative(model, prompts, cfg, speculative, draft_tokens, pad_id=pad_id,
                                    generator=generator, on_tokens=on_tokens, stats=stats,
                                    draft_confidence=draft_confidence)
    check_request(model, prompts, cfg)
    device = next(model.parameters()).device
    tokens, positions, valid = left_pad(prompts, pad_id, device)
    B, T = tokens.shape
    was_training = model.training
    model.eval()
    cache = KVCache.for_model(model, B, T + cfg.max_new_tokens, monotonic=True)
    decoder = model.adaptive_decoder()  # early exits with thresholds or halting: each token stops at its exit
    if decoder is not None:
        last = decoder.prefill(tokens, positions, None if bool(valid.all()) else valid, cache)
    else:
        out = model(tokens, positions_BT=positions, valid_BT=None if bool(valid.all()) else valid, cache=cache,
                    last_only=True)
        last = out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    new: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(cfg.max_new_tokens):
        tok = sample_next(last, cfg, generator)
        new.append(tok)
        if on_tokens is not None:
            on_tokens(tok)
        if cfg.eos_id is not None:
            done |= tok == cfg.eos_id
            if bool(done.all()):
                break
        if len(new) == cfg.max_new_tokens:
            break
        if decoder is not None:
            last = decoder.step(tok, next_pos, cache)
        else:
            last = model(tok[:, None], positions_BT=next_pos, cache=cache).logits[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    if stats is not None and decoder is not None:
        stats["exit_depths"] = list(decoder.stats.depths)
        stats["exit_mean_depth"] = decoder.stats.mean_depth
        stats["exit_histogram"] = decoder.stats.histogram(model.cfg.n_layers)
    result = torch.stack(new, dim=1).tolist()
    if cfg.eos_id is not None:  # cut each sequence after its first eos
        result = [row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row for row in result]
    return result
