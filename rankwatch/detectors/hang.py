"""Hangs: the steps of a run stop advancing while its ranks' endpoints still answer, for longer
than a multiple of the run's median step time (and an absolute floor that checkpoints fit
under)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.coverage import tally_runs
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import RankObs, Snapshot

_NAMED = 4  # stuck ranks named in the summary; the evidence lists up to _LISTED
_LISTED = 32


class HangDetector:
    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        # run -> {"progress": highest step seen, "progress_time": data time it last advanced,
        #         "step_s": EWMA of the run's median step time}
        self.runs: dict[str, dict[str, float]] = {}
        self.last_time: float | None = None

    def evaluate(self, snap: Snapshot, tallies: dict[str, dict[str, Any]] | None = None) -> list[Finding]:
        """``tallies``: ``coverage.tally_runs(snap.ranks)``, if already made (one pass over the
        ranks serves both)."""
        cfg = self.cfg
        prev_time, self.last_time = self.last_time, snap.time
        # per run, what the answering endpoints say about progress
        acc = tally_runs(snap.ranks) if tallies is None else tallies
        for run in list(self.runs):
            if run not in acc:
                del self.runs[run]  # gone from the data (beyond the lookback): nothing to keep
        findings = []
        for run, a in acc.items():
            st = self.runs.setdefault(run, {})
            n, up = len(a["all"]), len(a["answering"])
            if not up:
                # no endpoint answers for this run any more: it ended (its processes exited, or its
                # ports now serve another run) or crashed, which is not a hang
                continue
            if a["times"]:
                med = float(np.median(a["times"]))
                st["step_s"] = med if "step_s" not in st else 0.8 * st["step_s"] + 0.2 * med
            progress, last = a["step"], a["last"]
            # Advancing = the step number moved since the last evaluation. A rate over the window
            # says so only for a window's length after the steps stopped (minutes when the data is
            # scraped every minute), so it counts only where the probes export no step number.
            if progress is not None:
                advanced = "progress" in st and progress > st["progress"]
            else:
                advanced = a["adv"]
            if "progress_time" not in st and last is None and not a["adv"] and not (progress or 0) > 0:
                # endpoints up but no step completed yet (a step number of 0 counts none): the
                # job is still loading its model (minutes for a 70B), which is a start, not a hang
                continue
            if progress is not None and progress > st.get("progress", -np.inf):
                st["progress"] = progress
                st["progress_time"] = last if last is not None else snap.time
                if advanced and prev_time is not None:
                    # the new step ended after the last evaluation's samples: a node clock running
                    # late (last-step timestamps are the node's) cannot age it further than that
                    st["progress_time"] = max(st["progress_time"], prev_time - snap.window_s)
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
                                  "last_step": progress, "ranks_up": up, "ranks": n}
            stuck_text = ""
            if flagged:
                stuck = _stuck_ranks(a["down"], a["answering"], progress)
                ev["stuck_ranks"] = stuck[:_LISTED]
                ev["ranks_not_answering"] = len(a["down"])
                stuck_text = _describe_stuck(stuck, n, progress)
            findings.append(Finding(
                key=f"hang:{run}", flagged=bool(flagged), subject={"run": run}, score=stalled / limit if limit else 0.0,
                severity="critical",
                summary=(f"Run {run} is hung: {stuck_text}no step for {stalled:.0f} s (median step {step_s or 0:.2f} s) "
                         f"while {up} of {n} rank endpoints still answer."),
                resolved_summary=f"Run {run} is stepping again.",
                evidence=ev, persist=1, resolve=1,
            ))
        return findings

    def export(self) -> dict[str, Any]:
        return {"runs": self.runs, "last_time": self.last_time}

    def load(self, data: dict[str, Any]) -> None:
        self.runs = {r: dict(v) for r, v in data.get("runs", {}).items()}
        self.last_time = data.get("last_time")


def _order(r: RankObs) -> tuple[float, float, int]:
    return (r.step if r.step is not None else -np.inf,
            r.last_step_time if r.last_step_time is not None else -np.inf, r.rank)


def _stuck_ranks(down: list[RankObs], answering: list[RankObs], top: float | None) -> list[dict[str, Any]]:
    """Where to look first: ranks whose endpoints stopped answering, then answering ranks whose
    step counter stopped before the others' (lowest step, then earliest last step); each in
    the order they stopped."""
    out = [{"rank": r.rank, "node": r.node, "gpu": r.gpu, "why": "stopped answering", "last_step": r.step,
            "last_step_time": r.last_step_time} for r in sorted(down, key=_order)]
    behind = [r for r in answering if r.step is not None and top is not None and r.step < top]
    out += [{"rank": r.rank, "node": r.node, "gpu": r.gpu, "why": "behind", "last_step": r.step,
             "last_step_time": r.last_step_time} for r in sorted(behind, key=_order)]
    return out


def _describe_stuck(stuck: list[dict[str, Any]], n: int, top: float | None) -> str:
    if not stuck:
        at = f" at step {top:g}" if top is not None else ""
        return f"all {n} ranks stopped{at}; "
    parts = []
    for why in ("stopped answering", "behind"):
        group = [s for s in stuck if s["why"] == why]
        if not group:
            continue
        named = [f"rank {s['rank']} ({s['node']}" + (f", GPU {s['gpu']})" if s["gpu"] is not None else ")")
                 for s in group[:_NAMED]]
        more = f" and {len(group) - _NAMED} more" if len(group) > _NAMED else ""
        verb = ("stopped answering" if why == "stopped answering"
                else f"stopped before the others (which reached step {top:g})" if top is not None else "fell behind")
        parts.append(f"{', '.join(named)}{more} {verb}")
    return "; ".join(parts) + "; "
