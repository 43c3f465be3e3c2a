"""The detector's account of what it watches, in its log: a summary line when it starts and
for every run that appears, and one line when the coverage changes — not one per cycle.

    watching run r: 256 ranks (layout labels: yes), 32 nodes, 256 GPUs, 128 NICs; probe scrape 15 s,
    node scrape 15 s; window 45 s; first verdict after 60 s
    coverage: run r 255/256 ranks (no data: rank 17 on node-02 GPU 1); GPUs 256/256; NICs 128/128; ...

Shared by the live service and replay, which therefore log the same lines for the same data."""

from __future__ import annotations

import logging
from typing import Any

from rankwatch.detectors.cadence import WindowPlan
from rankwatch.detectors.coverage import Coverage, RunCoverage

log = logging.getLogger("rankwatch.detector")


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def run_summary(c: RunCoverage, plan: WindowPlan | None, first_verdict_s: float | None) -> str:
    labels = "yes" if c.layout_labels else "no: peers found by clustering"
    line = (f"watching run {c.run}: {_n(c.expected, 'rank')} (layout labels: {labels}), {_n(len(c.nodes), 'node')}, "
            f"{_n(c.gpus, 'GPU')}, {_n(c.nics, 'NIC')}")
    if plan is not None:
        win = f"window {plan.window_s:g} s" if plan.window_s == plan.node_window_s else \
            f"window {plan.window_s:g} s (node {plan.node_window_s:g} s)"
        line += f"; {plan.spacing.describe()}; {win}; every {plan.interval_s:g} s"
    if first_verdict_s is not None:
        line += f"; first verdict after {first_verdict_s:g} s" if first_verdict_s > 0 else "; judging now"
    return line


class CoverageLog:
    """Logs a summary per new run and one line per coverage change."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.log = logger
        self._runs: set[str] = set()
        self._key: tuple | None = None
        self._started = False

    def observe_core(self, core: Any, t: float, plan: WindowPlan | None = None) -> Coverage | None:
        """``observe`` the coverage of ``core``'s last evaluation at data time ``t``, with each
        run's warm-up left as its time to the first verdict."""
        cov: Coverage | None = getattr(core, "coverage", None)
        if cov is not None:
            first = getattr(core, "run_first_seen", {})
            warmup = getattr(getattr(core, "config", None), "warmup_s", 0.0)
            self.observe(cov, plan, {run: max(0.0, first.get(run, t) + warmup - t) for run in cov.runs})
        return cov

    def observe(self, cov: Coverage | None, plan: WindowPlan | None = None,
                first_verdict: dict[str, float] | None = None) -> list[str]:
        """Log what changed since the last call; returns the lines logged. ``first_verdict``:
        run -> seconds of data time until its first verdict (warm-up left)."""
        if cov is None:
            return []
        lines: list[tuple[int, str]] = []
        if not self._started:
            self._started = True
            if not cov.runs:
                what = f"{plan.spacing.describe()}; " if plan is not None else ""
                lines.append((logging.INFO, f"watching: no live training run yet; {cov.known['nodes']} node exporters, "
                                            f"{cov.known['gpus']} GPUs, {cov.known['nics']} NICs; {what}"
                                            "waiting for probes (rankwatch_rank_info)"))
        for run, c in sorted(cov.runs.items()):
            if run not in self._runs:
                lines.append((logging.INFO, run_summary(c, plan, (first_verdict or {}).get(run))))
        for run in sorted(self._runs - set(cov.runs)):
            why = "its ranks stopped answering" if run in cov.ended_runs else "its series are gone"
            lines.append((logging.INFO, f"run {run} ended ({why}): no more verdicts about it"))
        self._runs = set(cov.runs)
        key = cov.key()
        if key != self._key:
            partial = cov.blind or any(cov.known[s] != cov.with_data[s] for s in cov.known) or \
                bool(cov.nodes_without_exporter)
            if self._key is not None or partial:
                lines.append((logging.WARNING if partial else logging.INFO, f"coverage: {cov.describe()}"))
            self._key = key
        for level, line in lines:
            self.log.log(level, "%s", line)
        return [line for _, line in lines]
