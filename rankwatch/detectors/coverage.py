"""What the detector sees out of what it knows: never blind in silence.

``measure(snapshot)`` counts, per source, the objects known (an identity series within the
lookback, or a ``world_size`` that says more ranks exist) and those with data in the window:
ranks per run, GPUs, EFA NICs, node exporters. A run none of whose ranks answers any more has
ended (its processes exited, or its ports now serve another run): it is not counted, and not
a gap.

``GapDetector`` turns a coverage hole that lasts ``gap_min_s`` of data time into ``data_gap``
findings: ranks of a live run without data, a node exporter gone silent under a live run, or
queries that keep failing. Pure: no I/O, no wall clock."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Any

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import RankObs, Snapshot

SOURCES = ("ranks", "gpus", "nics", "nodes")
_PP, _NODE = attrgetter("pp"), attrgetter("node")
_NAMED = 8  # ranks / nodes named in a sentence; the evidence lists up to _LISTED
_LISTED = 64


@dataclass
class RunCoverage:
    run: str
    expected: int  # world_size where the probes state it, else the ranks known
    known: int  # ranks with an identity series in the lookback
    with_data: int  # ranks whose counters have a rate in the window
    answering: int  # ranks whose endpoint answers for them
    missing: list[RankObs] = field(default_factory=list)  # known, without data (first _LISTED)
    # The run's ranks and the GPUs / NICs known per node: what the facts below are computed from,
    # on demand — they serve log lines and silent nodes, not every cycle of a 100 000-rank job.
    ranks: list[RankObs] = field(default_factory=list, repr=False, compare=False)
    hardware: tuple[dict[str, int], dict[str, int]] = field(default=({}, {}), repr=False, compare=False)

    @property
    def never_seen(self) -> int:
        return max(self.expected - self.known, 0)

    @cached_property
    def nodes(self) -> list[str]:
        return sorted(set(map(_NODE, self.ranks)))

    @cached_property
    def layout_labels(self) -> bool:
        """pp labels on every known rank."""
        return None not in map(_PP, self.ranks)

    @property
    def gpus(self) -> int:
        """GPUs known on its nodes."""
        return sum(self.hardware[0].get(node, 0) for node in self.nodes)

    @property
    def nics(self) -> int:
        """NICs known on its nodes."""
        return sum(self.hardware[1].get(node, 0) for node in self.nodes)


@dataclass
class Coverage:
    """One evaluation's coverage; ``known``/``with_data`` per source in ``SOURCES``."""

    time: float
    known: dict[str, int]
    with_data: dict[str, int]
    runs: dict[str, RunCoverage]
    ended_runs: list[str]
    silent_nodes: list[str]  # node exporters known but without data in the window
    failed_queries: list[str]
    # node names some node exporter or GPU series reports (None: the node queries failed)
    reporting_nodes: set[str] | None = field(default=None, repr=False)

    @cached_property
    def nodes_without_exporter(self) -> list[str]:
        """Nodes of live runs that no node exporter reports at all: their GPUs and NICs are not
        watched. Computed when asked (log lines), not every cycle."""
        if not self.reporting_nodes:
            return []
        return sorted({node for c in self.runs.values() for node in c.nodes} - self.reporting_nodes)

    @property
    def blind(self) -> bool:
        """Something is known but nothing has data (or every query failed)."""
        return any(self.known[s] and not self.with_data[s] for s in SOURCES)

    def key(self) -> tuple[Any, ...]:
        """What a change of coverage means: a count moved, a run came or went. (Failing queries
        are the service's own warning, every cycle they fail, and a data_gap when they last.)"""
        return (tuple((s, self.known[s], self.with_data[s]) for s in SOURCES),
                tuple(sorted((r, c.expected, c.with_data) for r, c in self.runs.items())))

    def describe(self) -> str:
        """One line: ``run r 255/256 ranks (no data: rank 17 on node-02 GPU 1); GPUs 256/256; ...``."""
        parts = []
        for run, c in sorted(self.runs.items()):
            p = f"run {run} {c.with_data}/{c.expected} ranks"
            gaps = [_rank_name(r) for r in c.missing[:_NAMED]]
            if c.never_seen:
                gaps.append(f"{c.never_seen} never seen")
            if gaps:
                p += f" (no data: {', '.join(gaps)}{', …' if c.known - c.with_data > _NAMED else ''})"
            parts.append(p)
        if not self.runs:
            parts.append("no live run")
        parts += [f"GPUs {self.with_data['gpus']}/{self.known['gpus']}", f"NICs {self.with_data['nics']}/{self.known['nics']}",
                  f"node exporters {self.with_data['nodes']}/{self.known['nodes']}"]
        if self.silent_nodes:
            parts.append(f"silent: {_names(self.silent_nodes)}")
        if self.nodes_without_exporter:
            parts.append(f"no node exporter on {_names(self.nodes_without_exporter)}")
        if self.failed_queries:
            parts.append(f"{len(self.failed_queries)} queries failing")
        return "; ".join(parts)


