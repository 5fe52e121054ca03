"""Learn-then-Test (condformer.dial.ltt): the p-value, the family-wise tests, and the risk-control guarantee.

The guarantee test is the point: over many calibration draws of a problem whose true risks are known, the chosen
setting's true risk exceeds the tolerance in at most a ``delta`` share of draws (up to sampling noise), while the
naive choice (cheapest setting that looks good enough) exceeds it far more often.
"""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from condformer.dial.ltt import (
    Selection,
    binomial_cdf,
    bonferroni_test,
    fixed_sequence_test,
    hoeffding_bentkus_pvalue,
    naive_select,
    pareto_order,
    select,
)
from condformer.errors import CondformerError


def exact_binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k) in exact rational arithmetic (p taken as the exact value of the float)."""
    q = Fraction(p)
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(max(k, -1) + 1)))


def reference_pvalue(losses_counted: int, n: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value written out independently, for 0/1 losses (risk_hat = losses_counted / n)."""
    a = min(losses_counted / n, alpha)
    kl = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    return min(1.0, math.exp(-n * kl), math.e * exact_binomial_cdf(losses_counted, n, alpha))


# ---------------------------------------------------------------------------------------------- the p-value


def test_binomial_cdf_matches_exact_sum_for_small_n():
    for alpha in (0.01, 0.05, 0.1, 0.3, 0.5, 0.9):
        for k in range(-1, 21):
            exact = exact_binomial_cdf(k, 20, alpha)
            assert math.isclose(binomial_cdf(k, 20, alpha), exact, rel_tol=1e-12, abs_tol=0.0), (alpha, k)


def test_pvalue_matches_formula_for_small_n():
    n = 20
    for alpha in (0.05, 0.1, 0.25, 0.5):
        for count in range(n + 1):
            got = hoeffding_bentkus_pvalue(count / n, n, alpha)
            assert math.isclose(got, reference_pvalue(count, n, alpha), rel_tol=1e-12, abs_tol=0.0), (alpha, count)


def test_pvalue_counts_losses_despite_rounding_of_the_mean():
    # 25 * (7 / 25) == 7.000000000000001: a plain ceil would count 8 losses and inflate the p-value.
    assert 25 * (7 / 25) > 7
    assert hoeffding_bentkus_pvalue(7 / 25, 25, 0.5) == pytest.approx(reference_pvalue(7, 25, 0.5), rel=1e-12)
    assert hoeffding_bentkus_pvalue(7 / 25, 25, 0.5) < reference_pvalue(8, 25, 0.5)


def test_pvalue_range_monotonicity_and_no_evidence_at_or_above_alpha():
    for n in (1, 7, 50, 400, 5000):
        for alpha in (0.01, 0.05, 0.2, 0.5):
            risks = np.linspace(0.0, 1.0, 101)
            pvalues = [hoeffding_bentkus_pvalue(float(r), n, alpha) for r in risks]
            assert all(0.0 <= p <= 1.0 for p in pvalues)
            assert all(later >= earlier for earlier, later in zip(pvalues, pvalues[1:], strict=False)), (n, alpha)
            assert all(p == 1.0 for r, p in zip(risks, pvalues, strict=True) if r >= alpha), (n, alpha)
    # strictly more evidence as the empirical risk drops well below alpha
    at_zero, at_half, at_alpha = (hoeffding_bentkus_pvalue(r, 400, 0.1) for r in (0.0, 0.05, 0.1))
    assert at_zero < at_half < at_alpha == 1.0
    assert at_zero == pytest.approx(min(0.9**400, math.e * 0.9**400))


