"""Paired statistics for intervention effects: bootstrap intervals and exact paired tests.

Every comparison embedlens reports is *paired*: a condition and its reference
(the baseline, or the condition's matched random control) were run on the same
samples, so the unit of resampling and of the test is the sample.

- **Confidence interval of a difference**: BCa bootstrap (bias-corrected and
  accelerated) of the mean paired difference, resampling samples with
  replacement (`RESAMPLES` draws by default, seeded). A percentile bootstrap is
  too narrow at small n; BCa corrects most of that, and below `MIN_N` samples
  the report says that no bootstrap interval is to be trusted.
- **Interval of a proportion** (an accuracy's mean): Wilson score interval
  (`wilson_interval`; `clopper_pearson` gives the exact one). It is never the
  zero-width ``[1, 1]`` a bootstrap gives for 7 of 7 right.
- **Accuracies** (0/1 per sample): exact McNemar test, i.e. a two-sided
  binomial test with p = 1/2 on the discordant pairs.
- **Continuous metrics**: paired sign-flip permutation test of the mean
  difference; exact (all 2^n sign patterns) for n <= `EXACT_MAX_N`, else
  `RESAMPLES` seeded random sign patterns with the (k + 1) / (R + 1) p-value.
- **A quantity that does not vary** (the same value on every sample under both
  runs, or the same difference on every sample) is not tested: it is
  ``deterministic`` and the row says so.
- **Minimum detectable effect** (`mde`): the smallest true mean difference the
  test finds with probability `POWER` at level `ALPHA`, at the run's n.
- **Holm** (`holm`): step-down adjusted p-values across a family of comparisons.

Only numpy and the standard library are needed; the tests check every
function against scipy.stats.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from embedlens.errors import InputError

#: Default number of bootstrap resamples (and of random sign patterns when a permutation test is not exact).
RESAMPLES = 10_000
#: Permutation tests enumerate every sign pattern up to this many non-zero differences.
EXACT_MAX_N = 16
#: Below this many samples no bootstrap interval is to be trusted (the report warns; decide with the exact test).
MIN_N = 20
#: Level and power at which the minimum detectable effect is computed.
ALPHA = 0.05
POWER = 0.8
#: Cap on resample x sample entries drawn at once (memory), fixed so the draws do not depend on it.
_CHUNK_ENTRIES = 1 << 21


def seed_for(seed: int, *parts: object) -> int:
    """A seed for one comparison: the run's seed and the comparison's name, so adding a
    condition to a plan does not move the intervals of the others.

    Example:
        >>> seed_for(0, "prune_dead", "baseline") == seed_for(0, "prune_dead", "baseline")
        True
    """
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode())


def is_binary(values: Sequence[float]) -> bool:
    """True when every finite value is 0 or 1 (an accuracy): such a metric is tested with McNemar.

    Example:
        >>> is_binary([1.0, 0.0, float("nan")]), is_binary([0.5, 1.0])
        (True, False)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return v.size > 0 and bool(np.all((v == 0) | (v == 1)))


def _check(resamples: int, confidence: float) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise InputError(f"resamples: expected a positive integer; got {resamples!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence: expected a level in (0, 1), e.g. 0.95; got {confidence!r}")


