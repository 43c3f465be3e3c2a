"""The detector core: one ``evaluate(snapshot)`` per cycle, pure (no I/O, no wall clock).

Runs the rules in dependency order — GPU health and network first, so that each straggler
event can carry the hardware evidence that explains it; then stragglers, hangs and
throughput, and last the coverage (``data_gap``) — and turns the per-cycle verdicts into
episodes (persistence, hysteresis). A run that ended (none of its ranks answers for it any
more) gets no verdict, and its open episodes close."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Protocol

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.coverage import Coverage, GapDetector, measure, tally_runs
from rankwatch.detectors.diagnose import straggler_finding_text
from rankwatch.detectors.episodes import EpisodeTracker, Finding
from rankwatch.detectors.gpu_health import GpuHealth
from rankwatch.detectors.hang import HangDetector
from rankwatch.detectors.model import RankObs, Snapshot
from rankwatch.detectors.network import NetworkHealth
from rankwatch.detectors.straggler import RankTable, StragglerScores, evidence_width, score_ranks
from rankwatch.detectors.throughput import ThroughputDetector
from rankwatch.events import Event

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Episode kinds whose subject is a run: closed when their run ends.
_RUN_KINDS = ("straggler", "hang", "throughput_drop", "data_gap")
_BASIS_ALPHA = 0.05  # weight of one clean evaluation in a rank's clustering basis


class StragglerRule(Protocol):
    """Another way to turn per-window scores into verdicts (the benchmarks' baselines)."""

    persist_windows: int  # consecutive flagged evaluations before an episode fires

    def decide(self, scores: StragglerScores, cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
        """(flagged, sustained) per rank of ``scores``."""
        ...


class DetectorCore:
    def __init__(self, config: DetectorConfig | None = None, straggler_rule: StragglerRule | None = None) -> None:
        self.config = cfg = config or DetectorConfig()
        miss = cfg.missing_resolve_windows
        self.straggler_rule = straggler_rule
        self.trackers = {
            # the sequential test already waited for enough evidence: one alarm opens an episode
            "straggler": EpisodeTracker("straggler", straggler_rule.persist_windows if straggler_rule else 1,
                                        cfg.resolve_windows, miss),
            "gpu_fault": EpisodeTracker("gpu_fault", 1, cfg.gpu_resolve_windows, miss),
            "network": EpisodeTracker("network", cfg.network_persist_windows, cfg.network_resolve_windows, miss),
            "hang": EpisodeTracker("hang", 1, 1, miss),
            "throughput_drop": EpisodeTracker("throughput_drop", 1, 2, miss),
            "data_gap": EpisodeTracker("data_gap", 1, 1, miss),
        }
        self.gpu = GpuHealth(cfg)
        self.net = NetworkHealth(cfg)
        self.hang = HangDetector(cfg)
        self.throughput = ThroughputDetector(cfg)
        self.gaps = GapDetector(cfg)
        # What the last evaluation saw out of what it knows (for logs, /metrics, heartbeats).
        self.coverage: Coverage | None = None
        self.ended_since: dict[str, float] = {}  # run -> data time it was first seen ended
        self.run_first_seen: dict[str, float] = {}
        self.last_time: float | None = None
        self.scores: dict[tuple[str, int], float] = {}
        # per-rank EWMA of compute time for runs without layout labels (clustering basis)
        self.compute_basis = RankTable()
        self.basis_count = RankTable()
        # per-rank CUSUM charts of the sequential test (compute charts, then dataloader charts)
        self.evidence = RankTable(width=evidence_width(cfg))
        self.flagged: set[tuple[str, int]] = set()
        self._layout_warned: set[str] = set()

    def evaluate(self, snapshot: Snapshot) -> list[Event]:
        cfg = self.config
        snap = snapshot
        t = snap.time
        # seconds of new data since the last evaluation weigh this window's evidence
        step_s = t - self.last_time if self.last_time is not None and t > self.last_time else None
        self.last_time = t
        events: list[Event] = []
        rank_data = not _rank_queries_failed(snap)
        tallies = tally_runs(snap.ranks)  # one pass over the ranks for the coverage and the hang rule
        cov = self.coverage = measure(snap, tallies)
        closing = self._close_ended_runs(t, cov) if rank_data else {}

        gpu_findings, gpu_diag = self.gpu.evaluate(snap, self.trackers["gpu_fault"].state.keys())
        net_findings, net_diag = self.net.evaluate(snap)
        _attach_runs(snap, gpu_findings + net_findings)
        events += self.trackers["gpu_fault"].update(t, gpu_findings)
        events += self.trackers["network"].update(t, net_findings)

        seen = self.run_first_seen
        for run, a in tallies.items():
            if a["adv"]:  # an answering rank completed steps in the window
                seen.setdefault(run, t)
        warm = {run for run, first in seen.items() if t - first >= cfg.warmup_s}
        # the probe queries failed this cycle: their quantities are missing, never zero
        if not rank_data:
            rank_ranks = []
        elif all(run in warm for run in tallies):
            rank_ranks = snap.ranks
        else:
            rank_ranks = [r for r in snap.ranks if r.run in warm]
        sc = score_ranks(rank_ranks, cfg, snap.window_s, self.compute_basis, self.evidence, step_s)
        cols = sc.cols
        if self.straggler_rule is not None:
            sc.flagged, sc.sustained = self.straggler_rule.decide(sc, cfg)
        if (cols.pp < 0).any():
            # peer groups of a run without layout labels come from clustering each rank's
            # long-run compute time: no verdicts until that basis has settled
            count = self.basis_count.get(cols.run_names, cols.run_ids, cols.rank, 0.0)
            young = (cols.pp < 0) & (count < cfg.cluster_learn_windows)
            sc.flagged = sc.flagged & ~young
            sc.sustained = sc.sustained & ~young
            sc.evidence[young] = 0.0  # peer groups still settling: no evidence yet
            self._warn_layout(sc, young)
        self.evidence.put(cols.run_names, cols.run_ids, cols.rank, sc.evidence)
        runs_of = [cols.run_names[i] for i in cols.run_ids.tolist()]
        keys = list(zip(runs_of, cols.rank.tolist(), strict=True))
        step_by_run: dict[str, list[float]] = defaultdict(list)
        for o in sc.obs:
            if o.step_seconds:
                step_by_run[o.run].append(o.step_seconds)
        run_step = {run: float(np.median(v)) for run, v in step_by_run.items()}
        self.scores = dict(zip(keys, sc.score.tolist(), strict=True))
        tracker = self.trackers["straggler"]
        open_keys = tracker.open_keys
        # Findings only for ranks that are flagged or have tracker state: a clean rank without
        # state has nothing to update (keeps a 100 000-rank cycle fast).
        findings = []
        idx = set(np.flatnonzero(sc.flagged).tolist())
        if tracker.state:
            idx |= {j for j, k in enumerate(keys) if f"{k[0]}:{k[1]}" in tracker.state}
        for i in sorted(idx):
            if not sc.quorum[i]:
                continue  # too few peers answer: no verdict, an open episode counts it as missing
            o = sc.obs[i]
            key = f"{o.run}:{o.rank}"
            flagged = bool(sc.sustained[i]) if key in open_keys else bool(sc.flagged[i])
            s = float(sc.score[i])
            summary, ev, sev = straggler_finding_text(sc, i, gpu_diag, net_diag, run_step.get(o.run))
            findings.append(Finding(
                key=key, flagged=flagged, subject={"run": o.run, "rank": o.rank, "node": o.node, "gpu": o.gpu},
                score=s, summary=summary, severity=sev, evidence=ev,
                resolved_summary=f"Rank {o.rank} of run {o.run} is no longer a straggler (score {s:.1f}).",
            ))
        strag_events = self.trackers["straggler"].update(t, findings + closing.get("straggler", []))
        for e in strag_events:
            if e.state == "resolved" and e.run is not None and e.rank is not None:
                # a new episode of the same rank needs new evidence
                self.evidence.forget(e.run, e.rank)
        events += strag_events
        self._update_basis(sc)
        self.flagged = {(st["subject"]["run"], st["subject"]["rank"])
                        for st in self.trackers["straggler"].open_episodes().values()}

        if rank_data:
            events += self.trackers["hang"].update(t, self.hang.evaluate(snap, tallies) + closing.get("hang", []))
            open_tp = {st["subject"]["run"] for st in self.trackers["throughput_drop"].open_episodes().values()}
            causes = self._top_causes(snap)
            events += self.trackers["throughput_drop"].update(
                t, self.throughput.evaluate(snap, warm, open_tp, causes) + closing.get("throughput_drop", []))
        gap = self.trackers["data_gap"]
        hung = {st["subject"].get("run") for st in self.trackers["hang"].open_episodes().values()}
        closed = {f.key for f in closing.get("data_gap", [])}
        gap_findings = [f for f in self.gaps.evaluate(snap, cov, gap.open_keys - closed, hung) if f.key not in closed]
        events += gap.update(t, gap_findings + closing.get("data_gap", []))
        order = {"gpu_fault": 0, "network": 1, "hang": 2, "straggler": 3, "throughput_drop": 4, "data_gap": 5}
        events.sort(key=lambda e: (e.state != "resolved", order.get(e.kind, 9)))
        return events

    def _close_ended_runs(self, t: float, cov: Coverage) -> dict[str, list[Finding]]:
        """Clean findings, resolving at once, for the open episodes of runs that ended: none of
        their ranks answers (listed ended by the coverage) or none is known at all, at two
        evaluations in a row (one scrape lost everywhere is not the end of a run)."""
        live = set(cov.runs)
        ended_now = set(cov.ended_runs)
        for kind in _RUN_KINDS:
            for st in self.trackers[kind].open_episodes().values():
                run = st["subject"].get("run")
                if run is not None and run not in live:
                    ended_now.add(run)
        for run in list(self.ended_since):
            if run not in ended_now:
                del self.ended_since[run]
        closing: dict[str, list[Finding]] = defaultdict(list)
        for run in ended_now:
            since = self.ended_since.setdefault(run, t)
            if since >= t:
                continue
            for kind in _RUN_KINDS:
                for key, st in self.trackers[kind].open_episodes().items():
                    if st["subject"].get("run") == run:
                        closing[kind].append(Finding(
                            key=key, flagged=False, subject=st["subject"], score=0.0, summary="",
                            resolved_summary=f"Run {run} ended: its {kind} episode is closed.",
                            evidence={"reason": "run ended", "ended_since": since}, resolve=1))
        # forget what the rules keep per run once it has gone, so state stays bounded
        for run in list(self.run_first_seen):
            if run not in live and run not in ended_now:
                del self.run_first_seen[run]
        return closing

    def _warn_layout(self, sc: StragglerScores, young: np.ndarray) -> None:
        """Once per run: say that a rank slow from its first step cannot be found in a run
        without layout labels whose stages do not follow rank order, and how to fix that."""
        for run in sc.layout_unordered:
            if run in self._layout_warned:
                continue
            r = sc.cols.run_names.index(run)
            if young[sc.cols.run_ids == r].any():
                continue  # its ranks' long-run times have not settled yet
            self._layout_warned.add(run)
            log.warning(
                "run %s: its probes carry no layout labels (pp, tp, dp) and its ranks' compute times do not form "
                "contiguous pipeline stages in rank order, so a rank that is slow from its first step cannot be told "
                "from a heavier stage and will not be reported. Give the probes the layout: RankIdentity(pp=..., "
                "tp=..., dp=...), or set RANKWATCH_TP_SIZE, RANKWATCH_PP_SIZE (and RANKWATCH_CP_SIZE) in the "
                "training job's environment (docs/probe.md, Identity).", run)

    def _update_basis(self, sc: Any) -> None:
        cols = sc.cols
        if not (cols.pp < 0).any():
            return
        open_ranks = np.zeros(len(sc.obs), bool)
        open_keys = self.trackers["straggler"].open_keys
        if open_keys:
            open_ranks = np.array([f"{o.run}:{o.rank}" in open_keys for o in sc.obs], bool)
        # a slow rank must not drag its own basis towards another stage
        mask = (cols.pp < 0) & ~sc.flagged & ~open_ranks
        old = self.compute_basis.get(cols.run_names, cols.run_ids, cols.rank, np.nan)
        count = self.basis_count.get(cols.run_names, cols.run_ids, cols.rank, 0.0) + 1
        # running mean first (noise averages out fast), then an EWMA that follows drift
        alpha = np.maximum(1.0 / count, _BASIS_ALPHA)
        new = np.where(np.isnan(old), sc.compute, (1 - alpha) * old + alpha * sc.compute)
        self.compute_basis.put(cols.run_names, cols.run_ids, cols.rank, new, mask)
        self.basis_count.put(cols.run_names, cols.run_ids, cols.rank, count, mask)

    def _top_causes(self, snap: Snapshot) -> dict[str, dict[str, Any]]:
        """For each run, the open episode most likely behind a slowdown: its worst straggler,
        else a GPU or network problem on one of its nodes."""
        nodes_by_run: dict[str, set[str]] = defaultdict(set)
        if self.trackers["gpu_fault"].open_keys or self.trackers["network"].open_keys:
            for r in snap.ranks:
                nodes_by_run[r.run].add(r.node)
        causes: dict[str, dict[str, Any]] = {}
        strag = self.trackers["straggler"].open_episodes().values()
        for st in sorted(strag, key=lambda s: -float(s.get("last_score", 0))):
            run = st["subject"]["run"]
            causes.setdefault(run, {"kind": "straggler", "episode": st["episode"], "rank": st["subject"]["rank"],
                                    "node": st["subject"]["node"], "summary": st["summary"]})
        for kind in ("gpu_fault", "network"):
            for st in self.trackers[kind].open_episodes().values():
                node = st["subject"].get("node")
                for run, nodes in nodes_by_run.items():
                    if node in nodes:
                        causes.setdefault(run, {"kind": kind, "episode": st["episode"], "node": node,
                                                "gpu": st["subject"].get("gpu"), "summary": st["summary"]})
        return causes

    def export_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "last_time": self.last_time,
            "run_first_seen": self.run_first_seen,
            "trackers": {k: tr.export() for k, tr in self.trackers.items()},
            "gpu": self.gpu.export(), "network": self.net.export(), "hang": self.hang.export(),
            "throughput": self.throughput.export(),
            "gaps": self.gaps.export(), "ended_since": self.ended_since,
            "evidence": self.evidence.export(), "evidence_width": self.evidence.width,
            "compute_basis": self.compute_basis.export(),
            "basis_count": self.basis_count.export(),
        }

    def import_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"detector state version {state.get('version')!r} is not {STATE_VERSION}")
        self.last_time = state.get("last_time")
        self.run_first_seen = dict(state.get("run_first_seen", {}))
        for k, tr in self.trackers.items():
            tr.load(state.get("trackers", {}).get(k, {}))
        self.gpu.load(state.get("gpu", {}))
        self.net.load(state.get("network", {}))
        self.hang.load(state.get("hang", {}))
        self.throughput.load(state.get("throughput", {}))
        self.gaps.load(state.get("gaps", {}))
        self.ended_since = {str(k): float(v) for k, v in state.get("ended_since", {}).items()}
        # charts of another configuration (a different number of them) start afresh
        if state.get("evidence_width") == self.evidence.width:
            self.evidence.load(state.get("evidence", {}))
        self.compute_basis.load(state.get("compute_basis", {}))
        self.basis_count.load(state.get("basis_count", {}))
        self.flagged = {(st["subject"]["run"], st["subject"]["rank"])
                        for st in self.trackers["straggler"].open_episodes().values()}