def test_pvalue_is_fast_and_sane_for_a_million_losses():
    n, alpha = 10**6, 0.05
    start = time.perf_counter()
    near_mean = binomial_cdf(n // 20, n, alpha)
    slightly_below = hoeffding_bentkus_pvalue(0.049, n, alpha)
    far_below = hoeffding_bentkus_pvalue(0.04, n, alpha)
    assert time.perf_counter() - start < 2.0
    assert 0.49 < near_mean < 0.51  # the binomial median sits at its mean
    hoeffding_only = math.exp(-n * (0.049 * math.log(0.049 / alpha) + 0.951 * math.log(0.951 / 0.95)))
    assert 0.0 < slightly_below <= hoeffding_only < 1e-4
    assert far_below == 0.0 or far_below < 1e-100


def test_pvalue_is_super_uniform_when_the_true_risk_is_alpha():
    n, alpha, draws, level = 100, 0.1, 2000, 0.1
    counts = np.random.default_rng(1).binomial(n, alpha, size=draws)  # Bernoulli(alpha) losses, summed
    pvalue_of_count = {c: hoeffding_bentkus_pvalue(c / n, n, alpha) for c in set(counts.tolist())}
    rejected = np.mean([pvalue_of_count[c] <= level for c in counts.tolist()])
    assert rejected <= level + 3 * math.sqrt(level * (1 - level) / draws)


# ---------------------------------------------------------------------------------------------- the tests


def test_fixed_sequence_rejects_a_prefix_and_stops_at_the_first_failure():
    assert fixed_sequence_test([0.01, 0.1, 0.2, 0.001], 0.1) == [0, 1]  # p == delta is rejected
    assert fixed_sequence_test([0.2, 0.001, 0.001], 0.1) == []
    assert fixed_sequence_test([0.0, 0.05, 0.09], 0.1) == [0, 1, 2]
    assert fixed_sequence_test([], 0.1) == []


def test_bonferroni_divides_delta_by_the_number_of_hypotheses():
    assert bonferroni_test([0.01, 0.03, 0.025, 0.5], 0.1) == [0, 2]  # level 0.025, inclusive
    assert bonferroni_test([0.2, 0.001, 0.06], 0.1) == [1]  # no stopping: order does not matter
    assert bonferroni_test([0.06], 0.1) == [0]
    assert bonferroni_test([], 0.1) == []


def test_pareto_order_drops_dominated_settings():
    cost = [5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0]
    learn_risk = [0.00, 0.30, 0.02, 0.02, 0.05, 0.04, 0.04]
    # 1: costlier than 2 and riskier; 3: ties 2 on both, higher index; 4: costlier than 5 and riskier;
    # 6: ties 5; 0 survives (lowest risk of all), as do 2 and 5.
    assert pareto_order(learn_risk, cost) == [0, 2, 5]
    assert pareto_order([0.1, 0.1], [2.0, 1.0]) == [1]  # same risk, cheaper wins
    assert pareto_order([0.2, 0.1], [1.0, 1.0]) == [1]  # same cost, less risky wins


# ---------------------------------------------------------------------------------------------- select


def test_an_expensive_bad_setting_does_not_stop_the_walk():
    n = 200
    losses = np.stack([np.ones(n), np.zeros(n), np.full(n, 0.5)])  # costs 3, 2, 1: setting 0 is useless
    chosen = select(losses, [3.0, 2.0, 1.0], tolerance=0.1, delta=0.1)
    assert chosen.order == [1, 2]
    assert chosen.certified == [1]
    assert chosen.index == 1


def test_select_reports_its_evidence_consistently():
    rng = np.random.default_rng(3)
    risks = np.linspace(0.0, 0.2, 8)
    losses = (rng.random(500)[None, :] < risks[:, None]).astype(np.float64)
    cost = list(range(8, 0, -1))
    chosen = select(losses, cost, tolerance=0.1, delta=0.1, learn_fraction=0.4, seed=5)
    assert isinstance(chosen, Selection)
    assert (chosen.n_learn, chosen.n_test) == (200, 300)
    assert chosen.order == pareto_order(chosen.learn_risk, cost)
    assert list(chosen.pvalues) == chosen.order
    assert chosen.certified == chosen.order[: len(chosen.certified)]
    assert chosen.index is not None and chosen.index == chosen.certified[-1]
    assert risks[chosen.index] <= 0.1
    assert json.loads(json.dumps(chosen.to_dict())) == chosen.to_dict()

    everything = select(losses, cost, tolerance=0.1, delta=0.1, method="bonferroni")
    assert (everything.n_learn, everything.n_test, everything.learn_risk) == (0, 500, [])
    assert everything.order == list(range(8))
    assert everything.test_risk == pytest.approx(losses.mean(axis=1).tolist())
    assert everything.certified == [s for s in range(8) if everything.pvalues[s] <= 0.1 / 8]


def test_the_order_depends_only_on_the_learn_part():
    rng = np.random.default_rng(4)
    losses = (rng.random((6, 300)) < np.linspace(0.0, 0.15, 6)[:, None]).astype(np.float64)
    cost = [6, 5, 4, 3, 2, 1]
    test_part = np.random.default_rng(9).permutation(300)[150:]  # the split select documents: seed 9, half
    changed = losses.copy()
    changed[:, test_part] = 1.0 - changed[:, test_part]
    before = select(losses, cost, tolerance=0.1, delta=0.1, seed=9)
    after = select(changed, cost, tolerance=0.1, delta=0.1, seed=9)
    assert after.learn_risk == before.learn_risk
    assert after.order == before.order
    assert after.test_risk != before.test_risk


def test_select_accepts_a_torch_tensor():
    rng = np.random.default_rng(6)
    losses = (rng.random((5, 400)) < np.array([0.0, 0.01, 0.03, 0.08, 0.2])[:, None]).astype(np.float32)
    cost = [5, 4, 3, 2, 1]
    from_numpy = select(losses, cost, tolerance=0.1, delta=0.1)
    from_torch = select(torch.from_numpy(losses), cost, tolerance=0.1, delta=0.1)
    assert from_torch.to_dict() == from_numpy.to_dict()
    assert naive_select(torch.from_numpy(losses), cost, 0.1) == naive_select(losses, cost, 0.1) == 3


@pytest.mark.parametrize("method", ["fixed_sequence", "bonferroni"])
def test_select_returns_none_when_nothing_can_be_certified(method):
    losses = (np.random.default_rng(7).random((4, 400)) < 0.5).astype(np.float64)
    chosen = select(losses, [4, 3, 2, 1], tolerance=0.05, delta=0.1, method=method)
    assert chosen.index is None
    assert chosen.certified == []
    assert chosen.to_dict()["index"] is None


# ---------------------------------------------------------------------------------------------- the guarantee


@pytest.mark.parametrize("method", ["fixed_sequence", "bonferroni"])
@pytest.mark.parametrize("correlated", [True, False], ids=["shared-uniform", "independent"])
def test_risk_is_controlled_where_the_naive_choice_fails(method, correlated):
    settings, examples, draws = 20, 400, 300
    tolerance, delta = 0.05, 0.1
    true_risk = np.linspace(0.01, 0.10, settings)  # setting 8 is 0.0479, setting 9 already 0.0526
    cost = np.arange(settings, 0, -1.0)  # setting 0 the most expensive (and safest), setting 19 the cheapest
    rng = np.random.default_rng(2021 if correlated else 2022)
    # correlated: one difficulty per example, and every setting whose risk is above it fails on that example
    uniforms = rng.random((draws, 1 if correlated else settings, examples))
    all_losses = (uniforms < true_risk[None, :, None]).astype(np.float64)

    violations = naive_violations = chosen_any = 0
    for draw in range(draws):
        chosen = select(all_losses[draw], cost, tolerance, delta, method=method, seed=draw).index
        naive = naive_select(all_losses[draw], cost, tolerance)
        chosen_any += chosen is not None
        violations += chosen is not None and true_risk[chosen] > tolerance
        naive_violations += naive is not None and true_risk[naive] > tolerance

    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert violations / draws <= delta + slack, violations
    assert naive_violations / draws > delta + slack, naive_violations
    assert naive_violations > violations
    # not vacuous (returning None always would pass the above): measured 0.73 to 1.0 across the four cases
    assert chosen_any / draws >= 0.6, chosen_any


# ---------------------------------------------------------------------------------------------- bad inputs

GOOD = np.zeros((3, 10))

BAD_CALLS = [
    ("risk_hat", lambda: hoeffding_bentkus_pvalue(-0.1, 10, 0.1)),
    ("risk_hat", lambda: hoeffding_bentkus_pvalue(1.5, 10, 0.1)),
    ("risk_hat", lambda: hoeffding_bentkus_pvalue(float("nan"), 10, 0.1)),
    ("n must", lambda: hoeffding_bentkus_pvalue(0.1, 0, 0.1)),
    ("n must", lambda: hoeffding_bentkus_pvalue(0.1, 2.5, 0.1)),
    ("alpha", lambda: hoeffding_bentkus_pvalue(0.1, 10, 0.0)),
    ("alpha", lambda: hoeffding_bentkus_pvalue(0.1, 10, 1.0)),
    ("binomial p", lambda: binomial_cdf(1, 10, 1.5)),
    ("delta", lambda: fixed_sequence_test([0.1], 0.0)),
    ("delta", lambda: bonferroni_test([0.1], 1.0)),
    ("p-value 1", lambda: fixed_sequence_test([0.1, 1.5], 0.1)),
    ("p-value 0", lambda: bonferroni_test([float("nan")], 0.1)),
    ("2-D", lambda: select(np.zeros(10), [1.0], 0.1, 0.1)),
    ("2-D", lambda: select(np.zeros((2, 3, 4)), [1.0, 2.0], 0.1, 0.1)),
    ("finite", lambda: select(np.full((3, 10), np.nan), [3, 2, 1], 0.1, 0.1)),
    ("[0, 1]", lambda: select(GOOD + 1.5, [3, 2, 1], 0.1, 0.1)),
    ("[0, 1]", lambda: naive_select(GOOD - 0.1, [3, 2, 1], 0.1)),
    ("one entry per setting (3)", lambda: select(GOOD, [2, 1], 0.1, 0.1)),
    ("costs must be finite", lambda: select(GOOD, [3, float("inf"), 1], 0.1, 0.1)),
    ("tolerance", lambda: select(GOOD, [3, 2, 1], 0.0, 0.1)),
    ("tolerance", lambda: naive_select(GOOD, [3, 2, 1], 1.0)),
    ("delta", lambda: select(GOOD, [3, 2, 1], 0.1, 1.0)),
    ("'holm'", lambda: select(GOOD, [3, 2, 1], 0.1, 0.1, method="holm")),
    ("learn_fraction", lambda: select(GOOD, [3, 2, 1], 0.1, 0.1, learn_fraction=0.0)),
    ("learn_fraction", lambda: select(GOOD, [3, 2, 1], 0.1, 0.1, learn_fraction=1.0)),
    ("0 to test", lambda: select(GOOD, [3, 2, 1], 0.1, 0.1, learn_fraction=0.99)),
    ("0 to learn", lambda: select(np.zeros((3, 1)), [3, 2, 1], 0.1, 0.1)),
]


@pytest.mark.parametrize(("named", "call"), BAD_CALLS, ids=[f"{i}-{named}" for i, (named, _) in enumerate(BAD_CALLS)])
def test_bad_inputs_raise_a_one_line_error(named, call):
    with pytest.raises(CondformerError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert named in message
