"""Failing GPUs and degraded EFA links on simulated jobs: each is named with its evidence, ties
to the straggler it causes, and a node that went silent or fleet-wide noise raises nothing."""

from __future__ import annotations

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.model import GpuObs, NicObs, NodeObs, RankObs, Snapshot
from rankwatch.sim.scenario import Scenario, simulate, snapshot_at, snapshots
from rankwatch.sim.training import Fault, Layout

T0 = 1_750_000_000.0


def scenario(name: str, faults=(), duration: float = 480.0) -> Scenario:
    return Scenario(name, layout=Layout(tp=2, pp=2, dp=4), nodes=4, gpus_per_node=4, duration_s=duration,
                    seed=5, faults=list(faults))


def run(sc: Scenario, core: DetectorCore | None = None):
    core = core or DetectorCore()
    events = []
    for snap in snapshots(simulate(sc), core.config.interval_s, core.config.window_s):
        events += core.evaluate(snap)
    return events


def test_thermal_throttling_names_the_gpu_and_explains_the_straggler():
    events = run(scenario("thermal", [Fault("thermal", node=1, gpu=2, start_s=150, end_s=360, magnitude=0.2)]))
    firing = [e for e in events if e.state == "firing"]
    kinds = sorted((e.kind, e.node, e.gpu) for e in firing)
    assert kinds == [("gpu_fault", "node-01", "2"), ("straggler", "node-01", "2")]
    gpu = next(e for e in firing if e.kind == "gpu_fault")
    assert gpu.evidence["problem"] == "throttling" and "hw_thermal" in gpu.evidence["reasons"]
    assert gpu.evidence["clock_drop"]["peers"] > 0.1 and "throttled" in gpu.summary
    strag = next(e for e in firing if e.kind == "straggler")
    assert strag.rank == 6 and "throttled" in strag.summary
    assert strag.evidence["gpu_throttling"]["sm_clock_mhz"] < 1700
    # both resolve once the GPU cools down
    assert sorted(e.kind for e in events if e.state == "resolved") == ["gpu_fault", "straggler"]


def test_xid79_gpu_lost_and_job_hang():
    events = run(scenario("xid79", [Fault("xid79", node=2, gpu=1, start_s=200)]))
    firing = [(e.kind, e.severity, e.evidence.get("problem")) for e in events if e.state == "firing"]
    assert ("gpu_fault", "critical", "xid_critical") in firing
    assert ("gpu_fault", "critical", "gpu_lost") in firing  # series vanished, node still reports
    assert ("gpu_fault", "critical", "gpus_missing") not in firing  # the lost GPU is already named
    xid = next(e for e in events if e.evidence.get("problem") == "xid_critical")
    assert xid.evidence["xids"] == {"79": 1.0} and "fallen off the bus" in xid.summary
    hang = [e for e in events if e.kind == "hang"]
    assert len(hang) == 1 and hang[0].state == "firing" and hang[0].run == "sim-run"
    # no step for longer than hang_min_s while every endpoint still answers
    assert 200 + 60 <= hang[0].time - T0 <= 200 + 60 + 2 * 15
    assert hang[0].evidence["ranks_up"] == 16
    assert not [e for e in events if e.kind == "straggler"]


def test_double_bit_ecc_is_critical_and_resolves_after_the_gpu_reset():
    # end_s is the GPU reset that applies the pending row remap
    events = run(scenario("dbe", [Fault("dbe", node=0, gpu=3, start_s=150, end_s=240, magnitude=2)]))
    mem = [e for e in events if e.evidence.get("problem") == "memory"]
    assert [e.state for e in mem] == ["firing", "resolved"]
    assert mem[0].severity == "critical" and mem[0].evidence["dbe_increase"] == 2.0
    assert mem[0].evidence["remap_pending"] == 1.0
    # fires in the first window that holds the errors; resolves after gpu_resolve_windows clean ones
    resolve_s = DetectorConfig().gpu_resolve_windows * DetectorConfig().interval_s
    assert mem[0].time - T0 == 150
    assert 240 + resolve_s - 15 <= mem[1].time - T0 <= 240 + resolve_s + 15
    assert {e.kind for e in events} == {"gpu_fault"}


def _gpu(node: str, gpu: str, **kw) -> GpuObs:
    return GpuObs(node=node, gpu=gpu, model="H100", sm_clock=1980.0, health=0.0, last_xid=0.0, **kw)


