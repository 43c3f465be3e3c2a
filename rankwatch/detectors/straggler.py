"""Straggler scoring: per-rank compute and dataloader time against the rank's peers.

In synchronous training every rank's step time is the same, so the slow rank is the one with
the most *own work* (compute outside comm/dataloader, or dataloader time) and the least comm
wait. Peers are the ranks of the same run and pipeline stage; without layout labels, ranks are
clustered by compute time. Everything is vectorised over ranks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.model import COMPUTE_EXCLUDED_SECTIONS, RankObs
from rankwatch.detectors.stats import (
    MAD_NORMAL,
    cluster_1d,
    grouped_count,
    grouped_median,
    grouped_min_excluding_self,
)


@dataclass
class StragglerScores:
    """Per-rank results of one evaluation; arrays are aligned with ``obs``."""

    obs: list[RankObs]
    cols: RankColumns
    compute: np.ndarray
    dataloader: np.ndarray
    comm: np.ndarray
    group: np.ndarray  # integer peer-group id (see group_name)
    group_size: np.ndarray
    peer_compute: np.ndarray  # peer median (or fastest peer for groups of 2)
    peer_dataloader: np.ndarray
    peer_comm: np.ndarray
    peer_busy: np.ndarray
    z_compute: np.ndarray
    z_dataloader: np.ndarray
    rel_compute: np.ndarray  # relative slowdown of compute vs the peer reference
    rel_dataloader: np.ndarray  # dataloader excess in units of the peers' busy time
    smooth: np.ndarray  # EWMA of the clipped relative compute excess (the slow signal)
    z_smooth: np.ndarray
    score: np.ndarray
    flagged: np.ndarray  # over the thresholds: counts towards firing
    quorum: np.ndarray  # enough of the peer group answered for a verdict (else: no data)
    sustained: np.ndarray  # over half the thresholds: keeps an open episode open (hysteresis)
    cause: list[str]

    def group_name(self, i: int) -> str:
        """Human name of rank ``i``'s peer group: ``run|pp=K`` or ``run|cluster=K``."""
        o = self.obs[i]
        sub = int(self.group[i]) % (2 * _CLUSTER_OFFSET)
        if sub >= _CLUSTER_OFFSET:
            return f"{o.run}|cluster={sub - _CLUSTER_OFFSET}"
        return f"{o.run}|pp={sub}"


_POOL_MIN = 6  # small-group members a run needs before their pooled spread is trusted


class RankTable:
    """Per-rank state kept as one array per run, indexed by rank number, so that reading and
    writing it for 100 000 ranks is a numpy gather/scatter instead of a Python loop."""

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}

    def get(self, run_names: list[str], run_ids: np.ndarray, ranks: np.ndarray, default: float) -> np.ndarray:
        out = np.full(ranks.size, default, dtype=float)
        for r, name in enumerate(run_names):
            arr = self.data.get(name)
            if arr is None:
                continue
            sel = run_ids == r
            rk = ranks[sel]
            ok = rk < arr.size
            vals = np.full(rk.size, np.nan)
            vals[ok] = arr[rk[ok]]
            out[sel] = np.where(np.isnan(vals), default, vals)
        return out

    def put(self, run_names: list[str], run_ids: np.ndarray, ranks: np.ndarray, values: np.ndarray,
            mask: np.ndarray | None = None) -> None:
        for r, name in enumerate(run_names):
            sel = run_ids == r
            if mask is not None:
                sel = sel & mask
            if not sel.any():
                continue
            rk = ranks[sel]
            arr = self.data.get(name)
            size = int(rk.max()) + 1
            if arr is None or arr.size < size:
                new = np.full(max(size, 0 if arr is None else arr.size), np.nan)
                if arr is not None:
                    new[: arr.size] = arr
                arr = self.data[name] = new
            arr[rk] = values[sel]

    def lookup(self, run: str, rank: int) -> float | None:
        arr = self.data.get(run)
        if arr is None or rank >= arr.size or np.isnan(arr[rank]):
            return None
        return float(arr[rank])

    def export(self) -> dict[str, list[float | None]]:
        return {run: [None if np.isnan(v) else float(v) for v in arr.tolist()] for run, arr in self.data.items()}

    def load(self, data: dict[str, list[float | None]]) -> None:
        self.data = {run: np.array([np.nan if v is None else v for v in vals], dtype=float) for run, vals in data.items()}


