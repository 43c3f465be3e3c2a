"""Joins that decide who answers: an endpoint answers for the rank whose series it serves now
(a new job on the same ports does not keep the old run alive), a node reports when its own
series have a sample in the node window (absence is judged against the data's spacing), and
the NICs known over the lookback are what coverage counts against."""

from __future__ import annotations

from test_detector_io_source import T, gpu_results, info, one, probe

from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.coverage import measure

RANK_QUERIES = ("rank_info_seen", "rank_info_now", "rank_steps_rate", "rank_step_seconds_rate", "rank_section_rate",
                "rank_tokens_rate", "rank_gauges", "targets_up")


def results(runs: dict[str, str], up: float = 1.0) -> dict[str, list]:
    """Ranks 0-3 of each run on the same four endpoints. ``runs``: run -> "gone" (its series are
    only in the lookback), "starting" (in the endpoints' latest scrape, no rate yet) or "running"."""
    r: dict[str, list] = {q: [] for q in RANK_QUERIES}
    for k in range(4):
        r["targets_up"].append(({"__name__": "up", "instance": probe(k)["instance"], "job": "probe"}, up))
        for run, state in runs.items():
            r["rank_info_seen"].append(({**info(k), "run": run}, 1.0))
            # the time of its info series' latest sample: 2 s ago, or 40 s ago for a run gone
            r["rank_info_now"].append(({**info(k), "run": run}, T - (40.0 if state == "gone" else 2.0)))
            r["rank_gauges"].append(({"__name__": "rankwatch_step", **probe(k), "run": run}, 50.0))
            if state == "running":
                r["rank_steps_rate"].append(({**probe(k), "run": run}, 2.0))
                r["rank_step_seconds_rate"].append(({**probe(k), "run": run}, 1.0))
    return r


def test_a_new_run_on_the_same_ports_does_not_keep_the_old_one_answering() -> None:
    # the new job's probes answer (`up` is 1) before its ranks have a rate: the ports are theirs
    for new in ("starting", "running"):
        snap = one(results({"old": "gone", "new": new}))
        up = {(r.run, r.rank): r.up for r in snap.ranks}
        assert up == {**{("old", k): False for k in range(4)}, **{("new", k): True for k in range(4)}}, new
        cov = measure(snap)
        assert cov.ended_runs == ["old"] and set(cov.runs) == {"new"}
    # nothing about the old run: no hang, though its last step is old and `up` is 1
    core = DetectorCore()
    events = core.evaluate(snap) + core.evaluate(one(results({"old": "gone", "new": "running"})))
    assert [e for e in events if e.run == "old"] == []


def test_a_run_whose_endpoints_are_down_has_ended() -> None:
    snap = one(results({"old": "gone"}, up=0.0))
    assert not any(r.up for r in snap.ranks)
    assert measure(snap).ended_runs == ["old"]


def test_answering_endpoints_without_samples_in_the_window_are_blindness_not_an_end() -> None:
    # `up` is 1 and no other run took the ports, but the window holds no rate (too short for the
    # scrape interval): the run is live and the detector is blind to it — counted, not hidden
    snap = one(results({"r": "starting"}))
    assert all(r.up and r.steps_rate is None for r in snap.ranks)
    cov = measure(snap)
    assert cov.blind and cov.runs["r"].with_data == 0 and cov.runs["r"].expected == 4


def test_a_node_reports_only_with_a_sample_in_the_node_window() -> None:
    r = gpu_results()
    # the window holds no sample of the node (scraped every 30 s, window 15 s): `up` is still 1
    r["node_values"] = [x for x in r["node_values"] if x[0].get("q") != "fresh"]
    for q in ("gpu_gauges", "gpu_avg:sm_clock", "gpu_increase:thermal_violation", "gpu_nvlink", "gpu_xid"):
        r[q] = []
    r["targets_up"] = [({"__name__": "up", "instance": "10.0.0.7:9410", "job": "node"}, 1.0)]
    snap = one(r)
    assert [(n.node, n.exporter_up) for n in snap.nodes] == [("h1", False)]
    assert snap.gpus and not any(g.present for g in snap.gpus)
    # so no GPU is "lost": its node says nothing either
    core = DetectorCore()
    assert [e for e in core.evaluate(snap) if e.kind == "gpu_fault"] == []


def test_nics_seen_over_the_lookback_are_counted_without_data() -> None:
    r = gpu_results()
    # the registry query answers with the NICs silent in the window only; those with data are known too
    r["nic_seen"] = [({"device": "rdmap32s0", "port": "1", "instance": "10.0.0.7:9410"}, 1.0)]
    snap = one(r)
    assert snap.nics_seen == [("fd00::2", "rdmap16s0", "1"), ("h1", "rdmap16s0", "1"), ("h1", "rdmap32s0", "1")]
    cov = measure(snap)
    # rdmap32s0 is known (seen over the lookback) but has no increase in the window
    assert cov.known["nics"] == 3 and cov.with_data["nics"] == 2
