"""Hangs: the steps of a run stop advancing while its ranks' endpoints still answer, for longer
than a multiple of the run's median step time (and an absolute floor that checkpoints fit
under)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import Snapshot


class HangDetector:
    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        # run -> {"progress": highest step seen, "progress_time": data time it last advanced,
        #         "step_s": EWMA of the run's median step time}
        self.runs: dict[str, dict[str, float]] = {}

    def evaluate(self, snap: Snapshot) -> list[Finding]:
        cfg = self.cfg
        # one pass over the ranks: per run, what the answering endpoints say about progress
        acc: dict[str, dict[str, Any]] = {}
        for r in snap.ranks:
            a = acc.get(r.run)
            if a is None:
                a = acc[r.run] = {"n": 0, "up": 0, "step": None, "last": None, "rates": False, "adv": False,
                                  "times": [], "ranks": []}
            a["n"] += 1
            if not r.up:
                continue
            a["up"] += 1
            a["ranks"].append(r)
            if r.step is not None and (a["step"] is None or r.step > a["step"]):
                a["step"] = r.step
            if r.last_step_time is not None and (a["last"] is None or r.last_step_time > a["last"]):
                a["last"] = r.last_step_time
            if r.steps_rate is not None:
                a["rates"] = True
                if r.steps_rate > 0:
                    a["adv"] = True
                    if r.step_seconds:
                        a["times"].append(r.step_seconds)
        findings = []
        for run, a in acc.items():
            st = self.runs.setdefault(run, {})
            if not a["up"]:
                continue  # every endpoint down: the job ended or crashed, not a hang
            if a["times"]:
                med = float(np.median(a["times"]))
                st["step_s"] = med if "step_s" not in st else 0.8 * st["step_s"] + 0.2 * med
            progress, last, advanced = a["step"], a["last"], a["adv"]
            if "progress_time" not in st and last is None and not advanced and not (progress or 0) > 0:
                # endpoints up but no step completed yet (a step number of 0 counts none): the
                # job is still loading its model (minutes for a 70B), which is a start, not a hang
                continue
            if progress is not None and progress > st.get("progress", -np.inf):
                st["progress"] = progress
                st["progress_time"] = last if last is not None else snap.time
            elif advanced and progress is None:
                st["progress_time"] = snap.time
            if "progress_time" not in st:
                # first sight of the run: trust the last-step timestamp if there is one
                if last is not None:
                    st["progress_time"] = last
                else:
                    st["progress_time"] = snap.time
            if last is not None:
                st["progress_time"] = max(st["progress_time"], last)
            stalled = snap.time - st["progress_time"]
            step_s = st.get("step_s")
            limit = max(cfg.hang_min_s, cfg.hang_factor * step_s) if step_s else cfg.hang_min_s
            flagged = stalled > limit and not advanced
            ev: dict[str, Any] = {"stalled_s": round(stalled, 3), "limit_s": round(limit, 3), "median_step_s": step_s,
                                  "last_step": progress, "ranks_up": a["up"], "ranks": a["n"]}
            if flagged:
                # the ranks that stopped first (lowest step number) are where to look
                stepped = [r for r in a["ranks"] if r.step is not None]
                ev["lowest_step_ranks"] = [r.rank for r in sorted(stepped, key=lambda r: (r.step, r.rank))[:3]]
            findings.append(Finding(
                key=f"hang:{run}", flagged=bool(flagged), subject={"run": run}, score=stalled / limit if limit else 0.0,
                severity="critical",
                summary=(f"Run {run} is hung: no step for {stalled:.0f} s (median step {step_s or 0:.2f} s) while "
                         f"{a['up']} of {a['n']} rank endpoints still answer."),
                resolved_summary=f"Run {run} is stepping again.",
                evidence=ev, persist=1, resolve=1,
            ))
        return findings

    def export(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def load(self, data: dict[str, Any]) -> None:
        self.runs = {r: dict(v) for r, v in data.get("runs", {}).items()}