@dataclass
class RankColumns:
    """The usable ranks of a snapshot as columns (built by the one per-rank Python loop)."""

    obs: list[RankObs]
    compute: np.ndarray
    dataloader: np.ndarray
    comm: np.ndarray
    rank: np.ndarray
    pp: np.ndarray  # -1 = unknown
    run_ids: np.ndarray
    run_names: list[str]
    # ranks the snapshot lists (answering or not) in the rank's stage, and in its run
    members_stage: np.ndarray
    members_run: np.ndarray


def extract(ranks: list[RankObs], cfg: DetectorConfig, window_s: float) -> RankColumns:
    """Usable ranks and their compute, dataloader and comm seconds per step. A rank is scored
    only with real data: endpoint up, enough completed steps, compute sections."""
    min_rate = (cfg.min_steps_per_window - 1e-6) / window_s
    excluded = COMPUTE_EXCLUDED_SECTIONS
    obs, comp, dl, comm, rank, pp, rid = [], [], [], [], [], [], []
    runs: dict[str, int] = {}
    listed: dict[tuple[str, int | None], int] = {}
    nan = float("nan")
    for o in ranks:
        stage = (o.run, o.pp)
        listed[stage] = listed.get(stage, 0) + 1
        rate = o.steps_rate
        if not o.up or rate is None or rate < min_rate:
            continue
        c = 0.0
        d = 0.0
        m = nan
        for k, v in o.sections.items():
            if k in excluded:
                if k == "comm":
                    m = v
                else:
                    d = v
            else:
                c += v
        if c <= 0:
            continue
        obs.append(o)
        comp.append(c)
        dl.append(d)
        comm.append(m)
        rank.append(o.rank)
        pp.append(-1 if o.pp is None else o.pp)
        r = runs.get(o.run)
        if r is None:
            r = runs[o.run] = len(runs)
        rid.append(r)
    names = list(runs)
    listed_run: dict[str, int] = {}
    for (run, _), count in listed.items():
        listed_run[run] = listed_run.get(run, 0) + count
    members_stage = np.asarray([listed[(names[r], None if p < 0 else p)] for r, p in zip(rid, pp, strict=True)], float)
    members_run = np.asarray([listed_run[names[r]] for r in rid], float)
    return RankColumns(obs, np.asarray(comp, float), np.asarray(dl, float), np.asarray(comm, float),
                       np.asarray(rank, np.int64), np.asarray(pp, np.int64), np.asarray(rid, np.int64), names,
                       members_stage, members_run)


def _groups(cols: RankColumns, cfg: DetectorConfig, basis: RankTable | None) -> np.ndarray:
    """Integer peer-group id per rank: (run, pp stage) where every rank of the run has a pp
    label, else (run, cluster of compute time)."""
    sub = cols.pp.copy()
    for r, run in enumerate(cols.run_names):
        sel = cols.run_ids == r
        if (cols.pp[sel] >= 0).all():
            continue
        # Unknown layout: stages differ in work, so cluster by compute time instead of
        # comparing every rank to the global median -- on each rank's own long-run compute
        # time where known, so that a rank that slows down later stays with its old peers.
        vals = cols.compute[sel]
        if basis is not None:
            known = basis.get([run], np.zeros(int(sel.sum()), np.int64), cols.rank[sel], np.nan)
            vals = np.where(np.isnan(known), vals, known)
        sub[sel] = _CLUSTER_OFFSET + cluster_1d(vals, cfg.cluster_gap_rel, cfg.min_group_size, cfg.cluster_gap_factor)
    return cols.run_ids * (2 * _CLUSTER_OFFSET) + sub


_CLUSTER_OFFSET = 1 << 20


