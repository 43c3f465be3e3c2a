"""Never blind in silence, never a verdict about a run that ended: coverage is counted per source,
holes that last raise one data_gap (and resolve), the log says what changed once, a run whose
ranks stopped answering (or whose ports serve another run) gets no hang and its open episodes
close, and a hang names the ranks that stopped first, with node and GPU."""

from __future__ import annotations

import logging

import pytest

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.coverage import measure
from rankwatch.detectors.coverage_log import CoverageLog
from rankwatch.detectors.model import GpuObs, NicObs, NodeObs, RankObs, Snapshot

T0 = 1_750_000_000.0
STEP = 0.5  # seconds per step


def rank(k: int, t: float, *, run: str = "r", up: bool = True, data: bool = True, stopped_at: float | None = None,
         world: int = 8, slow: float = 0.0) -> RankObs:
    """Rank ``k`` of a job stepping every STEP seconds since T0 (until ``stopped_at``); two nodes of
    four GPUs; ``data=False``: its counters have no samples in the window."""
    end = t if stopped_at is None else min(t, stopped_at)
    step = float(int((end - T0) / STEP))
    r = RankObs(run=run, rank=k, node=f"node-{k // 4}", local_rank=k % 4, world_size=world, gpu=str(k % 4),
                pp=0, tp=0, dp=k, up=up, step=step, last_step_time=T0 + step * STEP)
    if data:
        moving = stopped_at is None or t < stopped_at
        r.steps_rate = 1 / STEP if moving else 0.0
        if moving:
            r.step_seconds = STEP
            r.sections = {"forward": 0.15 * (1 + slow), "backward": 0.25 * (1 + slow), "comm": 0.1 - 0.4 * slow,
                          "dataloader": 0.01}
    return r


def hardware(t: float, silent: set[str] = frozenset()) -> dict:
    nodes = [NodeObs(node=f"node-{n}", exporter_up=f"node-{n}" not in silent, gpus_expected=4.0,
                     gpus_answering=None if f"node-{n}" in silent else 4.0) for n in range(2)]
    gpus = [GpuObs(node=f"node-{n}", gpu=str(g), present=f"node-{n}" not in silent, sm_clock=1980.0)
            for n in range(2) for g in range(4)]
    nics = [NicObs(node=f"node-{n}", device=f"rdmap{d}", increase={"retrans_pkts": 0.0})
            for n in range(2) for d in range(2) if f"node-{n}" not in silent]
    seen = [(f"node-{n}", f"rdmap{d}", "1") for n in range(2) for d in range(2)]
    return {"nodes": nodes, "gpus": gpus, "nics": nics, "nics_seen": seen}


def snap(t: float, ranks: list[RankObs], **kw) -> Snapshot:
    hw = hardware(t, kw.pop("silent", set()))
    hw.update(kw)
    return Snapshot(time=t, window_s=15.0, ranks=ranks, **hw)


def test_measure_counts_each_source_and_sets_ended_runs_apart() -> None:
    t = T0 + 300
    ranks = [rank(k, t) for k in range(6)] + [rank(6, t, data=False)]  # rank 7 never reported
    ranks += [rank(k, t, run="old", up=False, data=False, world=2) for k in range(2)]
    cov = measure(snap(t, ranks, silent={"node-1"}))
    c = cov.runs["r"]
    assert (c.expected, c.known, c.with_data, c.never_seen) == (8, 7, 6, 1)
    assert [r.rank for r in c.missing] == [6] and c.layout_labels and c.nodes == ["node-0", "node-1"]
    assert (c.gpus, c.nics) == (8, 4)
    assert cov.ended_runs == ["old"] and "old" not in cov.runs  # the old run is not a gap
    assert cov.known == {"ranks": 8, "gpus": 8, "nics": 4, "nodes": 2}
    assert cov.with_data == {"ranks": 6, "gpus": 4, "nics": 2, "nodes": 1}
    assert cov.silent_nodes == ["node-1"] and not cov.blind
    line = cov.describe()
    assert line.startswith("run r 6/8 ranks (no data: rank 6 on node-1 GPU 2, 1 never seen); GPUs 4/8; NICs 2/4;")
    assert "silent: node-1" in line


def test_nothing_with_data_is_blind() -> None:
    t = T0 + 300
    cov = measure(snap(t, [rank(k, t, data=False) for k in range(8)]))
    assert cov.blind and cov.runs["r"].with_data == 0


