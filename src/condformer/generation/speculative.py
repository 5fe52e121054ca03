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

A batch of prompts is decoded together: every row drafts and verifies in the same passes, and each row
keeps its own number of accepted drafts. Rejected drafts' keys and values are dropped from every layer: cut
off (``KVCache.truncate_after``) for one sequence; for a batch, whose rows accept different numbers, marked
invalid per row (``KVCache.invalidate_after``), so attention ignores them and the cache keeps one length.
A row that is done (its tokens or eos) rides along without keeping anything until the last row finishes.

Adaptive drafting (``draft_confidence=c``): a round stops drafting after a draft whose exit confidence (its top
softmax probability) is below c, on every unfinished row, instead of always drafting ``draft_tokens``: a draft the
shallow exit is unsure of is likely rejected, and so are all after it (CALM's confidence measure, Schuster et al.
2022, used as a stopping rule for the draft as in adaptive-length drafting, e.g. Zhang et al. 2024 "Draft &
Verify"). The verification is unchanged, so the output is still exactly the full model's (greedy) or distributed
as its samples; only the work per round changes. It costs one host read of the confidences per draft.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from condformer.cache import KVCache
from condformer.errors import CondformerError
from condformer.generation.sampling import check_request, left_pad, sampling_probs


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
                         stats: dict | None = None, draft_confidence: float | None = None) -> list[list[int]]:
    """Continue each prompt with self-speculative decoding; see the module docstring.

    ``draft_confidence``: stop a round's draft early below this exit confidence (None: always ``draft_tokens``)."""

    k_draft = check_draft_depth(model, draft_layers)  # the speculative flag's own error first
    check_request(model, prompts, cfg)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise CondformerError(f"draft_tokens must be an integer >= 1, got {draft_tokens}")
    if draft_confidence is not None and (isinstance(draft_confidence, bool)
                                         or not isinstance(draft_confidence, (int, float))
                                         or not 0 <= draft_confidence <= 1):
        raise CondformerError(f"draft_confidence must be a probability in [0, 1] (the draft exit's top softmax "
                              f"probability), got {draft_confidence!r}")
    if on_tokens is not None and len(prompts) > 1:
        raise CondformerError("streaming (on_tokens) with speculative decoding takes one prompt at a time")
    was_training = model.training
    model.eval()
    # rounds: verifications per row (as if each row were decoded alone); passes: batched verify passes
    counts = {"drafted": 0, "accepted": 0, "rounds": 0, "passes": 0}
    try:
        out = _decode_batch(model, [list(p) for p in prompts], cfg, draft_layers, k_draft, draft_tokens, pad_id,
                            generator, on_tokens, counts, draft_confidence)
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(counts)
        stats["acceptance_rate"] = counts["accepted"] / counts["drafted"] if counts["drafted"] else None
        # tokens the rounds emitted (each prompt's first new token comes from the prefill, not a round)
        from_rounds = sum(len(o) for o in out) - len(out)
        stats["tokens_per_round"] = from_rounds / counts["rounds"] if counts["rounds"] else None
    return out