def _attach_runs(snap: Snapshot, findings: list[Finding]) -> None:
    """Name the run (and for a GPU, the rank) a hardware finding affects, from the ranks the
    snapshot places on its node/GPU. Only the subject and evidence change, never the finding's
    key, so episode ids stay what they were. Several runs on one node: the one with most ranks
    there (then by name) is the event's run; all are listed in the evidence."""
    todo = [f for f in findings if f.subject.get("node") is not None and f.subject.get("run") is None]
    if not todo:
        return
    nodes = {f.subject["node"] for f in todo}
    on_node: dict[str, list[RankObs]] = defaultdict(list)
    for r in snap.ranks:
        if r.node in nodes:
            on_node[r.node].append(r)
    for node, ranks in on_node.items():
        # ranks whose endpoints answer for them: a run that ended there is not the one hurt
        answering = [r for r in ranks if r.up]
        if answering:
            on_node[node] = answering
    uuids = {(g.node, g.gpu): g.uuid for g in snap.gpus if g.uuid and g.node in nodes}
    for f in todo:
        node, gpu = f.subject["node"], f.subject.get("gpu")
        ranks = on_node.get(node, [])
        if not ranks:
            continue
        on_gpu = False
        if gpu is not None:
            uuid = uuids.get((node, gpu))
            users = [r for r in ranks if r.gpu == gpu or (uuid is not None and r.gpu_uuid == uuid)]
            if users:
                ranks, on_gpu = users, True
        by_run: dict[str, list[int]] = defaultdict(list)
        for r in ranks:
            by_run[r.run].append(r.rank)
        run = min(by_run, key=lambda name: (-len(by_run[name]), name))
        f.subject = {**f.subject, "run": run}
        if on_gpu:
            f.subject["rank"] = min(by_run[run])
        where = "on_gpu" if on_gpu else "on_node"
        f.evidence = {**f.evidence, f"runs_{where}": {name: sorted(rk) for name, rk in sorted(by_run.items())}}


def _rank_queries_failed(snap: Snapshot) -> bool:
    return any(e.startswith("rank") or "rankwatch_" in e for e in snap.errors)