def test_vanished_gpu_is_remembered_but_a_silent_node_is_not_a_gpu_fault():
    core = DetectorCore(DetectorConfig())
    full = [_gpu(n, str(g)) for n in ("a", "b") for g in range(4)]
    assert core.evaluate(Snapshot(time=T0, window_s=15, gpus=full)) == []
    # node b's exporter is gone entirely: not a GPU fault
    only_a = [g for g in full if g.node == "a"]
    assert core.evaluate(Snapshot(time=T0 + 15, window_s=15, gpus=only_a)) == []
    # one GPU of node a vanishes while the rest of node a reports
    missing = [g for g in only_a if g.gpu != "3"]
    ev = core.evaluate(Snapshot(time=T0 + 30, window_s=15, gpus=missing))
    assert [(e.kind, e.node, e.gpu, e.evidence["problem"]) for e in ev] == [("gpu_fault", "a", "3", "gpu_lost")]
    # memory survives a restart
    core2 = DetectorCore()
    core2.import_state(core.export_state())
    assert core2.evaluate(Snapshot(time=T0 + 45, window_s=15, gpus=missing)) == []  # still open, not repeated
    back = core2.evaluate(Snapshot(time=T0 + 60 + 15 * 4, window_s=15, gpus=only_a)) + \
        core2.evaluate(Snapshot(time=T0 + 60 + 15 * 5, window_s=15, gpus=only_a))
    # answering again: resolves after gpu_resolve_windows clean evaluations
    for k in range(6, 9):
        back += core2.evaluate(Snapshot(time=T0 + 60 + 15 * k, window_s=15, gpus=only_a))
    assert [(e.state, e.gpu) for e in back] == [("resolved", "3")]


def test_xid_classes_and_gpu_count():
    core = DetectorCore()
    # XID 13 comes from the application: nothing; 94 (contained ECC) is a warning, 95 critical
    gpus = [_gpu("a", "0", xid_increase={13: 1.0}), _gpu("a", "1", xid_increase={94: 2.0}),
            _gpu("a", "2", xid_increase={95: 1.0})]
    nodes = [NodeObs(node="a", gpus_expected=4, gpus_answering=3)]
    ev = core.evaluate(Snapshot(time=T0, window_s=15, gpus=gpus, nodes=nodes))
    got = sorted((e.gpu or "-", e.severity, e.evidence["problem"]) for e in ev)
    assert got == [("-", "critical", "gpus_missing"), ("1", "warning", "xid_other"), ("2", "critical", "xid_critical")]


def test_efa_degradation_names_node_and_device():
    events = run(scenario("efa", [Fault("efa", node=3, start_s=150, end_s=330, magnitude=0.3)]))
    net = [e for e in events if e.kind == "network"]
    assert [(e.state, e.node) for e in net] == [("firing", "node-03"), ("resolved", "node-03")]
    assert net[0].nic == "rdmap16s0/1" and net[0].evidence["counters"]["retrans_pkts"]["increase"] > 100
    assert not [e for e in events if e.kind == "straggler"]


def test_efa_errors_within_the_traffic_and_single_blips_raise_nothing():
    core = DetectorCore()
    events = []
    for k in range(10):
        # every node retransmits a little (2.5 per million packets); node c has one window over the
        # threshold (65 per million): one window is no episode (network_persist_windows)
        nics = [NicObs(node=n, device="rdmap0", increase={"retrans_pkts": 20.0 + (500.0 if (n, k) == ("c", 4) else 0),
                                                          "tx_pkts": 4e6, "rx_pkts": 4e6})
                for n in "abcd"]
        events += core.evaluate(Snapshot(time=T0 + 15 * k, window_s=15, nics=nics))
    assert events == []


def test_checkpoint_shorter_than_the_hang_floor_is_not_a_hang_and_hang_resolves():
    tel = simulate(scenario("hang", [Fault("hang", start_s=150, end_s=190), Fault("hang", start_s=300, end_s=420)]))
    core = DetectorCore()
    events = []
    for snap in snapshots(tel, 15, 15):
        events += core.evaluate(snap)
    hang = [(e.state, round(e.time - T0)) for e in events if e.kind == "hang"]
    assert len(hang) == 2 and hang[0][0] == "firing" and hang[1][0] == "resolved"
    assert 360 <= hang[0][1] <= 390 and 420 <= hang[1][1] <= 450


def test_hang_needs_answering_endpoints():
    tel = simulate(scenario("hang", [Fault("hang", start_s=150)]))
    core = DetectorCore()
    events = []
    for t in range(15, 480, 15):
        snap = snapshot_at(tel, float(t), 15.0)
        for r in snap.ranks:
            r.up = t < 150  # the whole job died: a crash, not a hang
        events += core.evaluate(snap)
    assert [e for e in events if e.kind == "hang"] == []


