"""interptool.common.stats: known answers, containment under strong bias, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from interptool.common.stats import (
    Interval,
    assert_intervals_contain_estimates,
    bc_p_value,
    bootstrap_interval,
    bootstrap_p_value,
    holm_adjust,
    holm_reject,
    interval_from_resamples,
    multinomial_weights,
    paired_difference,
    t_interval,
    wilson_interval,
)
from interptool.errors import AnalysisError


def test_percentile_interval_is_the_quantiles_of_a_known_distribution():
    s = np.arange(1, 1001, dtype=float)  # 1..1000
    iv = interval_from_resamples(s, 500.0, method="percentile")
    assert iv.low == pytest.approx(np.quantile(s, 0.025))
    assert iv.high == pytest.approx(np.quantile(s, 0.975))
    assert iv.bias == pytest.approx(500.5 - 500.0)
    assert not iv.widened


def test_bc_equals_percentile_when_the_estimate_is_the_median():
    rng = np.random.default_rng(0)
    s = rng.normal(size=4001)
    est = float(np.median(s))
    bc = interval_from_resamples(s, est, method="bc")
    pc = interval_from_resamples(s, est, method="percentile")
    assert bc.low == pytest.approx(pc.low, abs=1e-9) and bc.high == pytest.approx(pc.high, abs=1e-9)


def test_bc_hand_computed_quantiles():
    s = np.arange(100, dtype=float)  # estimate 30 -> 30 below, 1 tie -> p = 30.5 / 100
    iv = interval_from_resamples(s, 30.0, method="bc")
    z0 = norm.ppf(0.305)
    q = norm.cdf(2 * z0 + norm.ppf([0.025, 0.975]))
    assert iv.low == pytest.approx(np.quantile(s, q[0]))
    assert iv.high == pytest.approx(np.quantile(s, q[1]))


@pytest.mark.parametrize("method", ["percentile", "bc"])
def test_strongly_biased_statistic_interval_still_contains_estimate(method):
    # max-of-sample style bias: every resample is above the estimate
    s = np.linspace(1.0, 2.0, 200)
    iv = interval_from_resamples(s, 0.5, method=method)
    assert iv.widened and iv.low == 0.5 and iv.contains(0.5)
    assert iv.bias == pytest.approx(1.5 - 0.5)
    below = interval_from_resamples(-s, -0.5, method=method)
    assert below.widened and below.high == -0.5


def test_bootstrap_interval_small_n_biased_statistic_contains_estimate():
    # variance with ddof=0 at n=5 is biased downwards under resampling; a squared mean upwards
    data = np.array([0.1, 0.2, 0.25, 3.0, 7.0])
    for method in ("bca", "bc", "percentile"):
        iv = bootstrap_interval(data, lambda x: float(np.var(x)), n_resamples=500, method=method, seed=1)
        assert iv.contains(iv.estimate), (method, iv)
        assert iv.estimate == pytest.approx(np.var(data))
        assert iv.bias < 0  # ddof=0 variance shrinks under resampling
    for seed in range(20):  # property check over many seeds of a heavily biased statistic
        x = np.random.default_rng(seed).exponential(size=6)
        iv = bootstrap_interval(x, lambda v: float(np.max(v)), n_resamples=200, method="bca", seed=seed)
        assert_intervals_contain_estimates([iv.estimate], [iv.low], [iv.high])


def test_bca_requires_jackknife():
    with pytest.raises(AnalysisError, match="jackknife"):
        interval_from_resamples([1.0, 2.0], 1.0, method="bca")


def test_bca_acceleration_zero_equals_bc():
    s = np.random.default_rng(3).normal(size=999)
    jk = np.ones(10)  # constant jackknife -> a = 0
    a = interval_from_resamples(s, 0.1, method="bca", jackknife=jk)
    b = interval_from_resamples(s, 0.1, method="bc")
    assert (a.low, a.high) == (b.low, b.high)


def test_no_finite_resamples_gives_undefined_interval():
    iv = interval_from_resamples([np.nan, np.inf], 1.0)
    assert not iv.defined and not iv.contains(1.0)
    assert iv.format() == "1 (no interval)"


def test_bad_level_and_method_raise():
    with pytest.raises(AnalysisError, match="level"):
        interval_from_resamples([1.0], 1.0, level=95)
    with pytest.raises(AnalysisError, match="method"):
        interval_from_resamples([1.0], 1.0, method="studentized")


def test_paired_difference_of_identical_resamples_is_exactly_zero():
    s = np.random.default_rng(0).normal(size=300)
    iv = paired_difference(s, s.copy(), 2.0, 2.0)
    assert (iv.estimate, iv.low, iv.high, iv.bias) == (0.0, 0.0, 0.0, 0.0)
    assert bootstrap_p_value(s - s) == 1.0


def test_paired_difference_cancels_shared_noise():
    rng = np.random.default_rng(5)
    shared = rng.normal(scale=10.0, size=1000)
    a, b = shared + 1.0, shared  # big shared noise, constant offset 1
    iv = paired_difference(a, b, 1.0, 0.0)
    assert iv.low == pytest.approx(1.0) and iv.high == pytest.approx(1.0)
    with pytest.raises(AnalysisError, match="equal shape"):
        paired_difference(a, b[:-1], 1.0, 0.0)


def test_bootstrap_p_value_known_counts():
    d = np.array([-1.0, 1.0, 2.0, 3.0])  # 1 <= 0, 3 >= 0 -> 2 * (1 + 1) / 5
    assert bootstrap_p_value(d) == pytest.approx(0.8)
    assert bootstrap_p_value(np.arange(1.0, 100.0)) == pytest.approx(2 / 100)


def test_bc_p_value_hand_computed():
    """d = [-1, 1, 2, 3], estimate 2: P(d < 2) = (2 + 0.5) / 4 = 0.625 (the tie counts half),
    P(d < 0) = 1 / 4; z0 = Phi^-1(0.625) = 0.3186394, zq = Phi^-1(0.25) = -0.6744898;
    p = 2 Phi(-|zq - 2 z0|) = 2 Phi(-1.3117686) = 0.1895983."""
    from statistics import NormalDist

    phi = NormalDist()
    z0, zq = phi.inv_cdf(0.625), phi.inv_cdf(0.25)
    assert (z0, zq) == (pytest.approx(0.3186394), pytest.approx(-0.6744898))
    want = 2 * phi.cdf(-abs(zq - 2 * z0))
    assert want == pytest.approx(0.1895983, abs=1e-7)
    assert bc_p_value(np.array([-1.0, 1.0, 2.0, 3.0]), 2.0) == pytest.approx(want, rel=1e-12)
    # the percentile p of the same resamples: 1 <= 0, 3 >= 0 -> 2 (1 + 1) / 5
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)
    # 0 outside every resample: the smallest p B resamples resolve, 2 / (B + 1)
    assert bc_p_value(np.arange(1.0, 100.0), 50.0) == pytest.approx(2 / 100)
    assert bc_p_value(-np.arange(1.0, 100.0), -50.0) == pytest.approx(2 / 100)
    assert bc_p_value(np.zeros(50), 0.0) == 1.0
    assert math.isnan(bc_p_value([np.nan, np.inf], 1.0))
    assert math.isnan(bc_p_value([1.0, -1.0], np.nan))


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95, 0.99])
def test_bc_p_value_agrees_with_the_bc_interval(level):
    """For biased bootstrap distributions (resamples centred away from the estimate),
    bc_p_value < 1 - level exactly when interval_from_resamples(..., method="bc") at that
    level excludes 0, on both sides of 0; cases built with a margin from the knife edge,
    where which of two neighbouring resamples np.quantile interpolates decides."""
    alpha = 1.0 - level
    seen = {"above 0": 0, "below 0": 0, "holds 0": 0}
    rng = np.random.default_rng(11)
    base = rng.standard_normal(4001)
    for estimate in np.linspace(-4.0, 4.0, 17):
        for bias in (-3.0, -1.5, 0.0, 1.5, 3.0):
            d = estimate + bias + 1.3 * base  # bootstrap distribution shifted by `bias`
            iv = interval_from_resamples(d, estimate, level=level, method="bc")
            p = bc_p_value(d, estimate)
            if iv.widened or abs(p - alpha) < 0.1 * alpha:
                continue
            side = "above 0" if iv.low > 0 else "below 0" if iv.high < 0 else "holds 0"
            seen[side] += 1
            assert (p < alpha) == (side != "holds 0"), (estimate, bias, iv, p)
    assert min(seen.values()) >= 5, seen


def test_bc_p_value_does_not_contradict_a_biased_interval():
    """The fault: resamples centred near 0 while the estimate is +3 (a strongly biased
    statistic). The BC interval excludes 0, the percentile p says 0.93; bc_p_value agrees
    with the interval."""
    d = np.random.default_rng(0).normal(0.0, 2.5, 1000)
    iv = interval_from_resamples(d, 3.0, method="bc")
    assert iv.low > 0 and not iv.widened
    assert bootstrap_p_value(d) > 0.9
    assert bc_p_value(d, 3.0) < 0.05


def test_dissection_paired_table_p_agrees_with_its_interval():
    """paired_table (dissection's paired comparison) reports the p that inverts its own BC
    interval: on the biased case above the interval excludes 0 and p < 0.05, where the
    percentile p it used to report was 0.93 (the user's "+3 [-1, 9], p = 0.985" contradiction)."""
    import pandas as pd

    from interptool.analyzers.dissection._bootstrap import paired_table

    rng = np.random.default_rng(0)
    sb = pd.DataFrame({"detectors": rng.normal(10.0, 3.0, 1000), "same": np.full(1000, 4.0)})
    sa = pd.DataFrame({"detectors": sb["detectors"] + rng.normal(0.0, 2.5, 1000),
                       "same": np.full(1000, 4.0)})
    t = paired_table(pd.Series({"detectors": 13.0, "same": 4.0}), sa,
                     pd.Series({"detectors": 10.0, "same": 4.0}), sb).set_index("measure")
    row = t.loc["detectors"]
    d = (sa["detectors"] - sb["detectors"]).to_numpy()
    assert row["difference"] == 3.0 and row["ci_low"] > 0 and not row["widened"]
    assert row["p_value"] == pytest.approx(bc_p_value(d, 3.0)) and row["p_value"] < 0.05
    assert bootstrap_p_value(d) > 0.5  # what was reported before
    assert t.loc["same", "p_value"] == 1.0 and t.loc["same", "ci_low"] == 0.0


def test_wilson_matches_formula():
    k, n = 7, 20
    iv = wilson_interval(k, n)
    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert iv.low == pytest.approx(centre - half) and iv.high == pytest.approx(centre + half)
    assert iv.contains(p)
    assert wilson_interval(0, 10).low == 0.0 and wilson_interval(10, 10).high == 1.0
    assert not wilson_interval(0, 0).defined
    with pytest.raises(AnalysisError, match="k <= n"):
        wilson_interval(3, 2)


def test_t_interval_known_answer():
    v = [1.0, 2.0, 3.0, 4.0]
    iv = t_interval(v)
    half = 3.182446305284263 * np.std(v, ddof=1) / 2  # t_{0.975, 3}
    assert iv.estimate == 2.5
    assert iv.low == pytest.approx(2.5 - half) and iv.high == pytest.approx(2.5 + half)
    one = t_interval([5.0])
    assert one.estimate == 5.0 and not one.defined and one.n == 1


def test_holm_known_answer():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    adj = holm_adjust(p)
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert adj[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    assert holm_reject(p, 0.05).tolist() == [True, False, False, True, False]
    with pytest.raises(AnalysisError, match="p-values"):
        holm_adjust([1.5])


def test_multinomial_weights_are_resample_counts_and_reproducible():
    w = multinomial_weights(np.random.default_rng(7), 13, 50)
    assert w.shape == (50, 13) and np.all(w.sum(1) == 13)
    assert np.array_equal(w, multinomial_weights(np.random.default_rng(7), 13, 50))


def test_property_helper_catches_a_miss():
    with pytest.raises(AssertionError, match="b: estimate 5.0 outside"):
        assert_intervals_contain_estimates([1.0, 5.0], [0.0, 0.0], [2.0, 4.0], ["a", "b"])
    assert_intervals_contain_estimates([1.0], [np.nan], [np.nan])
    with pytest.raises(AssertionError, match="undefined"):
        assert_intervals_contain_estimates([1.0], [np.nan], [np.nan], allow_undefined=False)


def test_interval_to_dict_round_trip():
    iv = interval_from_resamples(np.arange(10.0), 4.0)
    assert Interval(**iv.to_dict()) == iv


def test_bootstrap_interval_pairs_items_across_arrays():
    rng = np.random.default_rng(2)
    shared = rng.normal(scale=5.0, size=40)
    a, b = shared + 0.5, shared  # item-wise difference exactly 0.5
    iv = bootstrap_interval((a, b), lambda x, y: float(np.mean(x - y)), n_resamples=300,
                            method="percentile", seed=0)
    assert iv.estimate == pytest.approx(0.5)
    assert iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)
    with pytest.raises(AnalysisError, match="equal length"):
        bootstrap_interval((a, b[:-1]), lambda x, y: 0.0)
    with pytest.raises(AnalysisError, match="at least 2"):
        bootstrap_interval(np.array([1.0]), np.mean)


def test_poisson_weights_shape_and_mean():
    from interptool.common.stats import poisson_weights

    w = poisson_weights(np.random.default_rng(0), 50, 400)
    assert w.shape == (400, 50) and abs(w.mean() - 1.0) < 0.05
    with pytest.raises(AnalysisError, match="n >= 1"):
        poisson_weights(np.random.default_rng(0), 0, 3)
