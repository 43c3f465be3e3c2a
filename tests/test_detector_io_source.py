"""Snapshot building: the joins and the missing-data rules on hand-made query results, then the
real thing — a simulated job backfilled with promtool into a real Prometheus, queried with the
detector's PromQL, compared with the simulator's own snapshot of the same samples; instant
(live) and range (replay) queries must give identical snapshots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.promql import build_queries, duration
from rankwatch.detectors.replay import ReplayDataset
from rankwatch.detectors.source import PromSource, build_snapshots

T = 1_700_000_000.0


def one(name_rows: dict[str, list[tuple[dict[str, str], float]]], window_s: float = 15.0, errors=()):
    """A single-time snapshot from ``{query: [(labels, value)]}`` (the live shape)."""
    results = {name: [(lb, [(T, v)]) for lb, v in rows] for name, rows in name_rows.items()}
    return build_snapshots([T], window_s, results, errors)[0]


def probe(rank: int, node: str = "n1", port: int = 9420, job: str = "probe", **extra: str) -> dict[str, str]:
    return {"run": "r", "rank": str(rank), "local_rank": str(rank % 8), "node": node,
            "instance": f"{node}:{port + rank % 8}", "job": job, **extra}


def info(rank: int, **kw: str) -> dict[str, str]:
    return {"__name__": "rankwatch_rank_info", "pp": str(rank // 2), "tp": "0", "dp": str(rank % 2), "gpu": str(rank),
            "world_size": "4", **probe(rank, **kw)}


RANK_QUERIES = ("rank_info_seen", "rank_steps_rate", "rank_step_seconds_rate",
                "rank_section_rate", "rank_tokens_rate", "rank_gauges", "targets_up")


def base_rank_results() -> dict[str, list]:
    r: dict[str, list] = {q: [] for q in RANK_QUERIES}
    for k in range(4):
        r["rank_info_seen"].append((info(k), 1.0))
        r["rank_steps_rate"].append((probe(k), 2.0))
        r["rank_step_seconds_rate"].append((probe(k), 1.0))  # 0.5 s per step
        r["rank_tokens_rate"].append((probe(k), 8192.0))
        r["rank_gauges"].append(({"__name__": "rankwatch_step", **probe(k)}, 120.0))
        r["rank_gauges"].append(({"__name__": "rankwatch_last_step_timestamp_seconds", **probe(k)}, T - 0.2))
        for sec, v in (("forward", 0.3), ("backward", 0.5), ("comm", 0.2 + 0.1 * k)):
            r["rank_section_rate"].append(({**probe(k), "section": sec}, v))
        r["targets_up"].append(({"__name__": "up", "instance": probe(k)["instance"], "job": "probe"}, 1.0))
    return r


def test_ranks_join_info_rates_and_sections() -> None:
    snap = one(base_rank_results())
    assert [r.rank for r in snap.ranks] == [0, 1, 2, 3]
    r3 = snap.ranks[3]
    assert (r3.run, r3.node, r3.local_rank, r3.world_size, r3.pp, r3.dp, r3.tp, r3.gpu) == ("r", "n1", 3, 4, 1, 1, 0, "3")
    assert r3.up and r3.steps_rate == 2.0 and r3.step_seconds == 0.5 and r3.tokens_rate == 8192.0
    assert r3.step == 120.0 and r3.last_step_time == T - 0.2
    # seconds per step = rate(section seconds) / rate(steps)
    assert r3.sections == pytest.approx({"forward": 0.15, "backward": 0.25, "comm": 0.25})
    assert r3.compute_seconds == pytest.approx(0.4)


def test_duplicate_scrape_jobs_do_not_double_count() -> None:
    r = base_rank_results()
    for q in ("rank_steps_rate", "rank_section_rate", "rank_step_seconds_rate"):
        r[q] += [({**lb, "job": "second-job"}, v) for lb, v in r[q]]
    r["rank_info_seen"] += [({**lb, "job": "second-job"}, v) for lb, v in r["rank_info_seen"]]
    snap = one(r)
    assert len(snap.ranks) == 4
    assert snap.ranks[0].steps_rate == 2.0 and snap.ranks[0].sections["forward"] == pytest.approx(0.15)


def test_up_comes_from_the_target_else_from_fresh_samples() -> None:
    r = base_rank_results()
    r["targets_up"][1] = (r["targets_up"][1][0], 0.0)  # rank 1's scrape fails
    del r["targets_up"][2]  # rank 2: no `up` series (a replay file without up)
    r["targets_up"] = [x for x in r["targets_up"] if x[0]["instance"] != probe(3)["instance"]]
    r["rank_steps_rate"] = [x for x in r["rank_steps_rate"] if x[0]["rank"] != "3"]  # rank 3: no fresh samples
    up = {x.rank: x.up for x in one(r).ranks}
    assert up == {0: True, 1: False, 2: True, 3: False}


def test_a_rank_that_moved_node_uses_its_new_series_only() -> None:
    r = base_rank_results()
    r["rank_info_seen"].append((info(0, node="n9"), 1.0))  # seen in the lookback, no fresh samples
    r["targets_up"].append(({"__name__": "up", "instance": "n9:9420", "job": "probe"}, 0.0))
    r["rank_gauges"].append(({"__name__": "rankwatch_step", **probe(0, node="n9")}, 999.0))
    snap = one(r)
    r0 = snap.ranks[0]
    assert len(snap.ranks) == 4
    assert r0.node == "n1" and r0.up and r0.steps_rate == 2.0 and r0.step == 120.0


def test_failed_rank_queries_leave_quantities_missing_never_zero() -> None:
    r = base_rank_results()
    del r["rank_section_rate"]
    snap = one(r, errors=["rank_section_rate: query: HTTP 503 timeout: query timed out"])
    assert snap.errors == ["rank_section_rate: query: HTTP 503 timeout: query timed out"]
    assert all(x.sections == {} and x.compute_seconds is None for x in snap.ranks)
    assert all(x.steps_rate == 2.0 for x in snap.ranks)
    r = base_rank_results()
    del r["rank_info_seen"]
    assert one(r).ranks == []
    # no completed step in the window: per-step means are missing, not 0/0 or infinite
    r = base_rank_results()
    r["rank_steps_rate"][2] = (r["rank_steps_rate"][2][0], 0.0)
    r2 = one(r).ranks[2]
    assert r2.steps_rate == 0.0 and r2.step_seconds is None and r2.sections == {}


def gpu(host: str, g: int, name: str, **extra: str) -> dict[str, str]:
    return {"__name__": name, "gpu": str(g), "UUID": f"GPU-{host}-{g}", "modelName": "H100", "Hostname": host,
            "instance": f"{host}:9410", "job": "node", **extra}


def gpu_results() -> dict[str, list]:
    r: dict[str, list] = {q.name: [] for q in build_queries(15, ["retrans_pkts", "rx_drops"])
                          if q.name.startswith(("gpu", "node", "efa"))}
    for g in range(3):
        r["gpu_seen"].append((gpu("h1", g, "DCGM_FI_DEV_SM_CLOCK"), 1980.0))
    for g in range(2):  # GPU 2 vanished: seen in the lookback, nothing in the window
        r["gpu_gauges"].append((gpu("h1", g, "DCGM_EXP_GPU_HEALTH_STATUS", health_watch="MEM"), 0.0))
        r["gpu_gauges"].append((gpu("h1", g, "DCGM_EXP_GPU_HEALTH_STATUS", health_watch="ALL"), 20.0 * g))
        r["gpu_gauges"].append((gpu("h1", g, "DCGM_FI_DEV_GPU_TEMP"), 60.0 + g))
        r["gpu_avg:sm_clock"].append((gpu("h1", g, ""), 1900.0))
        r["gpu_increase:thermal_violation"].append((gpu("h1", g, ""), 30.0))
        r["gpu_nvlink"].append((gpu("h1", g, "", q="replay"), 2.0))
        r["gpu_nvlink"].append((gpu("h1", g, "", q="crc_flit"), 1.0))
    r["gpu_xid"].append((gpu("h1", 1, "", xid="79"), 1.0))
    r["gpu_xid"].append((gpu("h1", 1, "", xid="13"), 0.0))
    node = {"__name__": "rankwatch_node_info", "Hostname": "h1", "instance": "10.0.0.7:9410"}
    r["node_values"] += [({**node, "q": "seen"}, 1.0), ({**node, "q": "fresh"}, 1.0)]
    r["node_values"].append(({"__name__": "rankwatch_gpu_expected", "Hostname": "h1", "instance": "10.0.0.7:9410",
                              "q": "fresh"}, 3.0))
    r["node_values"].append(({"__name__": "rankwatch_gpu_answering", "instance": "10.0.0.7:9410", "q": "fresh"}, 2.0))
    r["efa:retrans_pkts"].append(({"device": "rdmap16s0", "port": "1", "instance": "10.0.0.7:9410"}, 40.0))
    r["efa:retrans_pkts"].append(({"device": "rdmap16s0", "port": "1", "instance": "[fd00::2]:9410"}, 5.0))
    r["efa:tx_bytes"].append(({"device": "rdmap16s0", "port": "1", "instance": "10.0.0.7:9410"}, 1.5e9))
    r["efa:tx_pkts"].append(({"device": "rdmap16s0", "port": "1", "instance": "10.0.0.7:9410"}, 2e5))
    return r


def test_gpus_fields_presence_and_xids() -> None:
    snap = one(gpu_results())
    g = {x.gpu: x for x in snap.gpus}
    assert set(g) == {"0", "1", "2"}
    assert g["2"].present is False and g["2"].uuid == "GPU-h1-2"
    assert g["0"].present and g["0"].health == 0.0 and g["1"].health == 20.0  # worst watch
    assert g["1"].temperature == 61.0 and g["1"].sm_clock == 1900.0 and g["1"].model == "H100"
    assert g["1"].thermal_violation_rate == 2.0  # increase / window
    assert g["1"].nvlink_errors_increase == 3.0  # CRC + replay
    assert g["1"].xid_increase == {79: 1.0} and g["0"].xid_increase == {}
    assert g["0"].dbe_increase is None  # not exported: missing, not zero


def test_nodes_and_efa_join_through_instance() -> None:
    snap = one(gpu_results())
    assert [(n.node, n.exporter_up, n.gpus_expected, n.gpus_answering) for n in snap.nodes] == [("h1", True, 3.0, 2.0)]
    nics = {(n.node, n.device): n for n in snap.nics}
    # the IP instance joins to Hostname h1 via rankwatch_node_info; an unknown one falls back to its host part
    # packets travel with the errors: the network rule divides one by the other
    assert nics[("h1", "rdmap16s0")].increase == {"retrans_pkts": 40.0, "tx_pkts": 2e5}
    assert nics[("h1", "rdmap16s0")].tx_bytes_rate == 1.5e9 / 15
    assert nics[("fd00::2", "rdmap16s0")].increase == {"retrans_pkts": 5.0}


def test_a_failed_gpu_query_withholds_node_state() -> None:
    r = gpu_results()
    del r["gpu_gauges"]
    snap = one(r, errors=["gpu_gauges: query: timed out"])
    # a reporting node with GPUs missing from the snapshot would read as "every GPU lost"
    assert snap.nodes == []


def test_range_results_split_per_time() -> None:
    times = [T, T + 15, T + 30]
    results = {
        "rank_info_seen": [(info(0), [(t, 1.0) for t in times])],
        "rank_steps_rate": [(probe(0), [(T, 1.0), (T + 30, 3.0)])],
    }
    snaps = build_snapshots(times, 15.0, results)
    assert [s.time for s in snaps] == times
    assert [s.ranks[0].steps_rate for s in snaps] == [1.0, None, 3.0]
    assert [s.ranks[0].up for s in snaps] == [True, False, True]


def test_durations() -> None:
    assert duration(15) == "15s" and duration(2.5) == "2500ms"
    with pytest.raises(ValueError):
        duration(0)


# --- against a real Prometheus -------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenario_replay(tmp_path_factory: pytest.TempPathFactory):
    from rankwatch.sim.scenario import Scenario, simulate, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("io-source", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=240,
                  faults=[Fault("slowdown", rank=5, start_s=60, magnitude=0.3),
                          Fault("xid79", node=0, gpu=2, start_s=100),
                          Fault("dbe", node=1, gpu=1, start_s=80, end_s=120, magnitude=3),
                          Fault("efa", node=1, start_s=60, magnitude=0.3)])
    om, _, n = write_replay(sc, tmp_path_factory.mktemp("scenario"))
    with ReplayDataset(om) as ds:
        src = PromSource(PromClient(PromConnection(ds.url)), 15.0,
                         ["retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events", "rx_drops"])
        yield sc, simulate(sc), src, ds, n
        src.close()


def test_replay_dataset_reports_samples_and_span(scenario_replay) -> None:
    sc, _, _, ds, n = scenario_replay
    assert ds.samples == n
    assert ds.min_time == sc.start_time and ds.max_time == sc.start_time + sc.duration_s


@pytest.mark.parametrize("offset", [45.0, 95.0, 110.0, 200.0])
def test_promql_snapshot_equals_the_simulators_own(scenario_replay, offset: float) -> None:
    from rankwatch.sim.scenario import snapshot_at

    sc, tel, src, _, _ = scenario_replay
    got = src.snapshot(sc.start_time + offset)
    want = snapshot_at(tel, offset, 15.0)
    assert got.errors == [] and got.time == want.time
    assert len(got.ranks) == len(want.ranks) == 8
    for a, b in zip(got.ranks, want.ranks, strict=True):
        assert (a.run, a.rank, a.node, a.pp, a.dp, a.tp, a.gpu, a.gpu_uuid, a.up, a.step) == \
               (b.run, b.rank, b.node, b.pp, b.dp, b.tp, b.gpu, b.gpu_uuid, b.up, b.step)
        for f in ("steps_rate", "step_seconds", "tokens_rate", "last_step_time"):
            want_v = getattr(b, f)
            assert getattr(a, f) == (None if want_v is None else pytest.approx(want_v, rel=1e-9)), f
        assert a.sections == pytest.approx(b.sections, rel=1e-9)
    want_gpus = {(g.node, g.gpu): g for g in want.gpus}
    for g in got.gpus:
        if (g.node, g.gpu) not in want_gpus:
            assert not g.present  # vanished after the XID 79: known, reported absent
            continue
        w = want_gpus[(g.node, g.gpu)]
        for f in ("uuid", "model", "health", "last_xid", "dbe_increase", "remap_failure", "temperature",
                  "clock_event_reasons", "thermal_violation_rate"):
            assert getattr(g, f) == pytest.approx(getattr(w, f)), f
        # Prometheus 2.x windows include their left edge: one more SM-clock sample in the mean
        assert g.sm_clock == pytest.approx(w.sm_clock, rel=0.01)
    assert [(n.node, n.exporter_up, n.gpus_expected, n.gpus_answering) for n in got.nodes] == \
           [(n.node, n.exporter_up, n.gpus_expected, n.gpus_answering) for n in want.nodes]
    assert len(got.nics) == len(want.nics)
    for a, b in zip(got.nics, want.nics, strict=True):
        assert (a.node, a.device) == (b.node, b.device)
        assert a.increase == pytest.approx({k: b.increase[k] for k in a.increase})
        assert {"tx_pkts", "rx_pkts"} <= set(a.increase)
        # error counters come back only where they rose (``> 0`` in the query)
        errors = set(a.increase) - {"tx_pkts", "rx_pkts"}
        asked = {q.name.split(":", 1)[1] for q in src.queries if q.name.startswith("efa:")}
        assert errors == {k for k in asked - {"tx_pkts", "rx_pkts", "tx_bytes", "rx_bytes"} if b.increase.get(k, 0) > 0}
        assert a.tx_bytes_rate == pytest.approx(b.tx_bytes_rate)


def test_xid_and_lost_gpu_are_seen(scenario_replay) -> None:
    sc, _, src, _, _ = scenario_replay
    at_onset = {(g.node, g.gpu): g for g in src.snapshot(sc.start_time + 105).gpus}
    assert at_onset[("node-00", "2")].xid_increase.get(79, 0) >= 1
    assert at_onset[("node-00", "2")].health == 20.0
    later = {(g.node, g.gpu): g for g in src.snapshot(sc.start_time + 150).gpus}
    assert later[("node-00", "2")].present is False and later[("node-00", "1")].present is True


def test_range_path_equals_instant_path(scenario_replay) -> None:
    sc, _, src, _, _ = scenario_replay
    start = sc.start_time + 15
    ranged = list(src.snapshots(start, sc.start_time + sc.duration_s, 15.0))
    assert len(ranged) == math.floor((sc.duration_s - 15) / 15) + 1
    for snap in ranged[::3]:
        assert snap == src.snapshot(snap.time)


def test_chunked_prefetching_range_path_and_gzip_json_path_agree(scenario_replay) -> None:
    # The replay's tuned path (small prefetched chunks, identity encoding, orjson) against the
    # pre-tuning one (one chunk, gzip responses, the standard library's decoder) on a real
    # Prometheus: every Snapshot identical.
    import json

    sc, _, src, ds, _ = scenario_replay
    start, end = sc.start_time + 15, sc.start_time + sc.duration_s
    old_client = PromClient(PromConnection(ds.url, compress=True))
    old_client.loads = json.loads
    efa = ["retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events", "rx_drops"]
    old = PromSource(old_client, 15.0, efa, chunk_steps=1000)
    chunked = PromSource(PromClient(PromConnection(ds.url)), 15.0, efa, chunk_steps=4)
    try:
        want = list(old.snapshots(start, end, 15.0))
        got = list(chunked.snapshots(start, end, 15.0))
    finally:
        old.close()
        chunked.close()
    assert len(got) == len(want) > 3 * 4 and got == want
    assert any(s.ranks and s.gpus and s.nics for s in got)
    assert list(chunked.snapshots(end, start, 15.0)) == []  # an empty range yields nothing


def test_live_merges_the_efa_queries_into_one_and_splits_them_back(scenario_replay) -> None:
    from rankwatch.detectors.promql import NIC_SEEN, RANK_INFO_NOW, RANK_INFO_SEEN, merge_for_instant

    sc, _, src, ds, _ = scenario_replay
    merged = merge_for_instant(src.queries)
    # the EFA counters and the NICs' identity (for coverage) travel in one request, and so do
    # the ranks seen and the ranks in their target's last scrape
    efa = [q.name for q in src.queries if q.name.startswith("efa:") or q.name == NIC_SEEN]
    assert len(merged) == len(src.queries) - len(efa) + 1 - 1
    assert [q.parts for q in merged if q.parts] == [(RANK_INFO_SEEN, RANK_INFO_NOW), tuple(efa)]
    separate = PromSource(PromClient(PromConnection(ds.url)), 15.0,
                          ["retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events", "rx_drops"],
                          merge_instant=False)
    try:
        for offset in (75.0, 105.0):
            got = src.snapshot(sc.start_time + offset)
            assert got.nics and any(n.increase.get("retrans_pkts") for n in got.nics)
            assert got == separate.snapshot(sc.start_time + offset)
    finally:
        separate.close()


def test_the_garbage_collector_is_back_on_after_every_path(scenario_replay) -> None:
    # the joins pause the process-wide collector; it must come back, failures included
    import gc

    from rankwatch.promserver import free_port

    sc, _, src, _, _ = scenario_replay
    assert gc.isenabled()
    assert src.snapshot(sc.start_time + 60).ranks and gc.isenabled()
    it = src.snapshots(sc.start_time + 15, sc.start_time + 120, 15.0)
    assert next(it).ranks and gc.isenabled()  # not held across a yield
    assert len(list(it)) == 7 and gc.isenabled()
    down = PromSource(PromClient(PromConnection(f"http://127.0.0.1:{free_port()}", retries=0)), 15.0, [])
    try:
        assert down.snapshot(sc.start_time + 60).errors and gc.isenabled()
    finally:
        down.close()


def test_queries_are_few_and_independent_of_job_size() -> None:
    qs = build_queries(15, ["retrans_pkts", "rx_drops"])
    assert len(qs) < 40 and len({q.name for q in qs}) == len(qs)
    assert not any("rank=" in q.expr or "job=" in q.expr for q in qs)  # never per rank, never by job name


def test_replay_dataset_is_removed_on_close(tmp_path: Path) -> None:
    f = tmp_path / "x.om"
    f.write_text('# TYPE m gauge\nm{a="1"} 1 100\nm{a="1"} 2 115\n# EOF\n')
    ds = ReplayDataset(f, workdir=tmp_path)
    ds.open()
    wd = ds.workdir
    assert wd is not None and wd.exists() and ds.samples == 2
    ds.close()
    assert not wd.exists() and ds.prometheus is None