def bootstrap_means(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`[resamples]`: the mean of each bootstrap resample of `values` (samples drawn with replacement).

    The draws depend only on `seed`, `resamples` and the number of values.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return np.full(resamples, np.nan)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ENTRIES // n)
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # [rows, n]
        out[start:stop] = x[idx].mean(axis=1)
    return out


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN, NaN when there are none).

    For paired data pass the per-sample differences: resampling them resamples pairs.

    Example:
        >>> bootstrap_ci([0.25, 0.25, 0.25])
        (0.25, 0.25)
    """
    _check(resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    means = bootstrap_means(x, resamples, seed)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


_NORMAL = NormalDist()


def _level(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise InputError(f"confidence: expected a level in (0, 1), e.g. 0.95; got {confidence!r}")


def _counts(k: int, n: int) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name}: expected a count (an integer >= 0); got {v!r}")
    if k > n:
        raise InputError(f"k: expected at most n = {n} successes; got {k}")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: `k` successes of `n` (NaN, NaN when n = 0).

    Unlike a bootstrap, it has width at 0 of n or n of n (7 of 7 right is not ``[1, 1]``),
    and it keeps close to its level at small n.

    Example:
        >>> [round(v, 4) for v in wilson_interval(7, 7)]
        [0.6457, 1.0]
    """
    _counts(k, n)
    _level(confidence)
    if n == 0:
        return (math.nan, math.nan)
    z = _NORMAL.inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half) if k > 0 else 0.0, min(1.0, centre + half) if k < n else 1.0)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for any n a run has)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1)
    logs = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in range(k + 1)])
            + i * math.log(p) + (n - i) * math.log1p(-p))
    return float(np.exp(logs).sum())


def _solve(f, target: float) -> float:
    """The p in [0, 1] where the decreasing function `f(p)` crosses `target` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a proportion: `k` successes of `n` (NaN, NaN when n = 0).

    The bounds are where an exact binomial test at level ``(1 - confidence) / 2`` per side
    stops rejecting; it covers at least `confidence` for every true proportion.

    Example:
        >>> [round(v, 4) for v in clopper_pearson(0, 10)]
        [0.0, 0.3085]
    """
    _counts(k, n)
    _level(confidence)
    if n == 0:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2
    # P(X >= k | p) = P(Y <= n - k | 1 - p), Y the failures: the lower bound from the same decreasing tail
    lo = 0.0 if k == 0 else 1.0 - _solve(lambda q: _binom_cdf(n - k, n, q), tail)
    hi = 1.0 if k == n else _solve(lambda p: _binom_cdf(k, n, p), tail)
    return (lo, hi)


