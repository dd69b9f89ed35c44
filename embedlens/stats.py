"""Paired statistics for intervention effects: bootstrap intervals and exact paired tests.

Every comparison embedlens reports is *paired*: a condition and its reference
(the baseline, or the condition's matched random control) were run on the same
samples, so the unit of resampling and of the test is the sample.

- **Confidence interval**: percentile bootstrap of the mean paired difference
  (resampling samples with replacement; `RESAMPLES` draws by default, seeded).
- **Accuracies** (0/1 per sample): exact McNemar test, i.e. a two-sided
  binomial test with p = 1/2 on the discordant pairs.
- **Continuous metrics**: paired sign-flip permutation test of the mean
  difference; exact (all 2^n sign patterns) for n <= `EXACT_MAX_N`, else
  `RESAMPLES` seeded random sign patterns with the (k + 1) / (R + 1) p-value.

Only numpy is needed; the tests check every function against scipy.stats.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from embedlens.errors import InputError

#: Default number of bootstrap resamples (and of random sign patterns when a permutation test is not exact).
RESAMPLES = 10_000
#: Permutation tests enumerate every sign pattern up to this many non-zero differences.
EXACT_MAX_N = 16
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
    """Compare `x` with `y` sample by sample: mean difference, bootstrap interval and a paired test.

    Pairs where either value is NaN are dropped. `binary` (default: both
    are 0/1) selects exact McNemar, else the sign-flip permutation test.

    Example:
        >>> r = paired([1, 1, 1, 0], [0, 0, 1, 0])
        >>> r.diff, r.test, r.x_only, r.reference_only, r.p_value
        (0.5, 'mcnemar_exact', 2, 0, 0.5)
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
    lo, hi = bootstrap_ci(d, resamples, confidence, seed)
    if binary:
        x_only, ref_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        return Paired(n, float(a.mean()), float(b.mean()), float(d.mean()), lo, hi, "mcnemar_exact",
                      mcnemar_exact(x_only, ref_only), x_only, ref_only)
    p, exact = sign_flip_test(d, resamples, seed)
    return Paired(n, float(a.mean()), float(b.mean()), float(d.mean()), lo, hi,
                  "sign_flip_permutation" + ("" if exact else "_sampled"), p)


__all__ = ["EXACT_MAX_N", "RESAMPLES", "Paired", "bootstrap_ci", "bootstrap_means", "is_binary", "mcnemar_exact", "paired",
           "seed_for", "sign_flip_test"]
