"""Moving tokens to experts and back: hard routing with static shapes, plus the references it is measured against.

Shapes: N tokens (flattened batch), K choices per token, D d_model, E real experts, C slots per expert,
P = N*K token-expert pairs. ``expert_NK`` holds each choice's expert; any id >= E (a no-op expert of an
integrated MoDE layer, or padding) means "no compute": the pair contributes zero and costs nothing.

* :func:`dropless` - sort pairs by expert, run each expert on its contiguous slice (one grouped matmul,
  no host sync; or a loop over E slices with one sync where grouped matmul is unavailable), unsort.
* :func:`with_capacity` - C = ceil(factor * N * K / E_total) slots per expert; a static (E, C, D) buffer
  run as one batched matmul. Pairs past an expert's capacity are dropped (the token keeps its residual).
* :func:`expert_choice` - each expert takes its top-C tokens per sequence (Zhou et al. 2022).
* :func:`soft` - every expert on every token, mixed by the gates: the cost hard routing avoids.
* :func:`expert_loop` - the common per-expert loop (``where`` + ``index_add``), a speed reference.

Every combine is a gather followed by a sum over the K choices in a fixed order, so outputs are
deterministic (no atomics in the forward pass).
"""

from __future__ import annotations

import math

import torch

from condformer.routing.moe.experts import StackedExperts

DROP_POLICIES = ("position", "score")


def capacity_slots(factor: float, n_tokens: int, k: int, n_experts_total: int) -> int:
    """C = ceil(factor * N * K / E_total), at least 1 and at most N (a token never picks one expert twice)."""
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * k / n_experts_total - 1e-9)))


def count_ids(e_P: torch.Tensor, n_bins: int) -> torch.Tensor:
    """How often each id in [0, n_bins) occurs, computed on the device (``bincount`` would sync the host on CUDA)."""
    return torch.zeros(n_bins, dtype=torch.long, device=e_P.device).scatter_add_(0, e_P, torch.ones_like(e_P))