def _pick(logits_BV: torch.Tensor, cfg, generator: torch.Generator | None,  # noqa: ANN001
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row (B,), and the distributions they were drawn from (B, V; None when greedy)."""
    if cfg.greedy:
        return logits_BV.float().argmax(dim=-1), None
    probs = sampling_probs(logits_BV, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs


def _accept(full_BJV: torch.Tensor, drafts_BK: torch.Tensor, q_BKV: torch.Tensor | None, cfg,  # noqa: ANN001
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (drafts kept, the token after them), from the full model's logits at the K + 1 positions."""
    B, K = drafts_BK.shape
    if cfg.greedy:
        target = full_BJV.float().argmax(dim=-1)  # (B, K + 1)
        kept = (drafts_BK == target[:, :K]).long().cumprod(dim=1).sum(dim=1)  # the longest agreeing prefix
        return kept, target.gather(1, kept[:, None]).squeeze(1)
    p = sampling_probs(full_BJV.reshape(B * (K + 1), -1), cfg).view(B, K + 1, -1)
    rows = [accept_sampled(p[b, :K], q_BKV[b] if q_BKV is not None else p[b, :0], drafts_BK[b], p[b, K], generator)
            for b in range(B)]
    device = drafts_BK.device
    return (torch.tensor([j for j, _ in rows], device=device), torch.tensor([t for _, t in rows], device=device))


def _decode_batch(model: nn.Module, prompts: list[list[int]], cfg, E: int, k_draft: int,  # noqa: ANN001
                  draft_tokens: int, pad_id: int, generator: torch.Generator | None,
                  on_tokens: Callable[[torch.Tensor], None] | None, counts: dict,
                  draft_confidence: float | None = None) -> list[list[int]]:
    exits, N = model.exits, model.cfg.n_layers
    device = next(model.parameters()).device
    tokens, positions, valid = left_pad(prompts, pad_id, device)
    B, T = tokens.shape
    # one sequence truncates its rejected entries; a batch appends every round's K + 1 and masks the rejected
    rounds = cfg.max_new_tokens  # at most: every round emits at least one token per unfinished row
    capacity = T + cfg.max_new_tokens + draft_tokens + 1 if B == 1 else T + 1 + rounds * (draft_tokens + 1)
    cache = KVCache.for_model(model, B, capacity, monotonic=True)
    all_valid = bool(valid.all())
    out = model(tokens, positions_BT=positions, valid_BT=None if all_valid else valid, cache=cache, last_only=True)
    tok_B, _ = _pick(out.logits[:, -1], cfg, generator)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def emit(b: int, toks: list[int]) -> None:
        """Append row b's tokens, stopping at its budget or eos."""
        for t in toks:
            if len(new[b]) >= cfg.max_new_tokens:
                break
            new[b].append(t)
            if on_tokens is not None:
                on_tokens(torch.tensor([t], device=device))
            if cfg.eos_id is not None and t == cfg.eos_id:
                done[b] = True
                return
        done[b] = done[b] or len(new[b]) >= cfg.max_new_tokens

    first = tok_B.tolist()
    for b in range(B):
        emit(b, [first[b]])
    pos_B = positions[:, -1] + 1  # each row's position of ``tok_B``, the newest token not yet in the cache
    # a draft past a row's budget is computed (the batch drafts K for every row) but never emitted; clamping
    # keeps its position inside a learned position table, and no query whose output is kept can see it
    last_pos = model.cfg.max_seq_len - 1
    stream, heads = model.stream, model.exit_heads()

    def lower(tok: torch.Tensor, p_B: torch.Tensor) -> object:
        """One token per row through the first E layers (keys and values cached there); the stream state."""
        t, p = tok[:, None], p_B.clamp(max=last_pos)[:, None]
        ctx = model.context(t, p, None, cache)
        return model.run(model.enter(t, ctx.positions_BT), ctx, layers=range(E))

    while not all(done):
        active = [b for b in range(B) if not done[b]]
        # more drafts than the longest remaining budget is waste
        K = min(draft_tokens, max(cfg.max_new_tokens - len(new[b]) for b in active) - 1)
        states, drafts, qs = [], [], []
        cur = tok_B
        unfinished = torch.tensor([not d for d in done], device=device)
        for j in range(K):
            h = lower(cur, pos_B + j)
            states.append(h)
            draft_logits = heads.logits(k_draft, stream.readout(h))[:, -1]
            cur, q = _pick(draft_logits, cfg, generator)
            drafts.append(cur)
            qs.append(q)
            if draft_confidence is not None and j + 1 < K:  # adaptive: stop where no unfinished row is sure
                confident = draft_logits.float().softmax(dim=-1).amax(dim=-1) >= draft_confidence
                if not bool((confident & unfinished).any()):
                    break
        K = len(drafts)
        states.append(lower(cur, pos_B + K))
        steps = torch.arange(K + 1, device=device)
        drafts_BK = torch.stack(drafts, dim=1) if drafts else tok_B.new_zeros(B, 0)
        ctx = model.context(torch.cat([tok_B[:, None], drafts_BK], dim=1),
                            (pos_B[:, None] + steps).clamp(max=last_pos), None, cache)
        H = model.run(stream.cat_time(states), ctx, layers=range(E, N))  # verify: the remaining layers at once
        full = heads.logits(exits.last, stream.readout(H))  # (B, K + 1, V)
        q_BKV = torch.stack(qs, dim=1) if qs and qs[0] is not None else None
        kept_B, next_B = _accept(full, drafts_BK, q_BKV, cfg, generator)
        running = torch.tensor([not d for d in done], device=device)
        kept_B = torch.where(running, kept_B, -1)  # a finished row keeps nothing of this round
        if B == 1:
            cache.truncate_after(int(pos_B[0] + kept_B[0]))  # keep tok and the accepted drafts
        else:
            cache.invalidate_after(pos_B + kept_B)
        kept, nxt, rows = kept_B.tolist(), next_B.tolist(), drafts_BK.tolist()
        counts["passes"] += 1
        for b in active:
            # counted per row, as if it were decoded alone: the drafts within its budget, and of those the
            # kept ones. A row may keep drafts past its budget; the token after its last counted draft is
            # then that draft's successor in the kept prefix, which the full model also predicted
            useful = min(K, cfg.max_new_tokens - len(new[b]) - 1)
            accepted = min(kept[b], useful)
            counts["drafted"] += useful
            counts["accepted"] += accepted
            counts["rounds"] += 1
            emit(b, [*rows[b][: kept[b]], nxt[b]][: accepted + 1])
        tok_B = torch.where(running, next_B, tok_B)
        pos_B = torch.where(running, pos_B + kept_B + 1, pos_B)
    return new
