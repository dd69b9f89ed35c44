"""embedlens.stats against independent computations: scipy.stats and hand-computed planted cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from embedlens.errors import InputError
from embedlens.stats import (bca_ci, bootstrap_ci, bootstrap_means, clopper_pearson, holm, is_binary, mcnemar_exact,
                             mcnemar_min_discordant, mde, paired, power_note, sign_flip_test, wilson_interval)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (3, 0), (2, 7), (10, 10), (15, 4), (60, 41), (400, 350)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    want = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_mcnemar_by_hand():
    # 0 vs 5 discordant pairs: 2 * (1/2)^5 = 1/16; 1 vs 4: 2 * (1 + 5) / 32 = 0.375
    assert mcnemar_exact(0, 5) == 1 / 16
    assert mcnemar_exact(4, 1) == 0.375
    with pytest.raises(InputError, match="b: expected a count"):
        mcnemar_exact(-1, 2)


def test_paired_accuracy_counts_discordant_pairs():
    x = [1, 1, 1, 1, 0, 0, 1, float("nan"), 1]
    y = [0, 0, 1, 0, 0, 1, 1, 1, float("nan")]
    r = paired(x, y, seed=3)
    # NaN pairs dropped: 7 pairs left; x right only at 0, 1, 3; y right only at 5
    assert (r.n, r.x_only, r.reference_only, r.test) == (7, 3, 1, "mcnemar_exact")
    assert r.diff == pytest.approx(2 / 7) and r.mean == pytest.approx(5 / 7) and r.mean_reference == pytest.approx(3 / 7)
    assert r.p_value == pytest.approx(sps.binomtest(3, 4, 0.5).pvalue)
    assert r.diff_ci_low <= r.diff <= r.diff_ci_high


def test_sign_flip_exact_matches_scipy_permutation_test():
    rng = np.random.default_rng(1)
    for n in (5, 9, 12):
        d = rng.normal(0.4, 1.0, size=n)
        res = sps.permutation_test((d,), lambda s, axis: np.mean(s, axis=axis), permutation_type="samples",
                                   n_resamples=np.inf, alternative="two-sided")
        p, exact = sign_flip_test(d)
        assert exact and p == pytest.approx(res.pvalue, rel=1e-9)


def test_sign_flip_by_hand_and_sampled():
    # d = [1, 2, 3]: |sum| over the 8 sign patterns: 6, 4, 2, 0, 0, 2, 4, 6 -> two reach 6: p = 2/8
    assert sign_flip_test([1.0, 2.0, 3.0]) == (0.25, True)
    assert sign_flip_test([0.0, 0.0]) == (1.0, True)
    # 40 positive differences: far beyond chance; sampled, p = 1 / (R + 1)
    p, exact = sign_flip_test(np.ones(40), resamples=999, seed=0)
    assert not exact and p == pytest.approx(1 / 1000)
    # a sampled p-value agrees with scipy's Monte Carlo one within its noise
    d = np.random.default_rng(2).normal(0.15, 1.0, size=30)
    p, _ = sign_flip_test(d, resamples=20000, seed=0)
    ref = sps.permutation_test((d,), lambda s, axis: np.mean(s, axis=axis), permutation_type="samples", n_resamples=20000,
                               alternative="two-sided", rng=np.random.default_rng(0)).pvalue
    assert abs(p - ref) < 0.02


def test_bootstrap_on_a_planted_case_by_hand():
    # two values 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    means = bootstrap_means([0.0, 1.0], resamples=40000, seed=0)
    freq = {v: np.mean(means == v) for v in (0.0, 0.5, 1.0)}
    assert freq[0.0] == pytest.approx(0.25, abs=0.01) and freq[0.5] == pytest.approx(0.5, abs=0.01)
    assert bootstrap_ci([0.0, 1.0], resamples=40000, confidence=0.95) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], resamples=40000, confidence=0.4) == (0.5, 0.5)  # 30% and 70% quantiles
    # 0/1 values, k of n ones: the resample mean is Binomial(n, k/n) / n; its 2.5% / 97.5% quantiles
    n, k = 20, 14
    lo, hi = bootstrap_ci([1.0] * k + [0.0] * (n - k), resamples=40000, seed=5)
    want = sps.binom(n, k / n).ppf([0.025, 0.975]) / n
    assert (lo, hi) == pytest.approx(tuple(want), abs=1 / n + 1e-9)
    # the same seed gives the same interval; constant data a point interval
    assert bootstrap_ci([0.3, 0.9, 0.1], seed=7) == bootstrap_ci([0.3, 0.9, 0.1], seed=7)
    assert bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_bootstrap_agrees_with_scipy_percentile():
    d = np.random.default_rng(4).normal(0.2, 1.0, size=50)
    lo, hi = bootstrap_ci(d, resamples=20000, seed=1)
    ref = sps.bootstrap((d,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95, rng=np.random.default_rng(1))
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03) and hi == pytest.approx(ref.confidence_interval.high, abs=0.03)


def test_paired_continuous_and_errors():
    x = [0.5, 1.5, 2.0, 3.5]
    y = [0.0, 1.0, 1.0, 3.0]
    r = paired(x, y)
    assert r.test == "sign_flip_permutation" and r.diff == pytest.approx(0.625)
    assert r.p_value == pytest.approx(2 / 16)  # all differences positive: only the two all-same-sign patterns reach it
    assert is_binary([0, 1, 1]) and not is_binary([0, 2]) and not is_binary([])
    assert paired([], []).n == 0
    with pytest.raises(InputError, match="confidence: expected a level"):
        paired(x, y, confidence=95)
    with pytest.raises(InputError, match="one length"):
        paired([1, 0], [1])


@pytest.mark.parametrize("k,n", [(0, 10), (7, 7), (3, 12), (41, 41), (50, 96), (1, 1), (0, 1), (13, 200)])
def test_proportion_intervals_match_scipy(k, n):
    ref = sps.binomtest(k, n)
    for ours, method in ((wilson_interval(k, n), "wilson"), (clopper_pearson(k, n), "exact")):
        want = ref.proportion_ci(confidence_level=0.95, method=method)
        assert ours == pytest.approx((want.low, want.high), abs=1e-9)
    want = sps.binomtest(k, n).proportion_ci(confidence_level=0.8, method="exact")
    assert clopper_pearson(k, n, 0.8) == pytest.approx((want.low, want.high), abs=1e-9)


def test_proportion_intervals_cover_at_small_n():
    # the cases: 7 of 7 and 0 of 41 are not the zero-width [1, 1] and [0, 0] of a bootstrap
    assert wilson_interval(7, 7)[0] < 0.7 and wilson_interval(0, 41)[1] > 0.08
    # exact coverage of Clopper-Pearson at n = 12 over a grid of true proportions: at least 95% everywhere
    n = 12
    bounds = [clopper_pearson(k, n) for k in range(n + 1)]
    for p in np.linspace(0.01, 0.99, 25):
        cover = sum(sps.binom.pmf(k, n, p) for k, (lo, hi) in enumerate(bounds) if lo <= p <= hi)
        assert cover >= 0.95 - 1e-9
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(InputError, match="k: expected at most"):
        wilson_interval(3, 2)


def test_bca_matches_scipy():
    d = np.random.default_rng(4).gamma(1.0, 1.0, size=15)  # skewed: BCa and percentile differ
    ref = sps.bootstrap((d,), np.mean, n_resamples=20000, method="BCa", confidence_level=0.9, rng=np.random.default_rng(1))
    lo, hi = bca_ci(d, resamples=20000, confidence=0.9, seed=1)
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.02)
    assert bca_ci([2.0] * 4) == (2.0, 2.0)


def test_mde_against_the_closed_form():
    c = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    d = np.random.default_rng(2).normal(0.1, 0.7, size=30)
    assert mde(d, binary=False) == pytest.approx(c * np.std(d, ddof=1) / np.sqrt(30))
    # accuracies: 12 samples without a discordant pair -> c^2 / n; 96 samples with 30 discordant -> c sqrt(pi / n)
    assert mde([0.0] * 12, binary=True) == pytest.approx(c * c / 12)
    d96 = np.array([1.0] * 10 + [-1.0] * 20 + [0.0] * 66)
    assert mde(d96, binary=True) == pytest.approx(c * np.sqrt(30 / 96 / 96))
    # the exact test's own floor: 6 one-way discordant pairs are the fewest that reach p < 0.05
    assert mcnemar_min_discordant(0.05) == 6 and mcnemar_exact(0, 6) < 0.05 <= mcnemar_exact(0, 5)
    assert mde([1.0] * 6, binary=True) == 1.0  # 6 of 6 flipping one way is always detected: at most 1
    # the MDE is what a z-test detects 80% of the time (a simulation independent of the formula's code)
    rng = np.random.default_rng(3)
    n, sd = 40, 1.0
    delta = c * sd / np.sqrt(n)
    z = rng.normal(delta, sd, size=(20000, n)).mean(axis=1) / (sd / np.sqrt(n))
    assert np.mean(np.abs(z) > sps.norm.ppf(0.975)) == pytest.approx(0.8, abs=0.015)


def test_mde_is_infinite_where_the_exact_test_cannot_reach_alpha():
    """Below 6 samples no data can give p < 0.05 (scipy's exact tests on the most extreme data: every sample one way,
    McNemar and the sign-flip test), so the smallest detectable effect is infinite, and the verdict says none can be
    detected; was: a finite mde (1.0 for an accuracy, c s / sqrt(n) otherwise) promising a detection that cannot happen."""
    from embedlens.plan.conclusions import verdict

    for n in range(1, 6):
        extreme = np.linspace(1.0, 2.0, n)  # all positive: the smallest p either test can give
        assert sps.binomtest(n, n, 0.5).pvalue >= 0.05
        if n > 1:
            perm = sps.permutation_test((extreme,), np.mean, permutation_type="samples", n_resamples=np.inf)
            assert perm.pvalue >= 0.05
        assert mde(extreme, binary=False) == math.inf and mde([1.0] * n, binary=True) == math.inf
        assert paired(extreme, np.zeros(n)).mde == math.inf
    assert sps.binomtest(6, 6, 0.5).pvalue < 0.05 and math.isfinite(mde(np.linspace(1.0, 2.0, 6), binary=False))
    row = {"reference": "baseline", "test": "sign_flip_permutation", "n": 4, "diff": 0.5, "diff_ci_low": 0.1,
           "diff_ci_high": 0.9, "p_value": 0.125, "p_holm": 0.125, "mde": mde([0.2, 0.4, 0.6, 0.8], binary=False)}
    said = verdict(row, accuracy=False)
    assert "no change can be detected" in said and "only a change of" not in said


def test_the_mde_and_power_clause_take_the_level_of_the_interval():
    """paired() at confidence 0.99 computes the MDE at level 0.01 (closed form with z(0.995)); the power clause names
    that level and its exact-test floor (8 one-way pairs: scipy's binomial test). Was: always level 0.05."""
    d = np.random.default_rng(4).normal(0.3, 1.0, size=30)
    r = paired(d, np.zeros(30), confidence=0.99)
    want = (sps.norm.ppf(0.995) + sps.norm.ppf(0.8)) * np.std(d, ddof=1) / np.sqrt(30)
    assert r.mde == pytest.approx(want) and paired(d, np.zeros(30)).mde < r.mde
    assert sps.binomtest(8, 8, 0.5).pvalue < 0.01 <= sps.binomtest(7, 7, 0.5).pvalue
    assert power_note(7, math.inf, "change", 0.01).endswith("cannot reach p < 0.01 with fewer than 8 samples")
    assert paired([1.0] * 7, [0.0] * 7, confidence=0.99).mde == math.inf


def test_holm_by_hand():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    got = holm([0.03, 0.01, float("nan"), 0.04, 0.02])
    assert got[[1, 4, 0, 3]] == pytest.approx([0.04, 0.06, 0.06, 0.06]) and math.isnan(got[2])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_a_quantity_that_does_not_vary_gets_no_test():
    r = paired([576.0] * 8, [576.0] * 8)
    assert r.test == "deterministic" and math.isnan(r.p_value) and (r.diff_ci_low, r.diff_ci_high) == (0.0, 0.0)
    r = paired([10.0, 20.0, 30.0], [8.0, 18.0, 28.0])  # the same difference on every sample
    assert r.test == "deterministic" and r.diff == pytest.approx(2.0)
    assert paired([0.1, 0.5, 0.2], [0.0, 0.1, 0.2]).test == "sign_flip_permutation"


# -- the columns figures and reports draw: standard errors and interval quantiles (issue 29) ----------------------------
def test_effect_sem_is_the_standard_error_not_the_standard_deviation():
    """The effects table's ``sem`` (the figures' error bars) is sd(ddof=1) / sqrt(n), per condition and column, against
    numpy; the standard deviation itself is sqrt(n) times larger and fails at any tolerance used here."""
    from embedlens.plan.effects import EffectSummary

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.4, 0.2, 25), rng.normal(-1.0, 2.0, 9)
    es = EffectSummary()
    es.add({"condition": ["c"] * 25, "sample": list(range(25)), "m": a.tolist()})
    es.add({"condition": ["d"] * 9, "sample": list(range(9)), "m": b.tolist(), "x": [float("nan")] * 9})
    st = es.stats()
    for cond, x in (("c", a), ("d", b)):
        assert st[cond]["m"]["n"] == len(x)
        assert st[cond]["m"]["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert st[cond]["m"]["sem"] == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), rel=1e-9)
    assert "x" not in st["d"]  # NaN skipped, not counted


def test_bootstrap_interval_takes_the_alpha_over_two_quantiles():
    """At 95%: the 2.5% and 97.5% quantiles of the bootstrap means (same draws), and, independently, normal theory's
    mean +- 1.96 sd / sqrt(n) within 3% on n = 400; alpha instead of alpha / 2 (mean +- 1.645 se) is 16% narrower."""
    x = np.random.default_rng(11).normal(2.0, 1.0, 400)
    lo, hi = bootstrap_ci(x, resamples=20000, confidence=0.95, seed=4)
    means = bootstrap_means(x, 20000, 4)
    assert (lo, hi) == tuple(np.quantile(means, [0.025, 0.975]))
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.03)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.05 * half)
    lo90, hi90 = bootstrap_ci(x, resamples=20000, confidence=0.90, seed=4)
    assert (hi90 - lo90) / 2 == pytest.approx(1.644854 / 1.959964 * half, rel=0.03)
