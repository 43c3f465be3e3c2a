"""Robust statistics: vectorised group medians/MAD agree with numpy/scipy; clustering and the
change point behave as the detector relies on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from rankwatch.detectors.stats import (
    change_point,
    cluster_1d,
    grouped_median,
    grouped_min_excluding_self,
    modified_z,
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