def bca_ci(values: Sequence[float], resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """BCa (bias-corrected and accelerated) bootstrap interval of the mean of `values`.

    The percentile interval's quantiles are moved by the bootstrap's median bias
    (z0) and the jackknife skewness (acceleration a), which a percentile interval
    ignores and which make it too narrow at small n (Efron 1987). Constant values
    give a point interval; no values give (NaN, NaN).

    Example:
        >>> bca_ci([0.25, 0.25, 0.25])
        (0.25, 0.25)
    """
    _check(resamples, confidence)
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return (math.nan, math.nan)
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    means = bootstrap_means(x, resamples, seed)
    theta = x.mean()
    below = (np.sum(means < theta) + 0.5 * np.sum(means == theta)) / resamples
    below = min(max(below, 0.5 / resamples), 1 - 0.5 / resamples)
    z0 = _NORMAL.inv_cdf(below)
    jack = (x.sum() - x) / (n - 1)  # [n] leave-one-out means
    dj = jack.mean() - jack
    den = 6.0 * float(np.sum(dj * dj)) ** 1.5
    a = float(np.sum(dj**3)) / den if den > 0 else 0.0
    alpha = 1.0 - confidence
    qs = []
    for z in (_NORMAL.inv_cdf(alpha / 2), _NORMAL.inv_cdf(1 - alpha / 2)):
        qs.append(_NORMAL.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
    lo, hi = np.quantile(means, qs)
    return (float(lo), float(hi))


def alpha_of(confidence: float) -> float:
    """The test level that goes with a `confidence` interval: ``1 - confidence``, rounded so 0.95 gives exactly 0.05
    (a p-value of 0.05 is then not "below" the level by floating-point noise).

    Example:
        >>> alpha_of(0.95), alpha_of(0.99)
        (0.05, 0.01)
    """
    return round(1.0 - confidence, 12)


def mcnemar_min_discordant(alpha: float = ALPHA) -> int:
    """The fewest discordant pairs, all one way, with which the exact McNemar test can reach p < `alpha`.

    Example:
        >>> mcnemar_min_discordant(0.05)
        6
    """
    m = 1
    while 2.0 / 2**m >= alpha:
        m += 1
    return m


def mde(diffs: Sequence[float], binary: bool, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a paired comparison at n = len(diffs): the smallest true mean difference
    a two-sided test at level `alpha` detects with probability `power` (normal approximation).

    ``c = z(1 - alpha/2) + z(power)``. A continuous metric: ``c * s / sqrt(n)``, s the standard deviation of
    the paired differences. An accuracy: the differences are -1, 0 or 1 and their variance is at most the
    discordant share pi, which an effect of size delta makes at least delta; so
    ``max(c * sqrt(pi / n), c**2 / n, m / n)``, m the fewest discordant pairs that can reach significance
    (`mcnemar_min_discordant`). NaN without differences.

    Infinite when no effect can be detected: below m samples both exact tests (McNemar, and the sign-flip
    test, whose smallest p-value with n differences is also ``2 / 2**n``) cannot reach p < `alpha`
    whatever the data.

    Example:
        >>> round(mde([0.0] * 12, binary=True), 3)  # 12 samples, no discordant pair: only very large effects show
        0.654
        >>> mde([0.3, 0.1, 0.2, 0.4, 0.2], binary=False)  # 5 samples: p >= 2 / 2**5 = 0.0625 on any data
        inf
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return math.nan
    c = _NORMAL.inv_cdf(1 - alpha / 2) + _NORMAL.inv_cdf(power)
    floor = mcnemar_min_discordant(alpha)
    if n < max(2, floor):  # the exact test cannot reach alpha (and one sample has no spread)
        return math.inf
    if binary:
        pi = float(np.mean(d != 0))
        # at most 1: with n >= m samples, every one flipping one way is always detected
        return min(1.0, max(c * math.sqrt(pi / n), c * c / n, floor / n))
    return c * float(np.std(d, ddof=1)) / math.sqrt(n)


def power_note(n: int, detectable: float, what: str = "change", alpha: float = ALPHA) -> str:
    """The clause a verdict ends with: what n samples can detect (`detectable`, from `mde` at level `alpha`);
    "" when it is NaN.

    Example:
        >>> power_note(12, 0.654)
        '; at n = 12 only a change of 0.654 or more is likely to be detected'
        >>> power_note(4, math.inf)
        '; at n = 4 no change can be detected: the exact test cannot reach p < 0.05 with fewer than 6 samples'
    """
    if not isinstance(detectable, (int, float)) or math.isnan(detectable):
        return ""
    if math.isinf(detectable):
        return (f"; at n = {n} no {what} can be detected: the exact test cannot reach p < {alpha:g} with fewer than "
                f"{mcnemar_min_discordant(alpha)} samples")
    return f"; at n = {n} only a {what} of {detectable:.3g} or more is likely to be detected"


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries are left out of the family and stay NaN).

    The i-th smallest of m p-values becomes ``max over j <= i of min(1, (m - j + 1) * p_(j))``.

    Example:
        >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    keep = np.flatnonzero(np.isfinite(p))
    m = keep.size
    if m == 0:
        return out
    order = keep[np.argsort(p[keep], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    `b`: pairs where only the first is right; `c`: only the second. Under the
    null each discordant pair goes either way with probability 1/2, so the
    p-value is ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``
    (scipy's `binomtest(b, b + c, 0.5)`; the binomial is symmetric).

    Example:
        >>> mcnemar_exact(0, 0), round(mcnemar_exact(0, 5), 4)
        (1.0, 0.0625)
    """
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{name}: expected a count of discordant pairs (an integer >= 0); got {v!r}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); exact integers, one division at the end
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def sign_flip_test(diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, bool]:
    """Two-sided paired permutation test of mean(diffs) = 0 by flipping the signs of the differences.

    Returns ``(p_value, exact)``: exact over all 2^n sign patterns of the
    non-zero differences when there are at most `EXACT_MAX_N` of them, else
    estimated from `resamples` seeded patterns as (k + 1) / (resamples + 1).
    A pattern counts when its |mean| reaches the observed one (with a relative
    tolerance of 1e-9 for rounding).
    """
    _check(resamples, 0.5)
    d = np.asarray(diffs, dtype=np.float64)
    d = d[d != 0]
    if d.size == 0:
        return (1.0, True)
    observed = abs(d.sum())
    tol = 1e-9 * max(observed, np.abs(d).max())
    if d.size <= EXACT_MAX_N:
        patterns = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)[None, :]) & 1) * 2 - 1  # [2^n, n]
        sums = np.abs(patterns @ d)
        return (float(np.mean(sums >= observed - tol)), True)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ENTRIES // d.size)
    hits = 0
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        signs = rng.integers(0, 2, size=(stop - start, d.size)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return ((hits + 1) / (resamples + 1), False)


@dataclass
class Paired:
    """One paired comparison of a condition (x) with a reference (y) on the same samples."""

    n: int
    mean: float
    mean_reference: float
    diff: float
    diff_ci_low: float
    diff_ci_high: float
    test: str
    p_value: float
    #: McNemar's discordant pairs: x right and y wrong (`x_only`), the reverse (`reference_only`); -1 for other tests.
    x_only: int = -1
    reference_only: int = -1
    #: The smallest true difference the test detects with probability `POWER` at level ``1 - confidence``, at this n (`mde`).
    mde: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def paired(
    x: Sequence[float],
    y: Sequence[float],
    binary: bool | None = None,
    resamples: int = RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Paired:
    """Compare `x` with `y` sample by sample: mean difference, BCa bootstrap interval, a paired test and the
    minimum detectable effect.

    Pairs where either value is NaN are dropped. `binary` (default: both
    are 0/1) selects exact McNemar, else the sign-flip permutation test. A
    continuous metric whose paired difference is the same on every sample (it
    does not vary: a token count both runs set alike) gets no test: its `test`
    is ``"deterministic"`` and its p-value NaN.

    Example:
        >>> r = paired([1, 1, 1, 0], [0, 0, 1, 0])
        >>> r.diff, r.test, r.x_only, r.reference_only, r.p_value
        (0.5, 'mcnemar_exact', 2, 0, 0.5)
        >>> paired([576.0, 576.0], [576.0, 576.0]).test
        'deterministic'
    """
    _check(resamples, confidence)
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"paired: x and y must be 1-D and of one length; got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if binary is None:
        binary = is_binary(a) and is_binary(b)
    n = int(a.size)
    if n == 0:
        nan = math.nan
        return Paired(0, nan, nan, nan, nan, nan, "mcnemar_exact" if binary else "sign_flip_permutation", nan)
    d = a - b
    mean_a, mean_b, diff = float(a.mean()), float(b.mean()), float(d.mean())
    if not binary and np.all(d == d[0]):
        return Paired(n, mean_a, mean_b, diff, float(d[0]), float(d[0]), "deterministic", math.nan, mde=math.nan)
    lo, hi = bca_ci(d, resamples, confidence, seed)
    if binary:
        x_only, ref_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        return Paired(n, mean_a, mean_b, diff, lo, hi, "mcnemar_exact", mcnemar_exact(x_only, ref_only), x_only, ref_only,
                      mde=mde(d, True, alpha_of(confidence)))
    p, exact = sign_flip_test(d, resamples, seed)
    return Paired(n, mean_a, mean_b, diff, lo, hi, "sign_flip_permutation" + ("" if exact else "_sampled"), p,
                  mde=mde(d, False, alpha_of(confidence)))


__all__ = ["ALPHA", "alpha_of", "EXACT_MAX_N", "MIN_N", "POWER", "RESAMPLES", "Paired", "bca_ci", "bootstrap_ci", "bootstrap_means",
           "clopper_pearson", "holm", "is_binary", "mcnemar_exact", "mcnemar_min_discordant", "mde", "paired", "power_note", "seed_for",
           "sign_flip_test", "wilson_interval"]