def run_core(core: DetectorCore, times, make) -> list:
    events = []
    for t in times:
        events += core.evaluate(make(t))
    return events


def test_ranks_without_data_raise_one_data_gap_that_names_them_and_resolves(caplog) -> None:
    core = DetectorCore(DetectorConfig(gap_min_s=60.0))
    lost_from, back_at = T0 + 150, T0 + 300

    def make(t: float) -> Snapshot:
        gone = lost_from <= t < back_at
        return snap(t, [rank(k, t, data=not (gone and k in (5, 6))) for k in range(8)])

    caplog.set_level(logging.INFO, logger="rankwatch.detector")
    log = CoverageLog()
    events = []
    for t in [T0 + 15 * k for k in range(1, 31)]:
        events += core.evaluate(make(t))
        log.observe(core.coverage)
    gaps = [e for e in events if e.kind == "data_gap"]
    assert [(e.state, e.time - T0) for e in gaps] == [("firing", 210.0), ("resolved", 300.0)]
    fire = gaps[0]
    assert fire.summary.startswith("Run r: 2 of 8 ranks have no data (rank 5 on node-1 GPU 1, rank 6 on node-1 GPU 2)")
    assert (fire.run, fire.rank, fire.node, fire.gpu) == ("r", 5, "node-1", "1")
    assert [x["rank"] for x in fire.evidence["ranks"]] == [5, 6] and fire.evidence["gap_s"] == 60.0
    assert gaps[1].summary == "Run r: every rank reports data again."
    assert not [e for e in events if e.kind == "hang"]
    # the log: one line per change (lost, back), not one per cycle
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("coverage:")]
    assert lines == ["coverage: run r 6/8 ranks (no data: rank 5 on node-1 GPU 1, rank 6 on node-1 GPU 2); "
                     "GPUs 8/8; NICs 4/4; node exporters 2/2",
                     "coverage: run r 8/8 ranks; GPUs 8/8; NICs 4/4; node exporters 2/2"]
    assert sum("watching run r: 8 ranks (layout labels: yes), 2 nodes, 8 GPUs, 4 NICs" in r.getMessage()
               for r in caplog.records) == 1


def test_a_short_hole_raises_nothing() -> None:
    core = DetectorCore(DetectorConfig(gap_min_s=60.0))
    events = run_core(core, [T0 + 15 * k for k in range(1, 20)],
                      lambda t: snap(t, [rank(k, t, data=not (T0 + 150 <= t < T0 + 195 and k == 3)) for k in range(8)]))
    assert events == []


def test_a_silent_node_exporter_under_a_live_run_is_a_gap_and_failing_queries_are_one_too() -> None:
    core = DetectorCore(DetectorConfig(gap_min_s=30.0))
    events = run_core(core, [T0 + 15 * k for k in range(1, 12)],
                      lambda t: snap(t, [rank(k, t) for k in range(8)], silent={"node-1"} if t >= T0 + 60 else set()))
    gap = [e for e in events if e.kind == "data_gap"]
    assert [(e.state, e.node) for e in gap] == [("firing", "node-1")]
    assert "its node exporter sends no data" in gap[0].summary and gap[0].run == "r"
    # a silent GPU on a silent node is not a lost GPU: absence is judged where its node reports
    assert not [e for e in events if e.kind == "gpu_fault"]

    core = DetectorCore(DetectorConfig(gap_min_s=30.0))
    errs = ["rank_steps_rate: connection refused", "gpu_seen: connection refused"]
    events = run_core(core, [T0 + 15 * k for k in range(1, 8)],
                      lambda t: snap(t, [], errors=errs, nodes=[], gpus=[], nics=[], nics_seen=[]))
    gap = [e for e in events if e.kind == "data_gap"]
    assert len(gap) == 1 and gap[0].summary.startswith("The detector's queries fail (2: gpu_seen, rank_steps_rate)")
    assert gap[0].evidence["first_error"] == "rank_steps_rate: connection refused"