def score_ranks(ranks: list[RankObs], cfg: DetectorConfig, window_s: float,
                basis: RankTable | None = None, smooth_prev: RankTable | None = None) -> StragglerScores:
    """Score every usable rank; ``basis``: per-rank long-run compute time used to cluster runs
    whose layout is unknown; ``smooth_prev``: last evaluation's slow signal per rank (both
    kept by DetectorCore)."""
    cols = extract(ranks, cfg, window_s)
    obs, compute, dataloader, comm = cols.obs, cols.compute, cols.dataloader, cols.comm
    n = len(obs)
    run_ids = cols.run_ids
    groups = _groups(cols, cfg, basis)
    busy = compute + dataloader
    size = grouped_count(groups, np.ones(n, bool)) if n else np.zeros(0)
    # Quorum: a verdict needs at least min_answering_frac of the peer group answering with
    # data. Groups by pp stage count the stage's listed ranks; clustered runs (no layout
    # labels) judge the run as a whole, since the missing ranks' cluster is unknown.
    by_stage = (cols.pp >= 0) & ~(groups % (2 * _CLUSTER_OFFSET) >= _CLUSTER_OFFSET)
    answering = np.where(by_stage, size, grouped_count(run_ids, np.ones(n, bool)) if n else np.zeros(0))
    quorum = answering >= cfg.min_answering_frac * np.where(by_stage, cols.members_stage, cols.members_run)

    med_c = grouped_median(compute, groups)
    med_d = grouped_median(dataloader, groups)
    med_m = grouped_median(comm, groups)
    med_b = grouped_median(busy, groups)
    floor_c = cfg.mad_floor_rel * med_c
    floor_d = cfg.mad_floor_rel * med_b
    mad_c = grouped_median(np.abs(compute - med_c), groups) * MAD_NORMAL
    mad_d = grouped_median(np.abs(dataloader - med_d), groups) * MAD_NORMAL
    with np.errstate(invalid="ignore", divide="ignore"):
        z_c = (compute - med_c) / np.maximum(mad_c, floor_c)
        z_d = (dataloader - med_d) / np.maximum(mad_d, floor_d)
        rel_c = (compute - med_c) / med_c
        rel_d = (dataloader - med_d) / med_b
    flag_c = (z_c >= cfg.z_threshold) & (rel_c >= cfg.min_slowdown)
    flag_d = (z_d >= cfg.z_threshold) & (rel_d >= cfg.min_slowdown)
    peer_c, peer_d, peer_b = med_c.copy(), med_d.copy(), med_b.copy()

    # Groups too small for MAD: compare with the fastest peer and ask for a larger margin.
    small = size < cfg.min_group_size
    if small.any():
        pmin_c = grouped_min_excluding_self(compute, groups)
        pmin_d = grouped_min_excluding_self(dataloader, groups)
        pmin_b = grouped_min_excluding_self(busy, groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            src_c = (compute - pmin_c) / pmin_c
            src_d = (dataloader - pmin_d) / pmin_b
        scale = cfg.z_threshold / cfg.small_group_min_slowdown
        # With several small groups in a run, their pooled spread is a usable noise scale
        # (MAD over the run's small-group members); otherwise only the fixed margin applies.
        runs = run_ids
        pooled = grouped_median(np.where(small, np.abs(src_c), np.nan), runs) * MAD_NORMAL
        pooled_ok = small & (grouped_count(runs, small) >= _POOL_MIN) & np.isfinite(pooled)
        pooled_scale = np.maximum(np.nan_to_num(pooled, nan=1.0), cfg.mad_floor_rel)
        z_pool = src_c / pooled_scale
        pooled_flag = (z_pool >= cfg.z_threshold) & (src_c >= cfg.min_slowdown)
        rel_c = np.where(small, src_c, rel_c)
        rel_d = np.where(small, src_d, rel_d)
        z_c = np.where(pooled_ok, z_pool, np.where(small, src_c * scale, z_c))
        z_d = np.where(small, src_d * scale, z_d)
        flag_c = np.where(pooled_ok, pooled_flag, np.where(small, src_c >= cfg.small_group_min_slowdown, flag_c))
        flag_d = np.where(small, src_d >= cfg.small_group_min_slowdown, flag_d)
        peer_c = np.where(small, pmin_c, peer_c)
        peer_d = np.where(small, pmin_d, peer_d)
        peer_b = np.where(small, pmin_b, peer_b)
    # a rank alone in its group has no peers: it is never a straggler by comparison
    alone = size < 2
    for arr in (z_c, z_d, rel_c, rel_d):
        arr[alone | np.isnan(arr)] = 0.0
    flag_c = flag_c & ~alone
    flag_d = flag_d & ~alone

    # Slow signal: per-window excess is noisy when sequence lengths vary, but a straggler's
    # excess persists while the noise averages out. Clipping keeps a single spike from
    # carrying it over the threshold.
    if smooth_prev is not None:
        prev = smooth_prev.get(cols.run_names, run_ids, cols.rank, 0.0)
    else:
        prev = np.zeros(n)
    sm = (1 - cfg.smooth_alpha) * prev + cfg.smooth_alpha * np.clip(rel_c, -cfg.smooth_clip, cfg.smooth_clip)
    sm[alone] = 0.0
    sm = np.where(quorum, sm, prev)  # a window without quorum is no evidence either way
    med_s = grouped_median(sm, groups)
    mad_s = grouped_median(np.abs(sm - med_s), groups) * MAD_NORMAL
    z_s = (sm - med_s) / np.maximum(mad_s, cfg.mad_floor_rel)
    flag_s = (z_s >= cfg.z_threshold) & (sm >= cfg.min_slowdown)
    if small.any():
        z_s = np.where(pooled_ok, sm / pooled_scale, np.where(small, sm * scale, z_s))
        flag_s = np.where(pooled_ok, (z_s >= cfg.z_threshold) & (sm >= cfg.min_slowdown),
                          np.where(small, sm >= cfg.small_group_min_slowdown, flag_s))
    z_s[alone] = 0.0
    flag_s = flag_s & ~alone
    # Hysteresis: an open episode stays open while the rank is over half of both thresholds
    # (the relative one judged against the threshold that applies to its group size).
    rel_thr = np.where(small & ~pooled_ok, cfg.small_group_min_slowdown, cfg.min_slowdown) if small.any() \
        else cfg.min_slowdown
    # The slow signal remembers past windows: it may carry a rank over the z threshold, but
    # never one that is not at least the configured minimum slower than its peers right now.
    flag_s = flag_s & (rel_c >= rel_thr)
    flag_c = flag_c | flag_s
    score = np.maximum(np.maximum(np.maximum(z_c, z_d), z_s), 0.0)
    flagged = (flag_c | flag_d) & quorum
    sustained = ~alone & quorum & (((z_c >= cfg.z_threshold / 2) & (rel_c >= rel_thr / 2))
                          | ((z_d >= cfg.z_threshold / 2) & (rel_d >= rel_thr / 2))
                          # the slow signal decays over many windows: it holds an episode only
                          # while the current window is itself over the firing minimum, so that
                          # a cured rank resolves after resolve_windows windows, not the decay
                          | ((z_s >= cfg.z_threshold / 2) & (sm >= rel_thr / 2) & (rel_c >= rel_thr)))
    cause = np.where(flag_d & (~flag_c | (rel_d > rel_c)), "dataloader", "compute").tolist()
    return StragglerScores(
        obs=obs, cols=cols, compute=compute, dataloader=dataloader, comm=comm, group=groups, group_size=size,
        peer_compute=peer_c, peer_dataloader=peer_d, peer_comm=med_m, peer_busy=peer_b,
        z_compute=z_c, z_dataloader=z_d, rel_compute=rel_c, rel_dataloader=rel_d, smooth=sm, z_smooth=z_s,
        score=score, flagged=np.asarray(flagged, bool), quorum=np.asarray(quorum, bool), sustained=np.asarray(sustained, bool), cause=cause,
    )
