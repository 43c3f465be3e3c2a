"""Straggler scoring: per-rank compute and dataloader time against the rank's peers.

In synchronous training every rank's step time is the same, so the slow rank is the one with
the most *own work* (compute outside comm/dataloader, or dataloader time) and the least comm
wait. Peers are the ranks of the same run and pipeline stage; without layout labels, ranks are
clustered by compute time. Each window's relative excess over the peers feeds a bank of
one-sided CUSUM charts per rank (the sequential test of docs/detector.md), so that evidence
adds up with the size of the fault. Everything is vectorised over ranks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.model import COMPUTE_EXCLUDED_SECTIONS, RankObs
from rankwatch.detectors.stats import (
    MAD_NORMAL,
    cluster_1d,
    cusum_noise_threshold,
    cusum_step,
    grouped_count,
    grouped_median,
    grouped_min_excluding_self,
    rank_order_level,
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
    noise_compute: np.ndarray  # the peer group's spread of the relative excess this window (sigma)
    noise_dataloader: np.ndarray
    window_flag: np.ndarray  # over the z and slowdown thresholds in this window alone (no memory)
    evidence: np.ndarray  # (n, 2 J) CUSUM charts after this window, seconds of excess: compute, dataloader
    evidence_ratio: np.ndarray  # (n,) largest chart / its threshold: >= 1 is a sequential alarm
    chart: np.ndarray  # (n,) index into cfg.cusum_slowdowns of that chart
    score: np.ndarray
    flagged: np.ndarray  # the sequential test fires and the rank is slower now: opens an episode
    quorum: np.ndarray  # enough of the peer group answered for a verdict (else: no data)
    sustained: np.ndarray  # keeps an open episode open (hysteresis)
    cause: list[str]
    # runs without layout labels whose pipeline stages are not contiguous in rank order
    layout_unordered: list[str] = dataclasses.field(default_factory=list)

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
    writing it for 100 000 ranks is a numpy gather/scatter instead of a Python loop.
    ``width``: values per rank (0 = one scalar each)."""

    def __init__(self, width: int = 0) -> None:
        self.width = width
        self.data: dict[str, np.ndarray] = {}

    def _shape(self, n: int) -> tuple[int, ...]:
        return (n, self.width) if self.width else (n,)

    def get(self, run_names: list[str], run_ids: np.ndarray, ranks: np.ndarray, default: float) -> np.ndarray:
        out = np.full(self._shape(ranks.size), default, dtype=float)
        for r, name in enumerate(run_names):
            arr = self.data.get(name)
            if arr is None:
                continue
            sel = run_ids == r
            rk = ranks[sel]
            if rk.size and int(rk.max()) < arr.shape[0]:
                vals = arr[rk]  # a copy: every rank has a slot (the usual case)
            else:
                ok = rk < arr.shape[0]
                vals = np.full(self._shape(rk.size), np.nan)
                vals[ok] = arr[rk[ok]]
            out[sel] = np.nan_to_num(vals, copy=False, nan=default)
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
            if arr is None or arr.shape[0] < size:
                new = np.full(self._shape(max(size, 0 if arr is None else arr.shape[0])), np.nan)
                if arr is not None:
                    new[: arr.shape[0]] = arr
                arr = self.data[name] = new
            arr[rk] = values[sel]

    def forget(self, run: str, rank: int) -> None:
        """Drop one rank's values (they read as the default again)."""
        arr = self.data.get(run)
        if arr is not None and rank < arr.shape[0]:
            arr[rank] = np.nan

    def export(self) -> dict[str, list]:
        return {run: [None if np.isnan(v) else float(v) for v in arr.ravel().tolist()]
                for run, arr in self.data.items()}

    def load(self, data: dict[str, list[float | None]]) -> None:
        self.data = {}
        for run, vals in data.items():
            arr = np.array([np.nan if v is None else v for v in vals], dtype=float)
            self.data[run] = arr.reshape(-1, self.width) if self.width else arr


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


# A run without layout labels whose compute times follow rank order may have this fraction of
# its ranks (at least _LONE_MIN) differ from both rank neighbours: more, and the stages are
# not contiguous blocks (an interleaved layout), so neighbours are no guide to a rank's stage.
_LONE_FRAC = 0.02
_LONE_MIN = 2


def _groups(cols: RankColumns, cfg: DetectorConfig, basis: RankTable | None) -> tuple[np.ndarray, list[str]]:
    """Integer peer-group id per rank: (run, pp stage) where every rank of the run has a pp
    label, else (run, cluster of compute time); and the runs without labels whose stages could
    not be told from rank order (a rank slow from its first step goes unseen there)."""
    sub = cols.pp.copy()
    unordered: list[str] = []
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
        # A rank slow from its first step has a long-run time of its own, between or beyond
        # the stages' times, and would make (or join) a cluster of its own. Its rank neighbours
        # are in its stage: cluster on each rank's level among its neighbours instead, as long
        # as only a few ranks differ from both of theirs.
        level = rank_order_level(vals, cols.rank[sel])
        with np.errstate(invalid="ignore", divide="ignore"):
            lone = int((np.abs(vals - level) >= cfg.min_slowdown * np.abs(level)).sum())
        if lone <= max(_LONE_MIN, _LONE_FRAC * vals.size):
            vals = level
        else:
            unordered.append(run)
        sub[sel] = _CLUSTER_OFFSET + cluster_1d(vals, cfg.cluster_gap_rel, cfg.min_group_size, cfg.cluster_gap_factor)
    return cols.run_ids * (2 * _CLUSTER_OFFSET) + sub, unordered


