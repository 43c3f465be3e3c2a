"""Robust statistics used by the detectors, vectorised with numpy so that one evaluation over
100 000 ranks stays well under a second. Pure functions, no state."""

from __future__ import annotations

import functools

import numpy as np
from scipy import stats as sps


def grouped_median(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Median of each element's group, returned per element (NaN values are ignored).

    One lexsort instead of a Python loop over groups: O(n log n) for any number of groups."""
    values = np.asarray(values, dtype=float)
    groups = np.asarray(groups)
    n = values.size
    out = np.full(n, np.nan)
    ok = ~np.isnan(values)
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    v, g = values[idx], groups[idx]
    order = np.lexsort((v, g))
    gs, vs = g[order], v[order]
    starts = np.flatnonzero(np.concatenate(([True], gs[1:] != gs[:-1])))
    counts = np.diff(np.concatenate((starts, [gs.size])))
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    med = 0.5 * (vs[lo] + vs[hi])
    # map each element to its group's median
    member = np.repeat(np.arange(starts.size), counts)
    per_sorted = med[member]
    out[idx[order]] = per_sorted
    return out


def grouped_count(groups: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Number of elements with ``mask`` true in each element's group, per element."""
    _, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse, weights=mask.astype(float))
    return counts[inverse]


def grouped_min(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Minimum of each element's group (NaN ignored), per element."""
    _, inverse = np.unique(groups, return_inverse=True)
    mins = np.full(inverse.max() + 1 if inverse.size else 0, np.inf)
    ok = ~np.isnan(values)
    np.minimum.at(mins, inverse[ok], values[ok])
    return mins[inverse]


def grouped_min_excluding_self(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Smallest value among each element's *peers* (its group without itself): the two smallest
    of each group are enough to answer for every member."""
    values = np.asarray(values, dtype=float)
    out = np.full(values.size, np.nan)
    ok = np.flatnonzero(~np.isnan(values))
    if ok.size == 0:
        return out
    v, g = values[ok], np.asarray(groups)[ok]
    order = np.lexsort((v, g))
    gs, vs = g[order], v[order]
    starts = np.flatnonzero(np.concatenate(([True], gs[1:] != gs[:-1])))
    counts = np.diff(np.concatenate((starts, [gs.size])))
    first = vs[starts]
    second = np.where(counts > 1, vs[np.minimum(starts + 1, vs.size - 1)], np.nan)
    member = np.repeat(np.arange(starts.size), counts)
    is_first = np.zeros(vs.size, dtype=bool)
    is_first[starts] = True
    res = np.where(is_first, second[member], first[member])
    out[ok[order]] = res
    return out


def robust_z(values: np.ndarray, groups: np.ndarray, floor: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Modified z-score of each value within its group: (x - median) / max(MAD·1.4826, floor).

    MAD is scaled to a normal sigma (as scipy.stats.median_abs_deviation(scale='normal')), so
    3.5 means what it means for a normal sample. ``floor`` (per element or scalar) keeps a
    group with MAD = 0 (more than half the ranks identical) from producing infinite scores.
    Returns (z, group median, effective scale)."""
    med = grouped_median(values, groups)
    mad = grouped_median(np.abs(values - med), groups) * MAD_NORMAL
    scale = np.maximum(mad, floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (values - med) / scale
    return z, med, scale


# 1 / Phi^-1(3/4): the constant scipy uses for scale='normal'.
MAD_NORMAL = float(1.0 / sps.norm.ppf(0.75))


def modified_z(values: np.ndarray) -> np.ndarray:
    """Global modified z-score with scipy's MAD (the naive baseline in the benchmarks)."""
    values = np.asarray(values, dtype=float)
    med = np.nanmedian(values)
    mad = sps.median_abs_deviation(values, scale="normal", nan_policy="omit")
    if not mad > 0:
        return np.zeros_like(values)
    return (values - med) / mad


def cluster_1d(values: np.ndarray, gap_rel: float, min_size: int, gap_factor: float = 10.0) -> np.ndarray:
    """Group ranks of unknown layout by their compute time: split the sorted values where the
    relative gap is at least ``gap_rel`` *and* ``gap_factor`` times the median gap between
    neighbours (a gap that stands out from the spread, however noisy the job), then merge
    clusters smaller than ``min_size`` into the nearest neighbour so that one slow rank never
    becomes its own (unscorable) peer group. Returns a label per value (NaN gets -1)."""
    values = np.asarray(values, dtype=float)
    labels = np.full(values.size, -1, dtype=np.int64)
    idx = np.flatnonzero(~np.isnan(values))
    if idx.size == 0:
        return labels
    order = idx[np.argsort(values[idx], kind="stable")]
    v = values[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_gap = np.diff(v) / np.maximum(np.abs(v[:-1]), 1e-12)
    typical = float(np.median(rel_gap)) if rel_gap.size else 0.0
    cut = np.flatnonzero((rel_gap >= gap_rel) & (rel_gap >= gap_factor * typical)) + 1
    bounds = [0, *cut.tolist(), v.size]
    segs = [[bounds[i], bounds[i + 1]] for i in range(len(bounds) - 1)]
    # merge small segments into the neighbour with the closer edge value, smallest first
    while len(segs) > 1:
        sizes = [b - a for a, b in segs]
        small = [i for i, s in enumerate(sizes) if s < min_size]
        if not small:
            break
        i = min(small, key=lambda k: sizes[k])
        a, b = segs[i]
        left_gap = v[a] - v[segs[i - 1][1] - 1] if i > 0 else np.inf
        right_gap = v[segs[i + 1][0]] - v[b - 1] if i + 1 < len(segs) else np.inf
        j = i - 1 if left_gap <= right_gap else i + 1
        lo, hi = min(i, j), max(i, j)
        segs[lo] = [segs[lo][0], segs[hi][1]]
        del segs[hi]
    for label, (a, b) in enumerate(segs):
        labels[order[a:b]] = label
    return labels


def change_point(series: np.ndarray, min_segment: int, permutations: int = 999,
                 min_shift: float | None = None) -> tuple[int, float, float] | None:
    """Most likely single upward shift in ``series`` with at least ``min_segment`` points on
    each side: returns (index of the first point after the change, p-value, relative shift of
    the medians), or None if too short.

    Every split is scored by its standardised Mann-Whitney statistic (later segment larger);
    the best split wins. Choosing the split is part of the test: the p-value is that of the
    *maximum* statistic over all splits, from ``permutations`` random orderings of the series
    (a max-T permutation test: exact under exchangeability, so its false-positive rate is the
    nominal one; one Mann-Whitney p-value of the chosen split would not be). The orderings come
    from a fixed seed, so the same series always gets the same answer (live and replay agree).
    With ``min_shift``, a best split whose median shift is below it gets p = 1 without the
    permutations (it cannot fire anyway)."""
    x = np.asarray(series, dtype=float)
    n = x.size
    if n < 2 * min_segment or min_segment < 1:
        return None
    ks = np.arange(min_segment, n - min_segment + 1)
    r = sps.rankdata(x)
    t_obs = _max_mann_whitney(r[None, :], ks)
    k = int(ks[int(np.argmax(t_obs[1]))])
    base = float(np.median(x[:k]))
    shift = float(np.median(x[k:])) / base - 1.0 if base > 0 else 0.0
    if min_shift is not None and shift < min_shift:
        return k, 1.0, shift
    t_perm = _max_mann_whitney(r[_permutations(n, permutations)], ks)[0]
    p = float((1 + np.count_nonzero(t_perm >= t_obs[0][0] - 1e-12)) / (permutations + 1))
    return k, p, shift


@functools.lru_cache(maxsize=4)
def _permutations(n: int, count: int) -> np.ndarray:
    """``count`` fixed random orderings of ``n`` points (a run's history is usually full, so
    one size is asked for over and over)."""
    idx = np.random.default_rng(0x5EED).random((count, n)).argsort(axis=1)
    idx.flags.writeable = False
    return idx


def _max_mann_whitney(ranks: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ranks: the largest standardised Mann-Whitney U (points after split k
    larger than before) over the splits ``ks``, and the statistic at every split."""
    n = ranks.shape[1]
    before = np.cumsum(ranks, axis=1)[:, ks - 1]  # rank sum of the first k points
    m1 = ks.astype(float)
    m2 = n - m1
    u_after = (n * (n + 1) / 2.0 - before) - m2 * (m2 + 1) / 2.0
    z = (u_after - m1 * m2 / 2.0) / np.sqrt(m1 * m2 * (n + 1) / 12.0)
    return z.max(axis=1), z


# ---- sequential test: one-sided CUSUM charts ---------------------------------------------------

# Siegmund's correction: a Gaussian CUSUM overshoots its threshold by about 0.583 sigma at
# each barrier, 1.166 in all (Siegmund 1985, "Sequential Analysis", ch. X).
_SIEGMUND_OVERSHOOT = 1.166


def cusum_noise_threshold(drift_sd: np.ndarray | float, arl: float) -> np.ndarray:
    """Threshold of a one-sided CUSUM, in units of the increments' standard deviation, whose
    average run length under the null (N(0, 1) observations, reference value ``drift_sd``
    standard deviations) is ``arl`` evaluations.

    Inverts Siegmund's approximation ARL0 = (exp(2kb) - 2kb - 1) / (2k^2), b = h + 1.166, by a
    fixed-point iteration (the log term moves slowly, 8 steps reach 1e-6); vectorised."""
    k = np.maximum(np.asarray(drift_sd, dtype=float), 1e-6)
    target = 2.0 * k * k * arl
    b = np.log(target + 1.0) / (2.0 * k)
    for _ in range(8):
        b = np.log(target + 2.0 * k * b + 1.0) / (2.0 * k)
    return np.maximum(b - _SIEGMUND_OVERSHOOT, 0.0)


def cusum_arl(drift_sd: float, threshold_sd: float) -> float:
    """Siegmund's average run length under the null of a one-sided CUSUM (for tests/benches)."""
    b = 2.0 * drift_sd * (threshold_sd + _SIEGMUND_OVERSHOOT)
    return float((np.exp(b) - b - 1.0) / (2.0 * drift_sd * drift_sd))


def cusum_step(state: np.ndarray, excess: np.ndarray, drift: np.ndarray, cap: np.ndarray,
               weight: float | np.ndarray) -> np.ndarray:
    """One update of a bank of one-sided CUSUM charts on each rank's relative excess.

    ``state``: (n, J) accumulated evidence in seconds of excess; ``excess``: (n,) relative
    excess over the peer reference this window; ``drift``/``cap``: (J,) reference value and
    per-window cap of each chart (Huber-style: one window can add at most cap - drift);
    ``weight``: seconds of new data behind this window. Page's recursion
    S = max(0, S + w * (min(x, c) - k)), vectorised over ranks and charts."""
    inc = (np.minimum(excess[:, None], cap[None, :]) - drift[None, :]) * np.asarray(weight, float).reshape(-1, 1)
    return np.maximum(state + inc, 0.0)


def rank_order_level(values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Each value's level among its neighbours in rank order: the median of itself and the
    ranks just before and after it (at the ends, of the first or last three).

    Pipeline stages occupy contiguous blocks of ranks in the usual layouts (Megatron, torchrun
    device meshes: pp outermost), so a median of three keeps every stage boundary of blocks of
    two or more ranks and removes a lone rank that differs from both neighbours."""
    values = np.asarray(values, dtype=float)
    n = values.size
    if n < 3:
        return values.copy()
    order = np.argsort(ranks, kind="stable")
    v = values[order]
    a, b, c = np.r_[v[2], v[:-1]], v, np.r_[v[1:], v[-3]]
    med = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
    out = np.empty(n)
    out[order] = med
    return out