def test_a_run_that_ended_never_hangs_and_its_episodes_close() -> None:
    """Run "a" has a straggler when its processes exit; run "b" starts on the same nodes and ports.
    Nothing is said about "a" after its end but the closing of its open episode."""
    core = DetectorCore(DetectorConfig(warmup_s=30.0, gap_min_s=30.0))
    end = T0 + 300

    def make(t: float) -> Snapshot:
        if t < end:
            return snap(t, [rank(k, t, run="a", slow=0.3 if k == 2 else 0.0) for k in range(8)])
        # a's series linger in the lookback: the same endpoints now serve b's ranks
        old = [rank(k, end, run="a", up=False, data=False) for k in range(8)]
        return snap(t, old + [rank(k, t, run="b") for k in range(8)])

    events = run_core(core, [T0 + 15 * k for k in range(1, 40)], make)
    about_a = [(e.kind, e.state, e.time - T0) for e in events if e.run == "a"]
    assert about_a[0][:2] == ("straggler", "firing")
    # after the end: only the closing of the open episode, at the second evaluation without it
    after = [x for x in about_a if x[2] >= end - T0]
    assert after == [("straggler", "resolved", end - T0 + 15)]
    closing = next(e for e in events if e.run == "a" and e.state == "resolved")
    assert closing.summary == "Run a ended: its straggler episode is closed." and closing.evidence["reason"] == "run ended"
    assert not [e for e in events if e.run == "b"]  # the new job: nothing to say
    assert "a" in core.coverage.ended_runs and set(core.coverage.runs) == {"b"}


def test_a_hang_names_the_rank_that_stopped_answering_first() -> None:
    """Rank 1 is stopped (SIGSTOP): its endpoint stops answering; the others block in the next
    collective, answering, at the same step."""
    core = DetectorCore(DetectorConfig())  # hang_min_s 60 s, gap_min_s 120 s
    stop = T0 + 200

    def make(t: float) -> Snapshot:
        if t < stop:
            return snap(t, [rank(k, t) for k in range(8)])
        return snap(t, [rank(k, t, stopped_at=stop, up=k != 1, data=k != 1) for k in range(8)])

    events = run_core(core, [T0 + 15 * k for k in range(1, 30)], make)
    hang = [e for e in events if e.kind == "hang"]
    assert [e.state for e in hang] == ["firing"] and hang[0].severity == "critical"
    h = hang[0]
    assert h.summary.startswith("Run r is hung: rank 1 (node-0, GPU 1) stopped answering; no step for ")
    stuck = h.evidence["stuck_ranks"]
    assert stuck[0] == {"rank": 1, "node": "node-0", "gpu": "1", "why": "stopped answering", "last_step": 400.0,
                        "last_step_time": stop}
    assert len(stuck) == 1 and h.evidence["ranks_not_answering"] == 1 and h.evidence["ranks_up"] == 7
    assert h.time - stop <= 60 + 15 + 15  # hang_min_s, the first evaluation past it, one window of slack
    # the hang already says rank 1 stopped answering: no second alert about its missing data
    assert not [e for e in events if e.kind == "data_gap"]


def test_a_hang_names_the_ranks_behind_when_every_endpoint_answers() -> None:
    core = DetectorCore(DetectorConfig())
    stop = T0 + 200

    def make(t: float) -> Snapshot:
        # rank 6 stopped two steps before the others (stuck in its own work; they wait for it)
        return snap(t, [rank(k, t, stopped_at=stop - (2 * STEP if k == 6 else 0) if t >= stop else None)
                        for k in range(8)])

    events = run_core(core, [T0 + 15 * k for k in range(1, 30)], make)
    h = next(e for e in events if e.kind == "hang")
    assert h.summary.startswith("Run r is hung: rank 6 (node-1, GPU 2) stopped before the others (which reached step 400)")
    assert [(s["rank"], s["why"], s["last_step"]) for s in h.evidence["stuck_ranks"]] == [(6, "behind", 398.0)]


@pytest.mark.parametrize("window", [15.0, 180.0])
def test_a_hang_is_seen_within_hang_min_s_whatever_the_window(window: float) -> None:
    """The step number, not a rate over the window, says whether the run advances: with 60 s
    scrapes (a 180 s window) a hang is not hidden for the window's length."""
    core = DetectorCore(DetectorConfig())
    stop = T0 + 400

    def make(t: float) -> Snapshot:
        s = snap(t, [rank(k, t, stopped_at=stop if t >= stop else None) for k in range(8)])
        s.window_s = window
        if window > 15 and t >= stop:
            for r in s.ranks:  # the window still holds steps from before the hang
                r.steps_rate = 0.5 * (1 - min(1.0, (t - stop) / window))
        return s

    events = run_core(core, [T0 + 15 * k for k in range(1, 50)], make)
    h = [e for e in events if e.kind == "hang"]
    assert h and h[0].time - stop <= 60 + 15
    assert h[0].summary.startswith("Run r is hung: all 8 ranks stopped at step 800; ")