def _acc(like: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or the input's if wider (a float64 layer stays float64)."""
    return torch.promote_types(like.dtype, torch.float32)


def _combine(out_P: torch.Tensor, gate_NK: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """y_n = sum_j gate_nj * out_(n, j), summed in choice order: deterministic."""
    N, K = gate_NK.shape
    acc = _acc(like)
    y = (out_P.view(N, K, out_P.shape[-1]).to(acc) * gate_NK[..., None].to(acc)).sum(dim=1)  # N may be 0
    return y.to(like.dtype)


class _GatherRows(torch.autograd.Function):
    """``src[index // repeats]`` where ``index`` is a permutation: backward gathers instead of scattering.

    Autograd's own backward of row indexing is a scatter-add (``index_put_`` with accumulate), which is
    serial on CPU and atomic (or, deterministically, sort-based) on CUDA. When the rows are a permutation
    of ``src`` repeated ``repeats`` times, the gradient is a gather by the inverse permutation followed by
    a sum over each source row's ``repeats`` copies, in a fixed order: faster and deterministic.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,  # noqa: ANN001
                repeats: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return src[index // repeats] if repeats > 1 else src[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        g = grad[inverse]
        if ctx.repeats > 1:
            g = g.view(-1, ctx.repeats, *g.shape[1:]).sum(dim=1)
        return g, None, None, None


def gather_rows(src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Row ``i`` of the result is ``src[index[i] // repeats]``; ``index`` must be a permutation of
    ``range(len(src) * repeats)`` and ``inverse`` its inverse (checked only by the tests: no host sync)."""
    return _GatherRows.apply(src, index, inverse, repeats)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def dropless(x_ND: torch.Tensor, expert_NK: torch.Tensor, gate_NK: torch.Tensor, bank: StackedExperts,
             grouped: bool = True, all_real: bool = False) -> torch.Tensor:
    """Every pair with a real expert is computed (MegaBlocks-style dropless MoE).

    ``all_real``: the caller guarantees every id is a real expert (no no-op experts, no padding), which
    drops the masking: no rows past the last group, nothing to zero.
    """
    N, K = expert_NK.shape
    E = bank.n_experts
    e_P = expert_NK.reshape(-1)  # pair p = n*K + j
    real_P = None if all_real else e_P < E
    key_P = e_P if real_P is None else torch.where(real_P, e_P, E)  # no-op pairs sort last
    order_P = torch.argsort(key_P, stable=True)
    inverse_P = inverse_permutation(order_P)
    counts = count_ids(key_P, E + 1)[:E]
    x_sorted = gather_rows(x_ND, order_P, inverse_P, K)
    real_sorted = None if real_P is None else real_P[order_P][:, None]
    if real_sorted is not None:
        x_sorted = torch.where(real_sorted, x_sorted, 0)
    if grouped:
        out_sorted = bank.grouped(x_sorted, torch.cumsum(counts, 0).to(torch.int32))
    else:  # one host sync for the slice sizes, then E contiguous matmuls
        sizes = counts.tolist()
        chunks = [bank.run(w, part) for w, part in zip(bank.each(x_ND), x_sorted[:sum(sizes)].split(sizes),
                                                        strict=True)]
        rest = x_sorted.new_zeros(N * K - sum(sizes), x_ND.shape[1])
        out_sorted = torch.cat([*(c.to(x_ND.dtype) for c in chunks), rest])
    if real_sorted is not None:  # rows past the last group are uninitialised (maybe NaN): select, never multiply
        out_sorted = torch.where(real_sorted, out_sorted, 0)
    return _combine(gather_rows(out_sorted, inverse_P, order_P), gate_NK, x_ND)


def _capacity_order(expert_NK: torch.Tensor, gate_NK: torch.Tensor | None, n_experts: int, capacity: int,
                    policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs in choice-major order (p = j*N + n) sorted by expert and priority within an expert.

    Returns (order_P, key_sorted, rank_sorted, keep_sorted): the sorting permutation, each sorted pair's expert
    (E for no-op pairs), its place in its expert's queue, and whether it fits within ``capacity``.
    """
    N, K = expert_NK.shape
    E = n_experts
    e_P = expert_NK.t().reshape(-1)
    key_P = torch.where(e_P < E, e_P, E)
    if policy == "score":
        if gate_NK is None:
            raise ValueError("the 'score' drop policy needs the gates")
        pre = torch.argsort(-gate_NK.t().reshape(-1).float(), stable=True)
        order_P = pre[torch.argsort(key_P[pre], stable=True)]
    elif policy == "position":
        order_P = torch.argsort(key_P, stable=True)
    else:
        raise ValueError(f"unknown drop policy {policy!r}; choose one of {DROP_POLICIES}")
    key_sorted = key_P[order_P]
    counts = count_ids(key_P, E + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(N * K, device=expert_NK.device) - starts[key_sorted]
    return order_P, key_sorted, rank_sorted, (key_sorted < E) & (rank_sorted < capacity)


def capacity_keep(expert_NK: torch.Tensor, gate_NK: torch.Tensor | None, n_experts: int, capacity: int,
                  policy: str = "position") -> torch.Tensor:
    """kept_NK: which pairs :func:`with_capacity` would keep, without computing anything.

    Used where the choice must be made over more rows than this process computes (every data-parallel rank's,
    :mod:`condformer.parallel.global_batch`) and the kept pairs are then run dropless. ``gate_NK`` is read by
    the ``score`` policy only (None will do for ``position``).
    """
    order_P, _, _, keep_sorted = _capacity_order(expert_NK, gate_NK, n_experts, capacity, policy)
    keep_P = torch.empty_like(keep_sorted).scatter_(0, order_P, keep_sorted)
    N, K = expert_NK.shape
    return keep_P.view(K, N).t()


def with_capacity(x_ND: torch.Tensor, expert_NK: torch.Tensor, gate_NK: torch.Tensor, bank: StackedExperts,
                  capacity: int, policy: str = "position") -> tuple[torch.Tensor, torch.Tensor]:
    """Static (E, C, D) dispatch; returns (y_ND, kept_NK), kept False for dropped and no-op pairs.

    Which pairs an over-full expert keeps:
    * ``"position"`` (GShard, Switch): all first choices before any second choice, then earlier tokens first;
    * ``"score"`` (batch-prioritised routing, Riquelme et al. 2021): higher gates first.
    """
    N, K = expert_NK.shape
    E, C, D = bank.n_experts, capacity, x_ND.shape[1]
    token_P = torch.arange(N, device=x_ND.device).repeat(K)
    order_P, key_sorted, rank, keep_sorted = _capacity_order(expert_NK, gate_NK, E, C, policy)
    dummy = E * C  # dropped pairs all point at one extra zero slot
    slot_sorted = torch.where(keep_sorted, key_sorted * C + rank, dummy)
    slot_token = torch.full((E * C + 1,), N, dtype=torch.long, device=x_ND.device)
    slot_token = slot_token.scatter(0, slot_sorted, token_P[order_P])[:dummy]  # the dummy slot is discarded
    x_pad = torch.cat([x_ND, x_ND.new_zeros(1, D)])
    out = bank.batched(x_pad[slot_token].view(E, C, D)).reshape(E * C, D)
    out_pad = torch.cat([out, out.new_zeros(1, D)])
    slot_P = torch.empty_like(slot_sorted).scatter_(0, order_P, slot_sorted)
    slot_NK = slot_P.view(K, N).t()
    return _combine(out_pad[slot_NK.reshape(-1)], gate_NK, x_ND), slot_NK < dummy


def expert_choice(x_BTD: torch.Tensor, probs_BTE: torch.Tensor, capacity: int, bank: StackedExperts,
                  valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes the ``capacity`` tokens of each sequence it scores highest.

    Returns (y_BTD, picks_BT): how many experts processed each token (0 = the token skipped the FFN).
    Not causal: whether token t is taken depends on the scores of later tokens in its sequence.
    """
    B, T, D = x_BTD.shape
    E = bank.n_experts
    acc = _acc(x_BTD)
    score_BTE = probs_BTE.to(acc)
    if valid_BT is not None:
        score_BTE = score_BTE.masked_fill(~valid_BT[..., None], -1.0)
    idx_BEC = score_BTE.transpose(1, 2).topk(capacity, dim=-1).indices  # (B, E, C)
    gate_BEC = probs_BTE.to(acc).transpose(1, 2).gather(-1, idx_BEC)
    if valid_BT is not None:
        gate_BEC = gate_BEC * valid_BT[:, None, :].expand(-1, E, -1).gather(-1, idx_BEC)
    tok_ECB = (idx_BEC + torch.arange(B, device=x_BTD.device)[:, None, None] * T).permute(1, 0, 2)
    tok_EX = tok_ECB.reshape(E, B * capacity)
    x_ND = x_BTD.reshape(B * T, D)
    out_EXD = bank.batched(x_ND[tok_EX]).to(acc) * gate_BEC.permute(1, 0, 2).reshape(E, -1, 1)
    y = torch.zeros(B * T, D, device=x_BTD.device, dtype=acc)
    y = y.index_add(0, tok_EX.reshape(-1), out_EXD.reshape(-1, D))
    picks = count_ids(tok_EX.reshape(-1), B * T).view(B, T)
    return y.to(x_BTD.dtype).view(B, T, D), picks


def soft(x_ND: torch.Tensor, probs_NE: torch.Tensor, bank: StackedExperts) -> torch.Tensor:
    """Dense mixture: y = sum_e p_e * expert_e(x) for every token and every expert (E times the FLOPs)."""
    out_END = bank.everyone(x_ND)
    acc = _acc(x_ND)
    return torch.einsum("ne,end->nd", probs_NE.to(acc), out_END.to(acc)).to(x_ND.dtype)


def expert_loop(x_ND: torch.Tensor, expert_NK: torch.Tensor, gate_NK: torch.Tensor,
                bank: StackedExperts) -> torch.Tensor:
    """The widespread per-expert loop: find each expert's tokens (a host sync per expert), run, index_add."""
    acc = _acc(x_ND)
    y = torch.zeros_like(x_ND, dtype=acc)
    for e, weights in enumerate(bank.each(x_ND)):
        n_idx, k_idx = torch.where(expert_NK == e)
        if n_idx.numel() == 0:
            continue
        out = bank.run(weights, x_ND[n_idx]).to(acc) * gate_NK[n_idx, k_idx, None].to(acc)
        y = y.index_add(0, n_idx, out)
    return y.to(x_ND.dtype)
