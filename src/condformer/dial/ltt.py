"""Learn-then-Test: pick the cheapest inference setting whose risk is certified to stay within a tolerance.

Reference: A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan, L. Lei, "Learn then Test: Calibrating
Predictive Algorithms to Achieve Risk Control", 2021 (arXiv:2110.01052). CALM (Schuster et al., "Confident
Adaptive Language Modeling", 2022) uses it to choose early-exit thresholds.

The problem: there are S candidate settings (say exit thresholds), each with a known compute cost, and a loss in
[0, 1] per example that says how much the setting departs from the full model (1 if its prediction differs).
The risk of a setting is its expected loss on fresh data. Picking the cheapest setting whose *empirical* risk on
calibration data is within the tolerance (:func:`naive_select`) is not safe: among many settings near the
tolerance, some look better than they are by chance, and the cheapest of those is picked precisely because it
looks good. Learn-then-Test turns the choice into multiple hypothesis testing instead:

- for each setting s, the null hypothesis H_s says "risk_s > tolerance";
- a p-value for H_s comes from the setting's mean loss on calibration examples, through a concentration bound
  that holds for any loss distribution on [0, 1] (:func:`hoeffding_bentkus_pvalue`);
- a test that controls the family-wise error rate (the probability of rejecting *any* true null) at ``delta``
  rejects some nulls; every rejected setting is certified, so with probability at least ``1 - delta`` (over the
  calibration draw) every certified setting has risk within the tolerance, and so does the cheapest of them.

Two family-wise tests are offered. Bonferroni (:func:`bonferroni_test`) needs no ordering but divides ``delta``
by the number of settings. Fixed-sequence testing (:func:`fixed_sequence_test`) spends all of ``delta`` on each
hypothesis in turn but stops at the first failure, so it needs an order, fixed before the test data is seen, that
walks from the settings most likely to be safe towards the cheap ones. :func:`select` learns that order on one
random part of the calibration examples and tests on the rest; the guarantee needs the examples to be i.i.d.
draws from the distribution the setting will meet (exchangeable with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from condformer.errors import CondformerError

METHODS = ("fixed_sequence", "bonferroni")

# n * risk_hat counts the losses when the losses are 0/1, but risk_hat = k / n is rounded, so n * risk_hat can land
# a rounding error above k (25 * (7 / 25) = 7.000000000000001) and its ceiling would count k + 1. Counts within this
# relative distance of an integer are taken to be that integer.
_COUNT_SNAP = 1e-12


def _bernoulli_kl(a: float, b: float) -> float:
    """h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0: the exponent of the Hoeffding bound."""
    first = a * math.log(a / b) if a > 0 else 0.0
    second = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
    return first + second


def _losses_counted(expected_count: float) -> int:
    """ceil(n * risk_hat), the number of losses the Bentkus bound is evaluated at (see ``_COUNT_SNAP``)."""
    nearest = round(expected_count)
    if abs(expected_count - nearest) <= _COUNT_SNAP * max(1.0, expected_count):
        return int(nearest)
    return math.ceil(expected_count)


def _stirling_error(x: int) -> float:
    """lgamma(x + 1) - (x log x - x + log(2 pi x) / 2): what Stirling's formula misses of log x!, for x >= 1.

    From its asymptotic series for x >= 30 (error below 1e-17), from ``math.lgamma`` below, where every number
    involved is small enough to keep 1e-14 absolute.
    """
    if x >= 30:
        inverse_square = 1.0 / (x * x)
        return (1 / 12 - inverse_square * (1 / 360 - inverse_square * (1 / 1260 - inverse_square / 1680))) / x
    return math.lgamma(x + 1) - (x * math.log(x) - x + 0.5 * math.log(2 * math.pi * x))


def _log_binomial_pmf(j: int, n: int, p: float) -> float:
    """log P(X = j) for X ~ Binomial(n, p), 0 <= j < n, 0 < p < 1, accurate to about 1e-14 even for n = 10^6.

    The difference of lgammas loses digits for large n (lgamma(10^6) is 1.3e7, to one ulp: 2e-9 of absolute error).
    Written instead as Stirling's formula plus its error terms, the large parts cancel algebraically:
    log pmf(j) = log(n / (2 pi j (n - j))) / 2 + errors - j log(j / (n p)) - (n - j) log((n - j) / (n (1 - p))),
    and the two logs are taken with ``log1p`` of the relative distance from the mean, which is small near the mode.
    """
    if j == 0:
        return n * math.log1p(-p)
    mean_gap = j - n * p
    return (
        0.5 * math.log(n / (2 * math.pi * j * (n - j)))
        + _stirling_error(n)
        - _stirling_error(j)
        - _stirling_error(n - j)
        - j * math.log1p(mean_gap / (n * p))
        - (n - j) * math.log1p(-mean_gap / (n * (1 - p)))
    )


def _log_binomial_cdf(k: int, n: int, p: float) -> float:
    """log P(X <= k) for X ~ Binomial(n, p), 0 <= k < n, 0 < p < 1, summed in log space.

    The anchor is the largest term of the sum: k itself, or the mode floor((n + 1) p) when k is past it. Its log
    probability comes from :func:`_log_binomial_pmf`; the others from it by the ratios of neighbouring terms,
    pmf(j - 1) / pmf(j) = j / (n - j + 1) * (1 - p) / p, as cumulative sums of logs (numpy, O(k)) walking away from
    the anchor, then a log-sum-exp. Anchoring at the largest term keeps the rounding of those sums small where the
    terms matter (a sum started at k = n - 1 for n = 10^6 would reach the mode with an error near 1e-7), and no term
    is exponentiated before the largest is subtracted, so far tails (n = 10^6) neither underflow nor lose precision.
    """
    anchor = min(k, math.floor((n + 1) * p))
    log_odds = math.log(p) - math.log1p(-p)
    below = np.arange(anchor, 0, -1, dtype=np.float64)  # steps from j to j - 1, j = anchor .. 1
    down = np.cumsum(np.log(below) - np.log(n - below + 1) - log_odds)
    above = np.arange(anchor, k, dtype=np.float64)  # steps from j to j + 1, j = anchor .. k - 1
    up = np.cumsum(np.log(n - above) - np.log(above + 1) + log_odds)
    relative = np.concatenate((down, [0.0], up))  # log pmf(j) - log pmf(anchor), j over 0..k in some order
    largest = float(relative.max())
    return _log_binomial_pmf(anchor, n, p) + largest + math.log(float(np.exp(relative - largest).sum()))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact up to floating point, fast for n up to 10^6 (one numpy pass).

    The Bentkus part of :func:`hoeffding_bentkus_pvalue`; public so it can be checked against an exact sum.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise CondformerError(f"binomial n must be an integer >= 0, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise CondformerError(f"binomial k must be an integer, got {k!r}")
    if not 0.0 <= p <= 1.0:
        raise CondformerError(f"binomial p must be in [0, 1], got {p!r}")
    k, n = int(k), int(n)
    if k < 0:
        return 0.0
    if k >= n or p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    return min(1.0, math.exp(_log_binomial_cdf(k, n, p)))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """A valid p-value for H0: "the expected loss exceeds ``alpha``", from the mean ``risk_hat`` of n i.i.d. losses.

    Losses must lie in [0, 1]; nothing else about their distribution is assumed (the Hoeffding-Bentkus p-value of
    LTT, arXiv:2110.01052). It is the smaller of two p-values that are each valid under H0:

    - Hoeffding: exp(-n h1(min(risk_hat, alpha), alpha)), h1 the Bernoulli KL divergence (its Chernoff form);
    - Bentkus: e * P(Binomial(n, alpha) <= ceil(n risk_hat)), which compares the losses with the worst case of
      mean alpha, Bernoulli(alpha) losses.

    Each is sharper in some regime, and the minimum is still valid: both bound P(mean <= t) under H0 and grow with
    t, so their minimum does too, evaluated at the observed mean. Super-uniform under H0: P(p <= u) <= u for every
    u. Equals 1 when ``risk_hat >= alpha`` (no evidence against H0). ``n * risk_hat`` within a relative 1e-12 of an
    integer counts as that integer (``risk_hat`` is usually k / n, rounded).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CondformerError(f"the number of losses n must be an integer >= 1, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise CondformerError(f"the risk level alpha must be in (0, 1), got {alpha!r}")
    if not 0.0 <= risk_hat <= 1.0:
        raise CondformerError(f"the empirical risk risk_hat must be in [0, 1], got {risk_hat!r}")
    n, risk_hat, alpha = int(n), float(risk_hat), float(alpha)
    hoeffding = math.exp(-n * _bernoulli_kl(min(risk_hat, alpha), alpha))
    bentkus = math.e * binomial_cdf(_losses_counted(n * risk_hat), n, alpha)
    return min(1.0, max(0.0, min(hoeffding, bentkus)))


def _check_test_inputs(pvalues: Sequence[float], delta: float) -> list[float]:
    if not 0.0 < delta < 1.0:
        raise CondformerError(f"the error rate delta must be in (0, 1), got {delta!r}")
    values = [float(p) for p in pvalues]
    for index, p in enumerate(values):
        if not 0.0 <= p <= 1.0:
            raise CondformerError(f"p-value {index} must be in [0, 1], got {p!r}")
    return values


def fixed_sequence_test(pvalues: Sequence[float], delta: float) -> list[int]:
    """Reject hypotheses in the given order while p <= delta; stop at the first p > delta.

    Returns the rejected indices, always a prefix 0..j-1. The family-wise error rate (probability of rejecting any
    true null) is at most ``delta`` provided the order was fixed before seeing the data behind the p-values: the
    first true null in the order is rejected with probability at most ``delta``, and nothing after it can be
    rejected unless it is. Unlike Bonferroni, no level is divided among the hypotheses, so a well-ordered sequence
    (most likely safe first) certifies more.
    """
    rejected: list[int] = []
    for index, p in enumerate(_check_test_inputs(pvalues, delta)):
        if p > delta:
            break
        rejected.append(index)
    return rejected


def bonferroni_test(pvalues: Sequence[float], delta: float) -> list[int]:
    """Reject every hypothesis with p <= delta / m (m hypotheses): family-wise error rate <= delta, any order."""
    values = _check_test_inputs(pvalues, delta)
    level = delta / len(values) if values else delta
    return [index for index, p in enumerate(values) if p <= level]


@dataclass
class Selection:
    """What :func:`select` chose, and the evidence.

    ``index`` is the chosen setting (None: none certified, fall back to the full computation). ``certified`` lists
    every setting whose null was rejected, in test order. ``order`` is the sequence tested: for fixed-sequence
    testing the learned order (decreasing cost), for Bonferroni every setting. ``pvalues`` holds the p-value of every
    setting in ``order`` (those after the first failure of a fixed sequence are computed but were not needed).
    ``learn_risk`` and ``test_risk`` are the mean losses of every setting on the learn and test parts
    (``learn_risk`` is empty for Bonferroni, which has no learn part).
    """

    index: int | None
    certified: list[int]
    pvalues: dict[int, float]
    order: list[int]
    learn_risk: list[float]
    test_risk: list[float]
    n_learn: int
    n_test: int
    method: str
    tolerance: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ``pvalues`` keys become strings, as JSON object keys must be."""
        out = asdict(self)
        out["pvalues"] = {str(setting): p for setting, p in self.pvalues.items()}
        return out


def _as_loss_matrix(losses: Any) -> np.ndarray:
    """A float64 (S, N) array from a numpy array or torch tensor (read, not imported: torch stays optional here)."""
    if hasattr(losses, "detach"):
        losses = losses.detach().cpu().double().numpy()
    matrix = np.asarray(losses, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise CondformerError(
            f"losses must be a 2-D (settings, examples) array with both sizes >= 1, got shape {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        raise CondformerError(f"losses must be finite, got {int((~np.isfinite(matrix)).sum())} non-finite values")
    if matrix.min() < 0.0 or matrix.max() > 1.0:
        raise CondformerError(f"losses must lie in [0, 1], got values from {matrix.min()!r} to {matrix.max()!r}")
    return matrix


def _as_costs(cost: Sequence[float], n_settings: int) -> np.ndarray:
    costs = np.asarray([float(c) for c in cost], dtype=np.float64)
    if costs.shape != (n_settings,):
        raise CondformerError(f"cost must have one entry per setting ({n_settings}), got {len(costs)}")
    if not np.isfinite(costs).all():
        raise CondformerError(f"costs must be finite, got {costs.tolist()!r}")
    return costs


def _check_tolerance(tolerance: float) -> None:
    if not 0.0 < tolerance < 1.0:
        raise CondformerError(f"the tolerance must be in (0, 1), got {tolerance!r}")


def pareto_order(learn_risk: Sequence[float], cost: Sequence[float]) -> list[int]:
    """The fixed-sequence order learned from empirical risks: undominated settings, most expensive first.

    Setting s is dropped when another setting t is at most as costly and at most as risky on the learn part, with
    t strictly cheaper, or strictly less risky, or (same cost and same risk) a lower index. Such an s can only hurt:
    it comes before t in a walk by decreasing cost, and if it failed its test it would stop the walk before t,
    which is cheaper and looks no worse. What is left is the cost/risk Pareto front, returned by strictly
    decreasing cost, which is then strictly increasing learn risk: the walk goes from the safest-looking setting
    towards the cheapest and stops where the evidence runs out. Depends only on its arguments, so on the learn part.
    """
    risks = [float(r) for r in learn_risk]
    costs = [float(c) for c in cost]
    if len(risks) != len(costs):
        raise CondformerError(f"learn_risk and cost must have the same length, got {len(risks)} and {len(costs)}")
    by_cost_then_risk = sorted(range(len(costs)), key=lambda s: (costs[s], risks[s], s))
    front: list[int] = []
    best_risk = math.inf
    for setting in by_cost_then_risk:
        if risks[setting] < best_risk:
            front.append(setting)
            best_risk = risks[setting]
    return front[::-1]


def _cheapest(settings: Sequence[int], costs: np.ndarray) -> int | None:
    return min(settings, key=lambda s: (costs[s], s)) if settings else None


def select(
    losses: Any,
    cost: Sequence[float],
    tolerance: float,
    delta: float,
    *,
    method: str = "fixed_sequence",
    learn_fraction: float = 0.5,
    seed: int = 0,
) -> Selection:
    """The cheapest setting whose true risk is <= ``tolerance`` with probability >= 1 - ``delta`` (Learn-then-Test).

    ``losses[s, i]`` in [0, 1] is the loss of calibration example i under setting s (numpy array or torch tensor of
    shape (S, N)); ``cost[s]`` its compute, lower is cheaper. The probability is over the draw of the N examples,
    which must be i.i.d. like the data the setting will serve.

    ``method="fixed_sequence"``: the examples are shuffled (numpy ``default_rng(seed)``) and split into a learn
    part (``round(learn_fraction * N)`` examples) and a test part (the rest); both must be non-empty. The learn part
    fixes the order (:func:`pareto_order` of the learn risks and costs); the test part gives each setting in that
    order a Hoeffding-Bentkus p-value, and :func:`fixed_sequence_test` at ``delta`` certifies a prefix.

    ``method="bonferroni"``: no learn step; all N examples test all S settings, certified where p <= delta / S
    (``learn_fraction`` and ``seed`` are unused).

    The chosen setting is the cheapest certified (ties: lowest index); None if nothing is certified.
    """
    matrix = _as_loss_matrix(losses)
    n_settings, n_examples = matrix.shape
    costs = _as_costs(cost, n_settings)
    _check_tolerance(tolerance)
    if not 0.0 < delta < 1.0:
        raise CondformerError(f"the error rate delta must be in (0, 1), got {delta!r}")
    if method not in METHODS:
        raise CondformerError(f"method must be one of {', '.join(METHODS)}, got {method!r}")

    if method == "bonferroni":
        learn_risk: list[float] = []
        test_part = matrix
        order = list(range(n_settings))
    else:
        if not 0.0 < learn_fraction < 1.0:
            raise CondformerError(f"learn_fraction must be in (0, 1), got {learn_fraction!r}")
        n_learn = round(learn_fraction * n_examples)
        if n_learn < 1 or n_learn >= n_examples:
            raise CondformerError(
                f"learn_fraction {learn_fraction!r} of {n_examples} examples leaves {n_learn} to learn and"
                f" {n_examples - n_learn} to test; both must be >= 1"
            )
        shuffled = np.random.default_rng(seed).permutation(n_examples)
        learn_part, test_part = matrix[:, shuffled[:n_learn]], matrix[:, shuffled[n_learn:]]
        learn_risk = learn_part.mean(axis=1).tolist()
        order = pareto_order(learn_risk, costs.tolist())

    n_test = test_part.shape[1]
    test_risk = test_part.mean(axis=1).tolist()
    pvalues = {s: hoeffding_bentkus_pvalue(test_risk[s], n_test, tolerance) for s in order}
    ordered_pvalues = [pvalues[s] for s in order]
    if method == "bonferroni":
        rejected = bonferroni_test(ordered_pvalues, delta)
    else:
        rejected = fixed_sequence_test(ordered_pvalues, delta)
    certified = [order[position] for position in rejected]
    return Selection(
        index=_cheapest(certified, costs),
        certified=certified,
        pvalues=pvalues,
        order=order,
        learn_risk=learn_risk,
        test_risk=test_risk,
        n_learn=n_examples - n_test,
        n_test=n_test,
        method=method,
        tolerance=float(tolerance),
        delta=float(delta),
    )


def naive_select(losses: Any, cost: Sequence[float], tolerance: float) -> int | None:
    """The cheapest setting whose empirical risk on all examples is <= ``tolerance``: deliberately NOT valid.

    No test, no error budget: among settings whose true risk is slightly above the tolerance, the ones that got
    lucky on the calibration data pass, and the cheapest of them is chosen. Kept as the control that shows what
    :func:`select` guards against (its violation rate exceeds any ``delta`` on such problems).
    """
    matrix = _as_loss_matrix(losses)
    costs = _as_costs(cost, matrix.shape[0])
    _check_tolerance(tolerance)
    risks = matrix.mean(axis=1)
    return _cheapest([s for s in range(matrix.shape[0]) if risks[s] <= tolerance], costs)
