"""Statistical primitives shared by the analyzers and the report.

Every interval here is an :class:`Interval` that records its estimate, its bounds, the method
and the confidence level, so that a number that compares models always travels with its
interval and with how the interval was made.

The containment guarantee
-------------------------
Every finite interval returned by this module contains its estimate. Bootstrap intervals can
miss their own estimate when the statistic is biased under resampling (a distance between
matrices estimated from few samples is larger, on average, in a resample than in the data; a
count of units above a threshold can drop in most resamples). We handle it in two ways, both
recorded on the interval:

* ``bias`` is always reported beside a bootstrap interval: ``mean(resamples) - estimate``.
  A bias that is large relative to the width says the bootstrap distribution is off-centre.
* the interval is computed with the requested method (``"percentile"``, ``"bc"`` or
  ``"bca"``); if the estimate still falls outside it, the nearer bound is moved to the
  estimate and ``widened`` is set to True. The widened interval is conservative (never
  narrower than the computed one) and says so.

Intervals that cannot be computed (no finite resamples, fewer than two members for a
t-interval, ``n == 0`` for a proportion) have ``low = high = nan``; they claim nothing and are
shown as "no interval". :func:`assert_intervals_contain_estimates` is the property check that
tests use.

Functions
---------
* :func:`interval_from_resamples` -- percentile / BC / BCa interval from given resample values.
* :func:`bootstrap_interval` -- ``scipy.stats.bootstrap`` (BCa by default) on raw data.
* :func:`paired_difference` -- interval of ``a - b`` from paired resamples (same resampled
  items for both).
* :func:`bootstrap_p_value` -- two-sided bootstrap p-value of "no difference" (percentile).
* :func:`bc_p_value` -- the p-value that agrees with the BC interval (p < 1 - level exactly
  when the BC interval excludes 0); report it beside a BC interval.
* :func:`wilson_interval` -- Wilson score interval of a proportion ``k / n``.
* :func:`t_interval` -- mean of group members (e.g. seeds) with a Student-t interval.
* :func:`holm_adjust` / :func:`holm_reject` -- Holm step-down correction over a family.
* :func:`multinomial_weights` / :func:`poisson_weights` -- resample weights per item.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from interptool.errors import AnalysisError

__all__ = [
    "Interval",
    "assert_intervals_contain_estimates",
    "bootstrap_interval",
    "bc_p_value",
    "bootstrap_p_value",
    "holm_adjust",
    "holm_reject",
    "interval_from_resamples",
    "multinomial_weights",
    "paired_difference",
    "poisson_weights",
    "t_interval",
    "wilson_interval",
]

_NAN = float("nan")
_METHODS = ("percentile", "bc", "bca")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval and how it was made.

    ``estimate``: the value on the full data; ``low``/``high``: the interval bounds (NaN when
    no interval could be made); ``level``: confidence level (0.95); ``method``: how the
    interval was made (``"percentile"``, ``"bc"``, ``"bca"``, ``"wilson"``, ``"t"``);
    ``bias``: bootstrap bias ``mean(resamples) - estimate`` (NaN for non-bootstrap methods);
    ``se``: standard error (bootstrap SD of the resamples, or SD / sqrt(n) for ``"t"``);
    ``n``: number of resamples (bootstrap), trials (Wilson) or members (t);
    ``widened``: True when the computed interval missed the estimate and its nearer bound was
    moved to the estimate (see the module docstring).
    """

    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = "percentile"
    bias: float = _NAN
    se: float = _NAN
    n: int = 0
    widened: bool = False

    @property
    def defined(self) -> bool:
        """True when both bounds are finite."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high`` (False for an undefined interval)."""
        return self.defined and bool(self.low <= value <= self.high)

    def excludes_zero(self) -> bool:
        """True when the interval is defined and lies entirely above or below 0."""
        return self.defined and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        """JSON-safe dict of all fields (NaN stays NaN; callers decide how to write it)."""
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

    def format(self, digits: int = 3) -> str:
        """``"0.42 [0.38, 0.47]"`` (or ``"0.42 (no interval)"``)."""
        if not self.defined:
            return f"{self.estimate:.{digits}g} (no interval)"
        return f"{self.estimate:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise AnalysisError(f"confidence level: expected a number strictly between 0 and 1, got {level}; "
                            "use e.g. level=0.95")
    return level


def _contain(estimate: float, low: float, high: float) -> tuple[float, float, bool]:
    """Move the nearer bound to the estimate when the interval misses it."""
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(estimate)):
        return low, high, False
    if estimate < low:
        return estimate, high, True
    if estimate > high:
        return low, estimate, True
    return low, high, False