def _names(items: list[str]) -> str:
    return ", ".join(items[:_NAMED]) + (f" and {len(items) - _NAMED} more" if len(items) > _NAMED else "")


def _rank_name(r: RankObs) -> str:
    gpu = f" GPU {r.gpu}" if r.gpu is not None else ""
    return f"rank {r.rank} on {r.node}{gpu}"


def tally_runs(ranks: list[RankObs]) -> dict[str, dict[str, Any]]:
    """One pass over the ranks, per run: what the coverage and the hang rule need (the one
    per-rank Python loop of both; at 100 000 ranks a second pass would cost 20 ms a cycle).

    Keys: ``all`` (its ranks), ``answering`` / ``down`` (endpoint answers for the rank or not),
    ``missing`` (no rate in the window, first _LISTED), ``n_missing``, ``world`` (largest
    world_size), and over the answering ranks ``step`` (highest step number), ``last`` (latest
    last-step time), ``rates`` (any has a rate), ``adv`` (any advanced), ``times`` (step seconds
    of those that advanced)."""
    acc: dict[str, dict[str, Any]] = {}
    for r in ranks:
        a = acc.get(r.run)
        if a is None:
            a = acc[r.run] = {"all": [], "answering": [], "down": [], "missing": [], "n_missing": 0, "world": 0,
                              "step": None, "last": None, "rates": False, "adv": False, "times": []}
        a["all"].append(r)
        ws = r.world_size
        if ws and ws > a["world"]:
            a["world"] = ws
        rate = r.steps_rate
        if rate is None:
            a["n_missing"] += 1
            if len(a["missing"]) < _LISTED:
                a["missing"].append(r)
        if not r.up:
            a["down"].append(r)
            continue
        a["answering"].append(r)
        step, last = r.step, r.last_step_time
        if step is not None and (a["step"] is None or step > a["step"]):
            a["step"] = step
        if last is not None and (a["last"] is None or last > a["last"]):
            a["last"] = last
        if rate is not None:
            a["rates"] = True
            if rate > 0:
                a["adv"] = True
                if r.step_seconds:
                    a["times"].append(r.step_seconds)
    return acc


def measure(snap: Snapshot, tallies: dict[str, dict[str, Any]] | None = None) -> Coverage:
    """Coverage of one snapshot (``tallies``: ``tally_runs(snap.ranks)``, if already made)."""
    tallies = tally_runs(snap.ranks) if tallies is None else tallies
    runs: dict[str, RunCoverage] = {}
    ended = []
    for run in sorted(tallies):
        a = tallies[run]
        if not a["answering"]:
            ended.append(run)
            continue
        n = len(a["all"])
        runs[run] = RunCoverage(run, max(a["world"], n), n, n - a["n_missing"], len(a["answering"]), a["missing"],
                                a["all"])
    gpu_nodes: dict[str, int] = defaultdict(int)
    gpus_present = 0
    for g in snap.gpus:
        gpu_nodes[g.node] += 1
        gpus_present += g.present
    expected_gpus = {n.node: int(n.gpus_expected) for n in snap.nodes if n.gpus_expected}
    gpus_on = {node: max(gpu_nodes.get(node, 0), expected_gpus.get(node, 0)) for node in set(gpu_nodes) | set(expected_gpus)}
    nics = set(snap.nics_seen) | {(n.node, n.device, n.port) for n in snap.nics}
    nics_on: dict[str, int] = defaultdict(int)
    for node, _, _ in nics:
        nics_on[node] += 1
    for c in runs.values():
        c.hardware = (gpus_on, nics_on)
    silent = sorted(n.node for n in snap.nodes if not n.exporter_up)
    return Coverage(
        time=snap.time,
        known={"ranks": sum(c.expected for c in runs.values()), "gpus": sum(gpus_on.values()), "nics": len(nics),
               "nodes": len(snap.nodes)},
        with_data={"ranks": sum(c.with_data for c in runs.values()), "gpus": gpus_present, "nics": len(snap.nics),
                   "nodes": sum(n.exporter_up for n in snap.nodes)},
        runs=runs, ended_runs=ended, silent_nodes=silent, failed_queries=sorted({e.split(":", 1)[0] for e in snap.errors}),
        reporting_nodes=({n.node for n in snap.nodes} | set(gpu_nodes)) if snap.nodes or snap.gpus else None)