def test_job_wide_slowdown_is_a_throughput_drop_not_a_straggler():
    events = run(scenario("jobslow", [Fault("job_slowdown", start_s=200, end_s=400, magnitude=0.3)], duration=600))
    assert [(e.kind, e.state) for e in events] == [("throughput_drop", "firing"), ("throughput_drop", "resolved")]
    ev = events[0].evidence
    assert ev["shift"] > 0.15 and ev["p_value"] < 0.01 and ev["top_cause"] is None
    assert 200 <= events[0].time - T0 <= 200 + 6 * 15


def test_throughput_drop_names_the_straggler_as_top_cause():
    events = run(scenario("slow50", [Fault("slowdown", rank=4, start_s=150, magnitude=0.5)], duration=480))
    drop = [e for e in events if e.kind == "throughput_drop"]
    assert drop and drop[0].evidence["top_cause"]["kind"] == "straggler"
    assert drop[0].evidence["top_cause"]["rank"] == 4 and "top cause" in drop[0].summary


def test_run_loading_its_model_is_not_hung_until_it_has_stepped():
    core = DetectorCore()
    events = []
    # a 70B job loads for 10 minutes: endpoints answer, step number 0, no step finished yet
    for k in range(40):
        ranks = [RankObs(run="llama-70b", rank=r, node="n0", step=0.0, steps_rate=0.0) for r in range(4)]
        events += core.evaluate(Snapshot(time=T0 + 15 * k, window_s=15, ranks=ranks))
    assert events == []
    # it steps, then stops stepping while every endpoint answers: that is a hang
    for k in range(40, 50):
        last = T0 + 15 * 40
        ranks = [RankObs(run="llama-70b", rank=r, node="n0", step=5.0, last_step_time=last,
                         steps_rate=5 / 15 if k == 40 else 0.0, step_seconds=3.0 if k == 40 else None)
                 for r in range(4)]
        events += core.evaluate(Snapshot(time=T0 + 15 * k, window_s=15, ranks=ranks))
    assert [(e.kind, e.state, e.run) for e in events] == [("hang", "firing", "llama-70b")]
    assert 60 < events[0].time - (T0 + 15 * 40) <= 60 + 15


def test_hardware_events_name_the_run_and_rank_on_the_node_and_keep_their_ids():
    import json

    def snap(k: int, dbe: float) -> Snapshot:
        # node a: run "big" on GPUs 0-2, run "alpha" on GPU 3 (found by UUID only); node b: "big"
        ranks = [RankObs(run="big", rank=r, node="a", gpu=str(r)) for r in range(3)]
        ranks += [RankObs(run="alpha", rank=0, node="a", gpu_uuid="GPU-a3")]
        ranks += [RankObs(run="big", rank=r, node="b", gpu=str(r - 3)) for r in range(3, 7)]
        gpus = [GpuObs(node="a", gpu="3", uuid="GPU-a3", dbe_increase=dbe), GpuObs(node="a", gpu="1")]
        nics = [NicObs(node=n, device="rdmap0", increase={"retrans_pkts": 500.0 if n == "a" and 2 <= k < 4 else 0.0,
                                                          "tx_pkts": 1e6, "rx_pkts": 1e6})
                for n in "abcd"]
        return Snapshot(time=T0 + 15 * k, window_s=15, ranks=ranks, gpus=gpus, nics=nics)

    core = DetectorCore()
    events = [e for k in range(4) for e in core.evaluate(snap(k, 2.0 if k == 3 else 0.0))]
    gpu = next(e for e in events if e.kind == "gpu_fault")
    assert (gpu.run, gpu.rank, gpu.node, gpu.gpu) == ("alpha", 0, "a", "3")
    assert gpu.evidence["runs_on_gpu"] == {"alpha": [0]}
    net = next(e for e in events if e.kind == "network")
    # two runs share node a: the one with most ranks there is named, both are listed
    assert (net.run, net.rank, net.node) == ("big", None, "a")
    assert net.evidence["runs_on_node"] == {"alpha": [0], "big": [0, 1, 2]}

    restarted = DetectorCore()
    restarted.import_state(json.loads(json.dumps(core.export_state())))
    later = [e for k in range(4, 12) for e in restarted.evaluate(snap(k, 0.0)) if e.state == "resolved"]
    nics_later = [e for e in later if e.kind == "network"]
    gpus_later = [e for e in later if e.kind == "gpu_fault"]
    assert [(e.episode, e.run) for e in gpus_later] == [(gpu.episode, "alpha")]
    assert [(e.episode, e.run) for e in nics_later] == [(net.episode, "big")]