def _proportion_below(samples: np.ndarray, estimate: float) -> float:
    """P(sample < estimate) with ties counted half, kept inside (0, 1) so z0 stays finite."""
    b = samples.size
    p = (np.count_nonzero(samples < estimate) + 0.5 * np.count_nonzero(samples == estimate)) / b
    return min(max(p, 0.5 / b), 1.0 - 0.5 / b)


def _acceleration(jackknife: np.ndarray) -> float:
    """Efron's acceleration from leave-one-out (jackknife) values of the statistic."""
    jk = np.asarray(jackknife, dtype=np.float64)
    jk = jk[np.isfinite(jk)]
    if jk.size < 2:
        return 0.0
    d = jk.mean() - jk
    den = 6.0 * float(np.sum(d * d)) ** 1.5
    return float(np.sum(d ** 3) / den) if den > 0 else 0.0


def interval_from_resamples(
    resamples: Sequence[float] | np.ndarray,
    estimate: float,
    *,
    level: float = 0.95,
    method: str = "bc",
    jackknife: Sequence[float] | np.ndarray | None = None,
) -> Interval:
    """Bootstrap interval from resample values of a statistic already computed.

    ``resamples``: the statistic on each bootstrap resample (non-finite values are ignored);
    ``estimate``: the statistic on the full data; ``method``:

    * ``"percentile"``: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles;
    * ``"bc"`` (default): Efron's bias-corrected percentile interval, quantiles
      ``Phi(2 z0 + z_alpha)`` with ``z0 = Phi^-1(P(resample < estimate))`` (ties count half);
      equal to the percentile interval when the bootstrap distribution is centred on the
      estimate;
    * ``"bca"``: BC plus acceleration ``a`` from ``jackknife`` (leave-one-out values of the
      statistic, required): quantiles ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))``.

    The interval always contains ``estimate`` (widened and flagged otherwise; see the module
    docstring); ``bias = mean(resamples) - estimate`` and ``se = SD(resamples)`` are reported.
    """
    from scipy.stats import norm

    level = _check_level(level)
    method = method.lower()
    if method not in _METHODS:
        raise AnalysisError(f"bootstrap interval method: expected one of {', '.join(_METHODS)}, got {method!r}")
    if method == "bca" and jackknife is None:
        raise AnalysisError("bootstrap interval method 'bca': needs jackknife= (leave-one-out values of the "
                            "statistic); pass them or use method='bc'")
    s = np.asarray(resamples, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    estimate = float(estimate)
    if s.size == 0 or not np.isfinite(estimate):
        return Interval(estimate, _NAN, _NAN, level, method, _NAN, _NAN, int(s.size), False)
    alpha = (1.0 - level) / 2.0
    if method == "percentile":
        q = np.array([alpha, 1.0 - alpha])
    else:
        z0 = norm.ppf(_proportion_below(s, estimate))
        z = norm.ppf([alpha, 1.0 - alpha])
        a = _acceleration(np.asarray(jackknife)) if method == "bca" else 0.0
        q = norm.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
    low, high = (float(v) for v in np.quantile(s, q))
    low, high, widened = _contain(estimate, low, high)
    return Interval(estimate, low, high, level, method, float(s.mean() - estimate),
                    float(s.std(ddof=1)) if s.size > 1 else 0.0, int(s.size), widened)


def bootstrap_interval(
    data: Sequence | np.ndarray | tuple[np.ndarray, ...],
    statistic: Callable[..., float],
    *,
    level: float = 0.95,
    n_resamples: int = 1000,
    method: str = "bca",
    seed: int | np.random.Generator | None = 0,
    paired: bool = True,
) -> Interval:
    """Bootstrap interval of ``statistic`` over the items of ``data`` via ``scipy.stats.bootstrap``.

    ``data``: one array, or a tuple of arrays of equal length whose items are resampled
    together when ``paired`` (e.g. the per-image values of two models); ``statistic(*arrays)``
    returns a float. ``method``: ``"bca"`` (default), ``"bc"`` or ``"percentile"``. scipy makes
    the resamples (and, for BCa, the jackknife); the interval is then formed by
    :func:`interval_from_resamples`, so the containment guarantee and the reported bias hold.
    """
    from scipy.stats import bootstrap

    arrays = tuple(np.asarray(d) for d in data) if isinstance(data, tuple) else (np.asarray(data),)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise AnalysisError("bootstrap data: expected arrays of equal length, got lengths "
                            f"{[len(a) for a in arrays]}; pass one value per item for every array")
    if n < 2:
        raise AnalysisError(f"bootstrap data: expected at least 2 items, got {n}")
    if int(n_resamples) < 1:
        raise AnalysisError(f"n_resamples: expected a positive integer, got {n_resamples}")
    estimate = float(statistic(*arrays))
    res = bootstrap(arrays, statistic, n_resamples=int(n_resamples), vectorized=False,
                    paired=paired or len(arrays) == 1, method="percentile", confidence_level=level,
                    rng=seed)
    jackknife = None
    if method.lower() == "bca":
        jackknife = np.array([statistic(*(np.delete(a, i, axis=0) for a in arrays)) for i in range(n)])
    return interval_from_resamples(res.bootstrap_distribution, estimate, level=level, method=method,
                                   jackknife=jackknife)


def paired_difference(
    resamples_a: np.ndarray,
    resamples_b: np.ndarray,
    estimate_a: float,
    estimate_b: float,
    *,
    level: float = 0.95,
    method: str = "bc",
) -> Interval:
    """Interval of the difference ``a - b`` from paired bootstrap resamples.

    ``resamples_a[i]`` and ``resamples_b[i]`` must come from the same resampled items (same
    seed, same item order); the difference is then taken resample by resample, so everything
    the two share (which images were drawn) cancels. Two identical inputs give a difference of
    exactly 0 in every resample and the interval ``[0, 0]``.
    """
    a = np.asarray(resamples_a, dtype=np.float64)
    b = np.asarray(resamples_b, dtype=np.float64)
    if a.shape != b.shape:
        raise AnalysisError(f"paired difference: expected resamples of equal shape, got {a.shape} and {b.shape}; "
                            "both must come from the same resampled items")
    return interval_from_resamples(a - b, float(estimate_a) - float(estimate_b), level=level, method=method)


def bootstrap_p_value(resampled_differences: np.ndarray, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value for "the difference equals ``null``".

    ``p = min(1, 2 min(#(d <= null) + 1, #(d >= null) + 1) / (B + 1))`` over the ``B`` finite
    resampled differences ``d`` (the +1 keeps p > 0 with finitely many resamples). Pair it with
    :func:`holm_adjust` over a family of comparisons. NaN when there are no finite resamples.
    """
    d = np.asarray(resampled_differences, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0:
        return _NAN
    lo = np.count_nonzero(d <= null) + 1
    hi = np.count_nonzero(d >= null) + 1
    return float(min(1.0, 2.0 * min(lo, hi) / (d.size + 1)))


def bc_p_value(resampled_differences: Sequence[float] | np.ndarray, estimate: float) -> float:
    """Two-sided p of "no difference" that agrees with the bias-corrected (BC) interval.

    Inverting Efron's BC interval: with ``z0 = Phi^-1(P(d < estimate))`` and
    ``zq = Phi^-1(P(d < 0))`` over the resampled differences ``d`` (ties count half, both
    proportions kept inside ``(0.5/B, 1 - 0.5/B)``), 0 is a bound of the BC interval at level
    ``1 - p`` for ``p = 2 Phi(-|zq - 2 z0|)``. So ``p < 1 - level`` exactly when the BC
    interval at ``level`` excludes 0 (before any widening to hold the estimate; up to the
    interpolation between neighbouring resamples that ``np.quantile`` does, which only matters
    when 0 sits on a bound), which the plain percentile p (:func:`bootstrap_p_value`) does not
    promise when the bootstrap distribution is biased. When 0 lies outside the range of the
    resamples (every interval excludes it) the result is ``2 / (B + 1)``, the smallest p the
    resamples resolve. NaN without finite resamples.
    """
    from scipy.stats import norm

    d = np.asarray(resampled_differences, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if d.size == 0 or not math.isfinite(float(estimate)):
        return _NAN
    if (d > 0).all() or (d < 0).all():
        # 0 lies outside every resample: every BC interval (its bounds are quantiles of d)
        # excludes it; the smallest p the resamples can resolve, as a bootstrap p is reported
        return float(min(1.0, 2.0 / (d.size + 1)))
    # the same proportions (ties half, clipped) as interval_from_resamples uses for z0
    z0 = float(norm.ppf(_proportion_below(d, float(estimate))))
    zq = float(norm.ppf(_proportion_below(d, 0.0)))
    return float(min(1.0, 2.0 * norm.sf(abs(zq - 2.0 * z0))))


def wilson_interval(k: int, n: int, *, level: float = 0.95) -> Interval:
    """Wilson score interval of the proportion ``k / n`` (``scipy.stats.binomtest``).

    Used for fractions such as detectors / units. ``n == 0`` gives an undefined interval.
    """
    from scipy.stats import binomtest

    level = _check_level(level)
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise AnalysisError(f"Wilson interval: expected 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Interval(_NAN, _NAN, _NAN, level, "wilson", n=0)
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    est = k / n
    low, high, widened = _contain(est, float(ci.low), float(ci.high))
    return Interval(est, low, high, level, "wilson", _NAN, math.sqrt(est * (1 - est) / n), n, widened)


def t_interval(values: Sequence[float] | np.ndarray, *, level: float = 0.95) -> Interval:
    """Mean of group members (e.g. seeds of one training recipe) with a Student-t interval.

    ``mean +- t_{(1+level)/2, n-1} * SD / sqrt(n)`` over the ``n`` finite values (SD with
    ``n - 1``). This is an interval for the recipe's mean over seeds; with few seeds it is wide,
    as it should be. Fewer than two members give an undefined interval (estimate kept).
    """
    from scipy.stats import t

    level = _check_level(level)
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Interval(_NAN, _NAN, _NAN, level, "t", n=0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, _NAN, _NAN, level, "t", n=n)
    se = float(v.std(ddof=1) / math.sqrt(n))
    half = float(t.ppf((1 + level) / 2, n - 1)) * se
    return Interval(mean, mean - half, mean + half, level, "t", _NAN, se, n, False)


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given).

    Sort the ``m`` finite p-values ascending, multiply the i-th (0-based) by ``m - i``, take the
    running maximum and clip at 1. NaN p-values stay NaN and do not count in ``m``. A
    comparison survives the correction at level ``alpha`` when its adjusted p <= alpha.
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    out = np.full(p.shape, _NAN)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise AnalysisError(f"Holm correction: expected p-values in [0, 1], got {p[ok].min()}..{p[ok].max()}")
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out


def holm_reject(p_values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Boolean array: which hypotheses Holm rejects at family-wise level ``alpha`` (NaN -> False)."""
    adj = holm_adjust(p_values)
    return np.where(np.isfinite(adj), adj <= alpha, False)


def multinomial_weights(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """Bootstrap weights (n_resamples, n) float64: how often each of ``n`` items is drawn.

    Each row is Multinomial(n, 1/n): exactly the counts of an ordinary bootstrap resample
    (``n`` draws with replacement). Rows come from one generator in order, so the same seed
    and ``n`` give the same resamples for every model -- the basis of paired differences.
    """
    if n < 1 or n_resamples < 0:
        raise AnalysisError(f"bootstrap weights: expected n >= 1 items and n_resamples >= 0, got {n}, {n_resamples}")
    return rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_resamples)).astype(np.float64)


def poisson_weights(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """Poisson(1) bootstrap weights (n_resamples, n): independent per item, total not fixed.

    A fast approximation of :func:`multinomial_weights` for large ``n`` (each item's count is
    Binomial(n, 1/n), close to Poisson(1)); useful when items are streamed.
    """
    if n < 1 or n_resamples < 0:
        raise AnalysisError(f"bootstrap weights: expected n >= 1 items and n_resamples >= 0, got {n}, {n_resamples}")
    return rng.poisson(1.0, size=(int(n_resamples), n)).astype(np.float64)


def assert_intervals_contain_estimates(
    estimates: Sequence[float] | np.ndarray,
    lows: Sequence[float] | np.ndarray,
    highs: Sequence[float] | np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    allow_undefined: bool = True,
) -> None:
    """Property check for tests: every defined interval contains its estimate.

    Raises ``AssertionError`` listing each row where ``low <= estimate <= high`` fails (or
    ``low > high``). Undefined intervals (NaN bound) pass when ``allow_undefined`` and fail
    otherwise. Use it on any table with estimate / low / high columns, e.g.
    ``assert_intervals_contain_estimates(df.value, df.ci_low, df.ci_high, df.index)``.
    """
    e = np.asarray(estimates, dtype=np.float64).ravel()
    lo = np.asarray(lows, dtype=np.float64).ravel()
    hi = np.asarray(highs, dtype=np.float64).ravel()
    if not (e.shape == lo.shape == hi.shape):
        raise AssertionError(f"estimates, lows and highs differ in length: {e.shape}, {lo.shape}, {hi.shape}")
    names = list(labels) if labels is not None else [str(i) for i in range(e.size)]
    bad = []
    for i in range(e.size):
        undefined = not (np.isfinite(lo[i]) and np.isfinite(hi[i]))
        if undefined:
            if not allow_undefined:
                bad.append(f"{names[i]}: undefined interval [{lo[i]}, {hi[i]}] for estimate {e[i]}")
            continue
        if not (lo[i] <= e[i] <= hi[i]):
            bad.append(f"{names[i]}: estimate {float(e[i])!r} outside [{float(lo[i])!r}, {float(hi[i])!r}]")
    if bad:
        raise AssertionError("intervals that miss their estimate:\n  " + "\n  ".join(bad))