class GapDetector:
    """``data_gap`` findings for holes in the coverage that last ``cfg.gap_min_s`` (data time)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.since: dict[str, float] = {}  # finding key -> data time the hole was first seen

    def evaluate(self, snap: Snapshot, cov: Coverage, open_keys: Collection[str],
                 hung_runs: Collection[str] = ()) -> list[Finding]:
        """``open_keys``: the tracker's open data_gap episodes; ``hung_runs``: runs with an open
        hang, which names its ranks that stopped answering itself (no second alert for them)."""
        t = snap.time
        holes: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {}
        for run, c in cov.runs.items():
            if c.with_data >= c.expected:
                continue
            n_missing = c.expected - c.with_data
            named = [_rank_name(r) for r in c.missing[:_NAMED]]
            if c.never_seen:
                named.append(f"{c.never_seen} never seen")
            holes[f"gap:run:{run}"] = (
                {"run": run, "rank": c.missing[0].rank if c.missing else None,
                 "node": c.missing[0].node if c.missing else None, "gpu": c.missing[0].gpu if c.missing else None},
                f"Run {run}: {n_missing} of {c.expected} ranks have no data ({', '.join(named)}"
                f"{', …' if n_missing > len(named) else ''}); the detector cannot judge them.",
                {"problem": "ranks_without_data", "ranks_expected": c.expected, "ranks_with_data": c.with_data,
                 "ranks_never_seen": c.never_seen,
                 "ranks": [{"rank": r.rank, "node": r.node, "gpu": r.gpu, "answering": r.up} for r in c.missing]})
        rank_nodes: dict[str, list[str]] = defaultdict(list)
        if cov.silent_nodes:  # the nodes of each run only when a node is silent (rare)
            silent = set(cov.silent_nodes)
            for run, c in cov.runs.items():
                for node in silent.intersection(c.nodes):
                    rank_nodes[node].append(run)
        for node in cov.silent_nodes:
            if node not in rank_nodes:
                continue  # no live run there: RankwatchNodeExporterDown's business
            runs = sorted(rank_nodes[node])
            holes[f"gap:node:{node}"] = (
                {"node": node, "run": runs[0]},
                f"Node {node}: its node exporter sends no data, so GPU and EFA faults there cannot be seen "
                f"(it hosts ranks of run {', '.join(runs)}).",
                {"problem": "node_exporter_silent", "runs": runs})
        if cov.failed_queries:
            holes["gap:queries"] = (
                {},
                f"The detector's queries fail ({len(cov.failed_queries)}: {', '.join(cov.failed_queries[:_NAMED])}): "
                f"what they measure is not judged. First error: {snap.errors[0][:300]}",
                {"problem": "queries_failing", "queries": cov.failed_queries, "first_error": snap.errors[0][:500]})
        findings = []
        for key in list(self.since):
            if key not in holes:
                del self.since[key]
        for key, (subject, summary, evidence) in holes.items():
            first = self.since.setdefault(key, t)
            lasted = t - first
            flagged = lasted >= self.cfg.gap_min_s
            if subject.get("run") in hung_runs and key.startswith("gap:run:") and key not in open_keys:
                flagged = False  # the hang names the ranks that stopped answering
            if not flagged and key not in open_keys:
                continue
            findings.append(Finding(
                key=key, flagged=flagged, subject=subject, score=lasted, severity="warning", summary=summary,
                resolved_summary=_resolved(key), evidence={**evidence, "gap_s": round(lasted, 3)}, persist=1, resolve=1))
        # While the queries behind a kind of hole fail, its open episodes are neither confirmed
        # nor resolved (the tracker holds them as "no data").
        failed = cov.failed_queries
        held = [prefix for prefix, queries in (("gap:run:", ("rank",)), ("gap:node:", ("node", "gpu", "targets")))
                if any(q.startswith(queries) for q in failed)]
        for key in open_keys:
            if key not in holes and not any(key.startswith(h) for h in held):
                findings.append(Finding(key=key, flagged=False, subject={}, score=0.0, summary="",
                                        resolved_summary=_resolved(key), evidence={}, persist=1, resolve=1))
        return findings

    def export(self) -> dict[str, Any]:
        return {"since": self.since}

    def load(self, data: dict[str, Any]) -> None:
        self.since = {str(k): float(v) for k, v in data.get("since", {}).items()}


def _resolved(key: str) -> str:
    kind, _, what = key.partition(":")[2].partition(":")
    if kind == "run":
        return f"Run {what}: every rank reports data again."
    if kind == "node":
        return f"Node {what}: its node exporter reports again."
    return "The detector's queries answer again."
