"""Baselines the detection benchmarks compare the detector with, on the same snapshots."""

from __future__ import annotations

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.stats import MAD_NORMAL, grouped_median
from rankwatch.detectors.straggler import RankTable, StragglerScores


class FixedPersistence:
    """The straggler rule before the sequential test: a window is flagged when the rank's
    robust z >= 3.5 and it is >= 4 % slower than its peers, or when its slow signal (EWMA,
    weight 0.2, of the excess clipped to +-8 %) is; an episode fires after 3 consecutive
    flagged windows and stays open while the rank is over half the thresholds."""

    persist_windows = 3
    alpha, clip = 0.2, 0.08

    def __init__(self) -> None:
        self.smooth = RankTable()

    def decide(self, sc: StragglerScores, cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
        cols = sc.cols
        alone = sc.group_size < 2
        prev = self.smooth.get(cols.run_names, cols.run_ids, cols.rank, 0.0)
        sm = (1 - self.alpha) * prev + self.alpha * np.clip(sc.rel_compute, -self.clip, self.clip)
        sm[alone] = 0.0
        sm = np.where(sc.quorum, sm, prev)
        self.smooth.put(cols.run_names, cols.run_ids, cols.rank, sm)
        med = grouped_median(sm, sc.group)
        mad = grouped_median(np.abs(sm - med), sc.group) * MAD_NORMAL
        z_s = (sm - med) / np.maximum(mad, cfg.mad_floor_rel)
        thr = cfg.min_slowdown
        # groups too small for MAD: the old rule scored the slow signal against the pooled
        # spread of the run's small groups (the scores' noise), or asked for the larger margin
        small = sc.group_size < cfg.min_group_size
        pooled = small & (sc.noise_compute > cfg.mad_floor_rel)
        z_s = np.where(small, sm / np.maximum(sc.noise_compute, cfg.mad_floor_rel), z_s)
        thr_s = np.where(small & ~pooled, cfg.small_group_min_slowdown, thr)
        flag_s = (z_s >= cfg.z_threshold) & (sm >= thr_s) & (sc.rel_compute >= thr_s) & ~alone
        flagged = (sc.window_flag | flag_s) & sc.quorum
        z, rel_c, rel_d = cfg.z_threshold, sc.rel_compute, sc.rel_dataloader
        sustained = ~alone & sc.quorum & (((sc.z_compute >= z / 2) & (rel_c >= thr / 2))
                                          | ((sc.z_dataloader >= z / 2) & (rel_d >= thr / 2))
                                          | ((z_s >= z / 2) & (sm >= thr / 2) & (rel_c >= thr)))
        return flagged, sustained


