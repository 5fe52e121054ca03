"""Self-speculative decoding (LayerSkip, Elhoshi et al. 2024): draft with the first E layers, verify with all.

Each round drafts up to ``draft_tokens`` tokens with the first E layers and the exit head after layer E,
then runs the *remaining* layers on all of them in one pass: the draft already computed layers < E for
those tokens, and their keys and values stay in the one cache both passes share. The full model's
predictions decide what is kept:

- greedy: the longest prefix of drafts equal to the full model's argmax, plus the full model's next token;
  the output is then the full model's own greedy output, token for token;
- sampling: the standard speculative rule (Leviathan et al. 2023; Chen et al. 2023): draft d, drawn from
  q, is kept with probability min(1, p(d) / q(d)); at the first rejection a token is drawn from
  norm(max(0, p - q)); if every draft is kept a bonus token is drawn from p. Each emitted token then has
  exactly the full model's sampling distribution p (the same temperature, top-k and top-p).

Rejected drafts' keys and values are dropped from every layer (``KVCache.truncate_after``). Prompts are
decoded one at a time (a batch's rows would accept different numbers of tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from condformer.cache import KVCache
from condformer.errors import CondformerError
from condformer.generation.sampling import check_request, sampling_probs


def accept_sampled(p_KV: torch.Tensor, q_KV: torch.Tensor, drafts_K: torch.Tensor, p_bonus_V: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """The speculative sampling rule: (number of drafts kept, the token drawn after them)."""
    K = drafts_K.shape[0]
    for j in range(K):
        d = int(drafts_K[j])
        ratio = float(p_KV[j, d]) / max(float(q_KV[j, d]), 1e-30)
        u = float(torch.rand((), generator=generator, device=p_KV.device))
        if u < min(1.0, ratio):
            continue
        residual = (p_KV[j] - q_KV[j]).clamp_min(0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p_KV[j]
        return j, int(torch.multinomial(dist, 1, generator=generator))
    return K, int(torch.multinomial(p_bonus_V, 1, generator=generator))


def check_draft_depth(model: nn.Module, draft_layers: int) -> int:
    """The index of the exit that drafts (after layer ``draft_layers - 1``), or a one-line error."""
    exits = getattr(model, "exits", None)
    n = model.cfg.n_layers
    if exits is None:
        raise CondformerError("self-speculative decoding drafts with an exit head; this model has none (train an "
                              "exit preset such as tiny-exit)")
    if isinstance(draft_layers, bool) or not isinstance(draft_layers, int) or not 1 <= draft_layers < n:
        raise CondformerError(f"--speculative E needs 1 <= E < {n} (the draft's depth), got {draft_layers}")
    k = exits.exit_of_layer.get(draft_layers - 1)
    if k is None:
        depths = [layer + 1 for layer in exits.exit_layers[:-1]]
        raise CondformerError(f"no exit after layer {draft_layers}; --speculative E must be one of {depths}")
    return k


@torch.no_grad()
def generate_speculative(model: nn.Module, prompts: Sequence[Sequence[int]], cfg, draft_layers: int,  # noqa: ANN001
                         draft_tokens: int = 4, *, pad_id: int = 0, generator: torch.Generator | None = None,
                         on_tokens: Callable[[torch.Tensor], None] | None = None,
                         stats: dict | None = None) -> list[list[int]]:
    """Continue each prompt with self-speculative decoding; see the module docstring."""

    k_draft = check_draft_depth(model, draft_layers)  # the speculative flag's own error first
    check_request(model, prompts, cfg)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise CondformerError(f"draft_tokens must be an integer >= 1, got {draft_tokens}")
    if on_tokens is not None and len(prompts) > 1:
        raise CondformerError("streaming (on_tokens) with speculative decoding takes one prompt at a time")
    was_training = model.training
    model.eval()
    counts = {"drafted": 0, "accepted": 0, "rounds": 0}
    try:
        out = [_decode_one(model, list(p), cfg, draft_layers, k_draft, draft_tokens, generator, on_tokens, counts)
               for p in prompts]
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(counts)
        stats["acceptance_rate"] = counts["accepted"] / counts["drafted"] if counts["drafted"] else None
        # tokens the rounds emitted (each prompt's first new token comes from the prefill, not a round)
        from_rounds = sum(len(o) for o in out) - len(out)
        stats["tokens_per_round"] = from_rounds / counts["rounds"] if counts["rounds"] else None
    return out


def _pick(logits_1V: torch.Tensor, cfg, generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:  # noqa: ANN001
    """A token from logits, and the distribution it was drawn from (None when greedy)."""

    if cfg.greedy:
        return int(logits_1V.float().argmax(dim=-1)), None
    probs = sampling_probs(logits_1V, cfg)
    return int(torch.multinomial(probs, 1, generator=generator)), probs[0]


def _decode_one(model: nn.Module, prompt: list[int], cfg, E: int, k_draft: int, draft_tokens: int,  # noqa: ANN001
                generator: torch.Generator | None, on_tokens: Callable[[torch.Tensor], None] | None,
                counts: dict) -> list[int]:

    exits, N = model.exits, model.cfg.n_layers
    device = next(model.parameters()).device
    T = len(prompt)
    cache = KVCache.for_model(model, 1, T + cfg.max_new_tokens + draft_tokens + 1, monotonic=True)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    tok, _ = _pick(model(ids, cache=cache, last_only=True).logits[:, -1], cfg, generator)
    new: list[int] = []

    def emit(tokens: list[int]) -> bool:
        """Append tokens (stopping at eos); True when generation is over."""
        for t in tokens:
            if len(new) >= cfg.max_new_tokens:
                return True
            new.append(t)
            if on_tokens is not None:
                on_tokens(torch.tensor([t], device=device))
            if cfg.eos_id is not None and t == cfg.eos_id:
                return True
        return len(new) >= cfg.max_new_tokens

    if emit([tok]):  # the prefill's token
        return new
    pos = T  # the position of ``tok``, the newest token not yet in the cache

    stream, heads = model.stream, model.exit_heads()

    def lower(token: int, p: int) -> object:
        """One token through the first E layers (its keys and values cached there); its stream state."""
        t = torch.tensor([[token]], dtype=torch.long, device=device)
        ctx = model.context(t, torch.tensor([[p]], device=device), None, cache)
        return model.run(model.enter(t, ctx.positions_BT), ctx, layers=range(E))

    while True:
        K = min(draft_tokens, cfg.max_new_tokens - len(new) - 1)  # more drafts than tokens left is waste
        states, drafts, qs = [], [], []
        cur = tok
        for j in range(K):
            h = lower(cur, pos + j)
            states.append(h)
            cur, q = _pick(heads.logits(k_draft, stream.readout(h))[:, -1], cfg, generator)
            drafts.append(cur)
            qs.append(q)
        states.append(lower(cur, pos + K))
        positions = torch.arange(pos, pos + K + 1, device=device)[None]
        ctx = model.context(torch.tensor([[tok, *drafts]], device=device), positions, None, cache)
        H = model.run(stream.cat_time(states), ctx, layers=range(E, N))  # verify: the remaining layers at once
        full = heads.logits(exits.last, stream.readout(H))[0]  # (K + 1, V)
        if cfg.greedy:
            target = full.float().argmax(dim=-1).tolist()
            j = 0
            while j < K and drafts[j] == target[j]:
                j += 1
            nxt = target[j]
        else:
            p = sampling_probs(full, cfg)
            j, nxt = accept_sampled(p[:K], torch.stack(qs) if qs else p[:0], torch.tensor(drafts, device=device),
                                    p[K], generator)
        counts["drafted"] += K
        counts["accepted"] += j
        counts["rounds"] += 1
        cache.truncate_after(pos + j)  # keep tok and the accepted drafts
        if emit([*drafts[:j], nxt]):
            return new
        tok, pos = nxt, pos + j + 1