_CLUSTER_OFFSET = 1 << 20


def chart_parameters(cfg: DetectorConfig, step_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(drift, cap, threshold seconds, minimum rising evaluations) of each CUSUM chart: drift is
    half the chart's reference slowdown, each window's excess is capped at the reference (the
    largest chart is uncapped), and a chart may fire only after it rose in each of the
    evaluations that cover its minimum duration (``step_s`` apart)."""
    d = np.asarray(cfg.cusum_slowdowns, dtype=float)
    cap = d.copy()
    cap[-1] = np.inf
    runs = np.ceil(np.asarray(cfg.cusum_min_duration_s, dtype=float) / step_s - 1e-9) + 1
    return d / 2.0, cap, np.asarray(cfg.cusum_thresholds_s, dtype=float), runs


def evidence_width(cfg: DetectorConfig) -> int:
    """Values per rank in the sequential test's state: for compute and for dataloader, the J
    charts, J counts of consecutive rising evaluations and the noise memory."""
    return 2 * (2 * len(cfg.cusum_slowdowns) + 1)


# weight of one evaluation in a rank's memory of its peer group's spread
_NOISE_ALPHA = 0.1


def score_ranks(ranks: list[RankObs], cfg: DetectorConfig, window_s: float,
                basis: RankTable | None = None, evidence_prev: RankTable | None = None,
                step_s: float | None = None) -> StragglerScores:
    """Score every usable rank; ``basis``: per-rank long-run compute time used to cluster runs
    whose layout is unknown; ``evidence_prev``: the CUSUM charts of each rank after the last
    evaluation (a RankTable of width 2 J, kept by DetectorCore); ``step_s``: data seconds since
    the last evaluation (default: one window), which weighs this window's evidence so that
    overlapping windows are not counted twice."""
    cols = extract(ranks, cfg, window_s)
    obs, compute, dataloader, comm = cols.obs, cols.compute, cols.dataloader, cols.comm
    n = len(obs)
    run_ids = cols.run_ids
    groups, unordered = _groups(cols, cfg, basis)
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
        # the group's spread in the same relative units as the excess
        noise_c = np.maximum(mad_c, floor_c) / med_c
        noise_d = np.maximum(mad_d, floor_d) / med_b
    flag_c = (z_c >= cfg.z_threshold) & (rel_c >= cfg.min_slowdown)
    flag_d = (z_d >= cfg.z_threshold) & (rel_d >= cfg.min_slowdown)
    peer_c, peer_d, peer_b = med_c.copy(), med_d.copy(), med_b.copy()
    # the margin a small group asks for beyond min_slowdown comes off the charts' input
    margin = np.zeros(n)

    # Groups too small for MAD: compare with the fastest peer and ask for a larger margin.
    small = size < cfg.min_group_size
    pooled_ok = np.zeros(n, bool)
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
        noise_c = np.where(pooled_ok, pooled_scale, np.where(small, cfg.mad_floor_rel, noise_c))
        noise_d = np.where(small, cfg.mad_floor_rel, noise_d)
        margin = np.where(small & ~pooled_ok, cfg.small_group_min_slowdown - cfg.min_slowdown, 0.0)
        peer_c = np.where(small, pmin_c, peer_c)
        peer_d = np.where(small, pmin_d, peer_d)
        peer_b = np.where(small, pmin_b, peer_b)
    # a rank alone in its group has no peers: it is never a straggler by comparison
    alone = size < 2
    for arr in (z_c, z_d, rel_c, rel_d):
        arr[alone | np.isnan(arr)] = 0.0
    for arr in (noise_c, noise_d):
        arr[~np.isfinite(arr)] = cfg.mad_floor_rel
    flag_c = flag_c & ~alone
    flag_d = flag_d & ~alone
    rel_thr = cfg.min_slowdown + margin

    # Sequential test: each window's excess over the peers feeds the rank's CUSUM charts,
    # weighted by the seconds of new data behind it. A window without quorum is no evidence
    # either way: the charts keep their value. State per rank: (compute, dataloader) x
    # (J charts, J counts of rising evaluations, noise memory); a rank never seen reads 0s.
    step = step_s if step_s is not None else cfg.interval_s
    drift, cap, h_rel, min_runs = chart_parameters(cfg, step)
    J = drift.size
    state = (evidence_prev.get(cols.run_names, run_ids, cols.rank, 0.0) if evidence_prev is not None
             else np.zeros((n, 2 * (2 * J + 1)))).reshape(n, 2, 2 * J + 1)
    weight = min(step, window_s)
    all_ok = bool(quorum.all())
    ratios, charts_at, alarms = [], [], []
    for sig, (x, now) in enumerate(((rel_c - margin, noise_c), (rel_d - margin, noise_d))):
        view = state[:, sig, :]
        # The group's spread, remembered per rank: one window's MAD is unstable when the peers
        # form a few clusters (data-parallel replicas sharing a batch), an average is not.
        mem = view[:, 2 * J]
        new = np.empty((n, 2 * J + 1))
        new[:, 2 * J] = np.where(mem > 0, (1 - _NOISE_ALPHA) * mem + _NOISE_ALPHA * now, now)
        new[:, :J] = cusum_step(view[:, :J], x, drift, cap, weight)
        rising = x[:, None] > drift[None, :]
        new[:, J:2 * J] = (view[:, J:2 * J] + 1) * rising
        if all_ok:
            view[:] = new
        else:
            view[quorum] = new[quorum]
        r, c, a = _evidence_ratio(view[:, :J], view[:, 2 * J], view[:, J:2 * J], drift, h_rel, min_runs, cfg,
                                  window_s, step)
        ratios.append(r)
        charts_at.append(c)
        alarms.append(a & (x >= cfg.min_slowdown) & ~alone)
    evidence = state.reshape(n, 2 * (2 * J + 1))
    # The charts remember past windows: they open an episode only for a rank that is at least
    # the minimum slower than its peers right now.
    seq_c, seq_d = alarms
    ratio_c, ratio_d = ratios
    flagged = (seq_c | seq_d) & quorum
    window_flag = (flag_c | flag_d) & quorum
    # Hysteresis: an open episode stays open while the rank is over half of both per-window
    # thresholds, or while its charts still hold the alarm and it is over the minimum now.
    sustained = ~alone & quorum & (((z_c >= cfg.z_threshold / 2) & (rel_c >= rel_thr / 2))
                                   | ((z_d >= cfg.z_threshold / 2) & (rel_d >= rel_thr / 2))
                                   | seq_c | seq_d)
    dl_first = seq_d & (~seq_c | (ratio_d > ratio_c)) | (~seq_c & ~seq_d & flag_d & ~flag_c)
    cause = np.where(dl_first, "dataloader", "compute").tolist()
    score = np.maximum(np.maximum(z_c, z_d), 0.0)
    return StragglerScores(
        obs=obs, cols=cols, compute=compute, dataloader=dataloader, comm=comm, group=groups, group_size=size,
        peer_compute=peer_c, peer_dataloader=peer_d, peer_comm=med_m, peer_busy=peer_b,
        z_compute=z_c, z_dataloader=z_d, rel_compute=rel_c, rel_dataloader=rel_d,
        noise_compute=state[:, 0, 2 * J], noise_dataloader=state[:, 1, 2 * J],
        window_flag=np.asarray(window_flag, bool),
        evidence=evidence, evidence_ratio=np.where(dl_first, ratio_d, ratio_c),
        chart=np.where(dl_first, charts_at[1], charts_at[0]),
        score=score, flagged=np.asarray(flagged, bool), quorum=np.asarray(quorum, bool),
        sustained=np.asarray(sustained, bool), cause=cause, layout_unordered=unordered,
    )


def _evidence_ratio(charts: np.ndarray, noise: np.ndarray, runs: np.ndarray, drift: np.ndarray, h_rel: np.ndarray,
                    min_runs: np.ndarray, cfg: DetectorConfig, window_s: float,
                    step_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the largest chart over its threshold, which chart that is, and whether a chart
    fires (over its threshold after rising long enough).

    Threshold = the chart's configured seconds (above what a benign transient adds) + a noise
    term: the CUSUM threshold whose run length under Gaussian noise of noise_tail_factor x the
    group's spread gives cfg.false_alarm_rate per rank-hour over all charts and both signals
    (Siegmund's approximation). Only rows that rose long enough and hold the configured
    seconds can fire, so only they pay for the noise term; the others report 0."""
    m, J = charts.shape
    ratio = np.zeros(m)
    best = np.zeros(m, np.int64)
    alarm = np.zeros(m, bool)
    cand = np.flatnonzero(((runs >= min_runs) & (charts >= h_rel) & (charts > 0)).any(axis=1))
    if cand.size:
        c, r = charts[cand], runs[cand]
        sigma = cfg.noise_tail_factor * np.maximum(noise[cand], cfg.mad_floor_rel)[:, None]
        independent_per_hour = 3600.0 / max(window_s, step_s)
        arl = 2 * J * independent_per_hour / cfg.false_alarm_rate
        eta = cusum_noise_threshold(drift[None, :] / sigma, arl)
        rat = c / (h_rel[None, :] + sigma * min(window_s, step_s) * eta)
        fire = (rat >= 1.0) & (r >= min_runs[None, :])
        alarm[cand] = fire.any(axis=1)
        # the chart to report: the strongest firing one, else the strongest
        pick = np.where(alarm[cand], np.where(fire, rat, -np.inf).argmax(axis=1), rat.argmax(axis=1))
        best[cand] = pick
        ratio[cand] = rat[np.arange(cand.size), pick]
    return ratio, best, alarm
