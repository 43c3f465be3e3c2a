"""Robust statistics: vectorised group medians/MAD agree with numpy/scipy; clustering and the
change point behave as the detector relies on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from rankwatch.detectors.stats import (
    change_point,
    cluster_1d,
    cusum_arl,
    cusum_noise_threshold,
    cusum_step,
    grouped_median,
    grouped_min_excluding_self,
    modified_z,
    rank_order_level,
    robust_z,
)


def test_grouped_median_matches_numpy_per_group():
    rng = np.random.default_rng(3)
    vals = rng.normal(1, 0.1, 1000)
    vals[::37] = np.nan
    groups = rng.integers(0, 7, 1000)
    med = grouped_median(vals, groups)
    for g in range(7):
        sel = groups == g
        expect = np.nanmedian(vals[sel])
        assert np.allclose(med[sel & ~np.isnan(vals)], expect)


def test_robust_z_uses_normal_scaled_mad_with_a_floor():
    rng = np.random.default_rng(4)
    vals = rng.normal(10, 1, 501)
    z, med, scale = robust_z(vals, np.zeros(501, int), 0.0)
    mad = sps.median_abs_deviation(vals, scale="normal")
    assert np.allclose(scale, mad)
    assert np.allclose(z, (vals - np.median(vals)) / mad)
    # identical peers: MAD = 0, the floor keeps a 5 % outlier finite and large
    flat = np.array([1.0] * 9 + [1.05])
    z, _, scale = robust_z(flat, np.zeros(10, int), 0.005)
    assert np.isfinite(z).all() and abs(z[-1] - 10.0) < 1e-9 and scale[0] == 0.005


def test_modified_z_is_iglewicz_hoaglin_0_6745_times_deviation_over_mad():
    vals = np.array([1.0, 1.1, 0.9, 1.0, 3.0])
    # median 1.0; absolute deviations 0, .1, .1, 0, 2 -> MAD 0.1; M = 0.6745 (x - median) / MAD
    z = modified_z(vals)
    assert z == pytest.approx([0.0, 0.6745, -0.6745, 0.0, 13.49], abs=1e-3)
    # NaN is left out of median and MAD, and scores NaN
    zn = modified_z(np.r_[vals, np.nan])
    assert zn[:5] == pytest.approx(z) and np.isnan(zn[5])
    # MAD 0 (most values equal): no score rather than a division by zero
    assert modified_z(np.array([1.0, 1.0, 1.0, 5.0])).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_min_excluding_self():
    v = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    g = np.array([0, 0, 0, 1, 1])
    assert grouped_min_excluding_self(v, g).tolist() == [1.0, 2.0, 1.0, 4.0, 5.0]


def test_cluster_splits_stages_and_keeps_a_lone_outlier_with_its_neighbours():
    stage_a = [1.0, 1.005, 0.995, 1.002]
    stage_b = [1.2, 1.21, 1.19, 1.2]
    lab = cluster_1d(np.array(stage_a + stage_b + [1.06]), 0.03, 3)
    assert len(set(lab[:4])) == 1 and len(set(lab[4:8])) == 1 and lab[0] != lab[4]
    assert lab[8] == lab[0]  # merged into the closer cluster, never alone
    assert cluster_1d(np.array([np.nan, 1.0]), 0.03, 3).tolist() == [-1, 0]


def test_change_point_finds_a_sustained_upward_shift_only():
    rng = np.random.default_rng(5)
    flat = 1 + rng.normal(0, 0.01, 40)
    k, p, shift = change_point(flat, 4)
    assert shift < 0.05
    stepped = np.r_[flat[:30], 1.2 + rng.normal(0, 0.01, 10)]
    k, p, shift = change_point(stepped, 4)
    assert k == 30 and p < 0.01 and 0.15 < shift < 0.25
    assert change_point(np.ones(5), 4) is None


def _naive_min_p(x: np.ndarray, m: int) -> float:
    """The uncorrected test: the smallest one-split Mann-Whitney p-value over all splits."""
    return min(float(sps.mannwhitneyu(x[k:], x[:k], alternative="greater").pvalue) for k in range(m, x.size - m + 1))


def test_change_point_false_positive_rate_is_the_nominal_one_on_null_data():
    # 400 series without any change (iid, and heavy-tailed too): the corrected p-value is
    # uniform, so p < alpha in about alpha of them; taking the best split's own Mann-Whitney
    # p-value (the test before the correction) is wrong far more often.
    rng = np.random.default_rng(11)
    alpha, trials = 0.05, 400
    series = [rng.normal(1.0, 0.02, 40) if i % 2 else 1 + 0.02 * rng.standard_t(2, 40) for i in range(trials)]
    corrected = np.array([change_point(x, 4)[1] for x in series])
    naive = np.array([_naive_min_p(x, 4) for x in series[:100]])
    fpr = float(np.mean(corrected < alpha))
    se = np.sqrt(alpha * (1 - alpha) / trials)
    assert abs(fpr - alpha) <= 3 * se, fpr  # 0.017 .. 0.083
    assert np.mean(naive < alpha) > 3 * alpha  # what the correction is for
    # the p-values are uniform, not just right at one level
    assert sps.kstest(corrected, "uniform").pvalue > 0.001


def test_change_point_is_deterministic_and_skips_small_shifts():
    rng = np.random.default_rng(2)
    x = np.r_[1 + rng.normal(0, 0.01, 20), 1.03 + rng.normal(0, 0.01, 8)]
    assert change_point(x, 4) == change_point(x.copy(), 4)  # same series, same verdict
    k, p, shift = change_point(x, 4, min_shift=0.1)
    assert p == 1.0 and shift < 0.1  # below the effect size: no permutations, no verdict


def test_cusum_threshold_gives_the_designed_false_alarm_rate_on_gaussian_noise():
    # 2000 charts of N(0, 1) noise, drift 0.5 sd, designed for a mean run length of 500
    # evaluations: over 500 evaluations about 1 - 1/e of them alarm if the design holds
    rng = np.random.default_rng(4)
    drift, arl, n, steps = 0.5, 500.0, 2000, 500
    h = float(cusum_noise_threshold(drift, arl))
    assert abs(cusum_arl(drift, h) - arl) / arl < 1e-3  # the inversion is right
    state = np.zeros((n, 1))
    first = np.full(n, np.inf)
    for t in range(steps):
        state = cusum_step(state, rng.normal(0, 1, n), np.array([drift]), np.array([np.inf]), 1.0)
        first[(state[:, 0] >= h) & np.isinf(first)] = t + 1
    alarmed = np.isfinite(first)
    # run lengths of a CUSUM are close to exponential: P(alarm by ARL) ~ 1 - 1/e = 0.63
    assert 0.5 < alarmed.mean() < 0.75
    # a tenfold design gives far fewer alarms over the same time
    h10 = float(cusum_noise_threshold(drift, 10 * arl))
    assert h10 > h


def test_cusum_step_caps_each_window_and_weights_it():
    state = np.zeros((2, 2))
    out = cusum_step(state, np.array([1.0, -1.0]), np.array([0.1, 0.1]), np.array([0.2, np.inf]), 15.0)
    assert out[0].tolist() == [(0.2 - 0.1) * 15, (1.0 - 0.1) * 15]  # capped chart, uncapped chart
    assert out[1].tolist() == [0.0, 0.0]  # never below zero


def test_rank_order_level_removes_a_lone_rank_and_keeps_stage_blocks():
    stages = np.repeat([1.08, 1.0, 1.0, 1.2], 4)  # contiguous blocks of 4
    vals = stages.copy()
    vals[6] *= 1.11  # slow from the start
    ranks = np.arange(16)
    rng = np.random.default_rng(0)
    perm = rng.permutation(16)  # the order of the rows does not matter, the rank numbers do
    level = rank_order_level(vals[perm], ranks[perm])
    assert np.allclose(level, stages[perm])
    # blocks of two survive too
    two = np.repeat([1.0, 1.3, 1.0, 1.3], 2)
    assert np.allclose(rank_order_level(two, np.arange(8)), two)
