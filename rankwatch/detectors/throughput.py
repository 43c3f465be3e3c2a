"""Throughput drop: the whole run steps slower than its own recent baseline.

Keeps, per run, the median step time of each evaluation; a single upward change point
(stats.change_point: the best Mann-Whitney split, its p-value corrected for choosing the split
by a permutation test) with a sustained shift of at least ``throughput_drop_rel`` fires. A relative straggler score cannot see a job-wide slowdown; this
can (the NVRx "individual" reference, done on the run instead of the rank)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import Snapshot
from rankwatch.detectors.stats import change_point


class ThroughputDetector:
    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.history: dict[str, list[float]] = {}
        self.baseline: dict[str, float] = {}  # frozen while an episode is open

    def evaluate(self, snap: Snapshot, warm: set[str], open_runs: set[str],
                 causes: dict[str, dict[str, Any]]) -> list[Finding]:
        """``warm``: runs past warm-up; ``open_runs``: runs with an open throughput episode;
        ``causes``: run -> the top open episode that may explain a drop."""
        cfg = self.cfg
        by_run: dict[str, list[float]] = defaultdict(list)
        for r in snap.ranks:
            if r.up and r.step_seconds and r.steps_rate and r.steps_rate > 0 and r.run in warm:
                by_run[r.run].append(r.step_seconds)
        findings = []
        for run, vals in by_run.items():
            if not vals:
                continue  # no steps this window: the hang detector's business, not a slowdown
            cur = float(np.median(vals))
            hist = self.history.setdefault(run, [])
            hist.append(cur)
            del hist[:-cfg.throughput_history]
            recent = float(np.median(hist[-cfg.throughput_min_segment:]))
            base = self.baseline.get(run)
            if run in open_runs and base:
                # hysteresis: stay open until the recent median is back within half the threshold
                flagged = recent > base * (1 + cfg.throughput_drop_rel / 2)
                shift, p = recent / base - 1, None
            else:
                cp = change_point(np.asarray(hist), cfg.throughput_min_segment, min_shift=cfg.throughput_drop_rel)
                flagged, shift, p = False, 0.0, None
                if cp is not None:
                    k, p, shift = cp
                    base = float(np.median(hist[:k]))
                    # the change must still hold over the latest evaluations
                    flagged = (shift >= cfg.throughput_drop_rel and p < cfg.throughput_p_value
                               and recent >= base * (1 + cfg.throughput_drop_rel))
                if flagged:
                    self.baseline[run] = base
            if not flagged and run not in open_runs:
                self.baseline.pop(run, None)
            cause = causes.get(run)
            because = f"; top cause: {cause['summary']}" if cause else ""
            findings.append(Finding(
                key=f"throughput:{run}", flagged=bool(flagged), subject={"run": run}, score=float(shift),
                severity="warning",
                summary=(f"Run {run} steps {shift * 100:.0f} % slower than its recent baseline "
                         f"({recent:.3g} s vs {base or 0:.3g} s per step){because}."),
                resolved_summary=f"Run {run} is back to its baseline step time ({recent:.3g} s).",
                evidence={"step_s": recent, "baseline_step_s": base, "shift": round(float(shift), 4),
                          "p_value": p, "top_cause": cause},
                persist=1, resolve=2,
            ))
        return findings

    def export(self) -> dict[str, Any]:
        return {"history": self.history, "baseline": self.baseline}

    def load(self, data: dict[str, Any]) -> None:
        self.history = {r: list(v) for r, v in data.get("history", {}).items()}
        self.baseline = dict(data.get("baseline", {}))
