"""Auxiliary losses of a Mixture-of-Experts router, each a plain function of the router's outputs.

Shapes: N tokens (only the real ones: callers drop padding first), E experts (no-op experts of an
integrated MoDE layer included: balancing them is what sets how often tokens skip the FFN), K choices.

* :func:`switch_balance_loss` - Fedus et al. 2021 (arXiv 2101.03961), eq. 4-6:
  ``E * sum_i f_i * P_i`` with ``f_i`` the share of assignments that went to expert i (no gradient)
  and ``P_i`` the mean router probability of i. Normalisation, which papers and libraries disagree on:

  - ``"unit"`` (Switch, Megatron, MegaBlocks): ``f`` counts top-k hits divided by K, so ``sum f = 1``
    and perfect balance gives 1 for any K;
  - ``"hf"`` (transformers' ``load_balancing_loss_func``): ``f`` counts top-k hits per token, so
    ``sum f = K`` and perfect balance gives K.

* :func:`importance_loss` and :func:`load_loss` - Shazeer et al. 2017 (arXiv 1701.06538): the squared
  coefficient of variation of each expert's summed gates, and of its smooth (differentiable) load
  estimate under the noisy top-k router.
* :func:`z_loss` - Zoph et al. 2022 (ST-MoE, arXiv 2202.08906): mean of logsumexp(logits)^2, which keeps
  router logits small so the float32 softmax stays accurate.

The balance, importance and load losses are functions of sums over the batch; ``scope`` (see
:mod:`condformer.parallel.global_batch`) takes those sums over every data-parallel rank's rows, so the loss
does not depend on how many ranks share the batch. The z-loss is a per-token mean and needs no scope.
"""

from __future__ import annotations

import torch

from condformer.parallel.global_batch import MICRO_BATCH, BatchScope
from condformer.routing.moe.dispatch import count_ids

BALANCE_CONVENTIONS = ("unit", "hf")


def assignment_fractions(expert_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f_E: share of the N*K assignments per expert (sums to 1). Computed without a host sync."""
    return count_ids(expert_NK.reshape(-1), n_experts).float() / max(expert_NK.numel(), 1)


def switch_balance_loss(probs_NE: torch.Tensor, expert_NK: torch.Tensor, convention: str = "unit",
                        scope: BatchScope = MICRO_BATCH) -> torch.Tensor:
    """``E * sum_i f_i P_i`` (1 at perfect balance for ``"unit"``, K for ``"hf"``); gradient flows through P only.

    ``f`` and ``P`` are taken over ``scope``'s rows (this batch's, or every rank's).
    """
    n_experts, k = probs_NE.shape[-1], expert_NK.shape[-1]
    if convention not in BALANCE_CONVENTIONS:
        raise ValueError(f"unknown balance convention {convention!r}; choose one of {BALANCE_CONVENTIONS}")
    counts_E = scope.counts(count_ids(expert_NK.reshape(-1), n_experts).float())
    n_rows = scope.counts(probs_NE.new_tensor(float(probs_NE.shape[0]), dtype=torch.float32)).clamp(min=1)
    f_E = counts_E / (n_rows * k)  # assignment_fractions over the scope's rows
    P_E = scope.sum(probs_NE.float().sum(dim=0)) / n_rows
    if convention == "hf":
        f_E = f_E * k
    return n_experts * (f_E.detach() * P_E).sum()


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, population variance over mean^2 (0 when all entries are equal)."""
    x_E = x_E.float()
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    return x_E.var(unbiased=False) / (x_E.mean() ** 2 + eps)


def importance_loss(gates_NE: torch.Tensor, scope: BatchScope = MICRO_BATCH) -> torch.Tensor:
    """CV^2 of importance_i = sum over tokens (of ``scope``) of the (sparse) gate given to expert i."""
    return cv_squared(scope.sum(gates_NE.sum(dim=0)))


def smooth_load(clean_NE: torch.Tensor, noisy_NE: torch.Tensor, noise_std_NE: torch.Tensor, k: int) -> torch.Tensor:
    """load_E = sum over tokens of P(x, i), the probability that i stays in the top k under fresh noise.

    P(x, i) = Phi((clean_i - threshold_i) / std_i), where threshold_i is the k-th largest noisy logit
    among the other experts: the (k+1)-th largest overall if i is currently in the top k, else the k-th.
    """
    n_experts = noisy_NE.shape[-1]
    top_vals, _ = noisy_NE.topk(min(k + 1, n_experts), dim=-1)
    kth = top_vals[:, k - 1:k]
    kth_plus_one = top_vals[:, k:k + 1] if n_experts > k else torch.full_like(kth, float("-inf"))
    in_top = noisy_NE >= kth  # ties are measure-zero with continuous noise
    threshold = torch.where(in_top, kth_plus_one, kth)
    normal = torch.distributions.Normal(torch.zeros((), device=clean_NE.device), torch.ones((), device=clean_NE.device))
    return normal.cdf((clean_NE - threshold) / noise_std_NE).sum(dim=0)


def load_loss(clean_NE: torch.Tensor, noisy_NE: torch.Tensor, noise_std_NE: torch.Tensor, k: int,
              scope: BatchScope = MICRO_BATCH) -> torch.Tensor:
    """CV^2 of the smooth load estimate, summed over ``scope``'s tokens (only defined for the noisy top-k router)."""
    return cv_squared(scope.sum(smooth_load(clean_NE, noisy_NE, noise_std_NE, k)))


def z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


def router_entropy(probs_NE: torch.Tensor, mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution over the rows ``mask_N`` keeps (all by default);
    log(E) means the router has no preference."""
    p = probs_NE.float()
    entropy_N = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    if mask_N is None:
        return entropy_N.mean()
    w = mask_N.to(entropy_N.dtype)
    return (entropy_N * w).sum() / w.sum().clamp(min=1)
