"""Windows that follow the data: at every common scrape interval the plan's windows hold enough
samples and lose no increment, evaluations are never more frequent than the data; an explicit
setting the data makes too short is raised with a warning that names it; the spacing is
learned from a real Prometheus (and VictoriaMetrics speaks the same PromQL)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rankwatch.detectors.cadence import Cadence, Spacing, WindowPlan, plan_windows, quantize_spacing
from rankwatch.detectors.config import DetectorConfig


@pytest.mark.parametrize("measured,expected", [(14.997, 15.0), (15.04, 15.0), (0.5003, 0.5), (59.6, 60.0),
                                                (1.002, 1.0), (30.9, 31.0), (120.4, 120.0)])
def test_spacing_is_quantized_to_a_round_interval(measured: float, expected: float) -> None:
    assert quantize_spacing(measured) == expected


@pytest.mark.parametrize("probe", [1, 5, 15, 30, 60])
@pytest.mark.parametrize("node", [1, 5, 15, 30, 60])
def test_default_plan_fits_every_scrape_interval(probe: float, node: float) -> None:
    plan = plan_windows(DetectorConfig(), Spacing(probe, node))
    assert plan.warnings == ()  # nothing was set explicitly: nothing to warn about
    # never evaluate more often than the probes deliver samples, never less often than the default
    assert plan.interval_s == max(15.0, probe)
    for window, s in ((plan.window_s, probe), (plan.node_window_s, node)):
        assert window >= 3 * s  # a rate survives one late or lost scrape
        assert window >= plan.interval_s + s  # every scrape-to-scrape increase lands in some window
        assert window <= max(15.0, plan.interval_s + s, 3 * s)  # and no wider than that needs


def test_the_issue_examples() -> None:
    # shipped Prometheus configs scrape every 15 s: a 45 s window (3 samples), one evaluation per scrape
    assert plan_windows(DetectorConfig(), Spacing(15, 15)) == WindowPlan(15, 45, 45, Spacing(15, 15))
    # 5 s scrapes keep today's 15 s cadence, with a window that covers the increment before it
    assert plan_windows(DetectorConfig(), Spacing(5, 5)) == WindowPlan(15, 20, 20, Spacing(5, 5))
    # probes every 5 s, node exporters every 60 s: each source gets its own window
    plan = plan_windows(DetectorConfig(), Spacing(5, 60))
    assert (plan.interval_s, plan.window_s, plan.node_window_s) == (15, 20, 180)


def test_unknown_spacing_keeps_the_configuration() -> None:
    cfg = DetectorConfig(interval_s=1.0, window_s=3.0)
    assert plan_windows(cfg, Spacing()) == WindowPlan(1.0, 3.0, 3.0, Spacing())


def test_explicit_window_too_short_is_raised_with_a_warning() -> None:
    cfg = DetectorConfig(window_s=6.0)
    plan = plan_windows(cfg, Spacing(5, 5), explicit={"window_s"})
    assert plan.window_s == plan.node_window_s == 20
    assert len(plan.warnings) == 2
    probe, node = plan.warnings
    assert probe.startswith("window_s = 6 s holds 1 sample of the probes (scraped every 5 s")
    assert "rate() and increase() see nothing" in probe and "using 20 s for the probes" in probe
    assert "node exporters" in node
    # two samples: still a rate, but one late scrape leaves it empty
    plan = plan_windows(DetectorConfig(window_s=30.0), Spacing(15, 15), explicit={"window_s"})
    assert plan.window_s == 45 and "one late scrape leaves it empty" in plan.warnings[0]
    # three samples, but windows 15 s apart that are 15 s long skip the scrape-to-scrape
    # increase across their boundary
    plan = plan_windows(DetectorConfig(window_s=15.0), Spacing(5, 5), explicit={"window_s"})
    assert plan.window_s == 20 and "the increase between one window and the next would be lost" in plan.warnings[0]
    # a window long enough is kept as given
    assert plan_windows(DetectorConfig(window_s=120.0), Spacing(15, 15), explicit={"window_s"}).window_s == 120


def test_explicit_interval_shorter_than_the_scrapes_is_raised_with_a_warning() -> None:
    plan = plan_windows(DetectorConfig(interval_s=15.0), Spacing(60, 60), explicit={"interval_s"})
    assert plan.interval_s == 60
    assert plan.warnings == ("interval_s = 15 s is shorter than the probes' scrape interval (60 s): evaluations in "
                             "between would judge the same samples again; evaluating every 60 s",)


def test_cadence_learns_when_due_with_hysteresis_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    measured: list[dict[str, float | None]] = [{"probe": None, "node": 15.02}, {"probe": 15.0, "node": 14.98},
                                               {"probe": 15.9, "node": 15.0}, {"probe": 30.2, "node": 30.0}]
    asked: list[float] = []

    def learn(t: float) -> dict[str, float | None]:
        asked.append(t)
        return measured[min(len(asked), len(measured)) - 1]

    caplog.set_level(logging.INFO, logger="rankwatch.detectors.cadence")
    cad = Cadence(DetectorConfig(window_s=30.0), learn, explicit={"window_s"}, relearn_s=600)
    assert cad.update(0.0)  # node spacing known, probes not yet
    assert cad.plan.spacing == Spacing(None, 15.0)
    assert cad.update(15.0)  # still unknown: asked again at the next evaluation
    assert cad.plan.spacing == Spacing(15.0, 15.0) and cad.plan.window_s == 45
    assert not cad.update(30.0) and asked == [0.0, 15.0]  # known: not asked before relearn_s
    assert not cad.update(615.0)  # 15.9 is within the hysteresis of 15: no re-plan
    assert cad.update(1215.0) and cad.plan.interval_s == 30 and cad.plan.window_s == 90
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the same too-short window_s is named once per distinct problem, not once per re-learn
    assert len(warnings) == len(set(warnings)) >= 2 and all("window_s = 30 s" in w for w in warnings)
    assert any("sample spacing: probe scrape 30 s, node scrape 30 s; window 90 s" in r.getMessage()
               for r in caplog.records)


@pytest.fixture(scope="module")
def mixed_replay(tmp_path_factory: pytest.TempPathFactory):
    """Probes scraped every 5 s, node exporters every 30 s, backfilled into a real Prometheus."""
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Layout

    sc = Scenario("mixed", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=420,
                  scrape_s=5.0, node_scrape_s=30.0)
    om, _, _ = write_replay(sc, tmp_path_factory.mktemp("mixed"))
    with ReplayDataset(om) as ds:
        yield sc, ds, om


def test_spacing_is_learned_per_source_from_prometheus(mixed_replay) -> None:
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.source import PromSource

    sc, ds, _ = mixed_replay
    src = PromSource(PromClient(PromConnection(ds.url)), 15.0, ["retrans_pkts"])
    try:
        # live: an instant measurement, in the job's first minutes (short span) and later (long span)
        for t in (sc.start_time + 90, sc.start_time + 400):
            got = src.sample_spacing(t)
            assert got == {"probe": pytest.approx(5.0, rel=0.02), "node": pytest.approx(30.0, rel=0.02)}, t
        # before any data: unknown, not an error
        assert src.sample_spacing(sc.start_time - 3600) == {"probe": None, "node": None}
        # replay: over the whole range
        whole = src.sample_spacing_range(ds.min_time, ds.max_time)
        assert whole == {"probe": pytest.approx(5.0, rel=0.02), "node": pytest.approx(30.0, rel=0.02)}
        # the plan gives the node exporters their own window, and snapshots carry it
        cad = Cadence(DetectorConfig())
        cad.fix(whole)
        src.set_windows(cad.plan.window_s, cad.plan.node_window_s)
        snap = src.snapshot(sc.start_time + 300)
        assert (snap.window_s, snap.node_window_s) == (20.0, 90.0)
        assert len(snap.gpus) == 8 and all(g.present for g in snap.gpus) and len(snap.nics) == 8
        assert all(n.exporter_up for n in snap.nodes)
    finally:
        src.close()


def test_detect_replay_with_mixed_intervals_logs_the_plan(mixed_replay, tmp_path: Path, caplog) -> None:
    from rankwatch.cli import main

    _, _, om = mixed_replay
    caplog.set_level(logging.INFO)
    events = tmp_path / "events.jsonl"
    assert main(["detect", "--replay", str(om), "--quiet", "--events-file", str(events)]) == 0
    assert events.read_text() == ""  # a healthy job
    text = caplog.text
    assert "probe scrape 5 s, node scrape 30 s; window 20 s (node 90 s); evaluating every 15 s" in text
    assert ("watching run sim-run: 8 ranks (layout labels: yes), 2 nodes, 8 GPUs, 8 NICs; probe scrape 5 s, "
            "node scrape 30 s; window 20 s (node 90 s); every 15 s; first verdict after") in text
    assert "coverage:" not in text  # full coverage from the first evaluation: nothing to say


def test_victoria_metrics_answers_the_spacing_query(tmp_path: Path) -> None:
    """The spacing PromQL (timestamp, offset, count_over_time, quantile) on VictoriaMetrics."""
    import time

    import requests

    from rankwatch import promserver
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.promql import spacing_query

    vm = promserver.start_victoria_metrics(workdir=tmp_path, extra_args=["-search.latencyOffset=0s", "-search.disableCache"])
    try:
        t0 = int(time.time()) // 60 * 60 - 900
        lines = [f'rankwatch_rank_info{{run="r",rank="{r}",instance="h:{9420 + r}"}} 1 {(t0 + 15 * k) * 1000 + 3 * r}'
                 for r in range(4) for k in range(50)]
        lines += [f'rankwatch_node_info{{Hostname="h",instance="h:9410"}} 1 {(t0 + 30 * k) * 1000 + 7}' for k in range(25)]
        assert requests.post(vm.url + "/api/v1/import/prometheus", data="\n".join(lines) + "\n", timeout=10).ok
        requests.get(vm.url + "/internal/force_flush", timeout=10)
        client = PromClient(PromConnection(vm.url))
        t = t0 + 700.0
        promserver.wait_for_series(vm.url, "rankwatch_rank_info", min_series=4, timeout=30)  # ingested
        got = {s: [v for _, v in client.query(spacing_query(s), t)] for s in ("probe", "node")}
        assert got == {"probe": [pytest.approx(15.0)], "node": [pytest.approx(30.0)]}
        client.close()
    finally:
        vm.stop()


@pytest.fixture(scope="module")
def slow_scrape_replay(tmp_path_factory: pytest.TempPathFactory):
    """A 16-rank job scraped every 15 s whose rank 13 is 30 % slower from 150 s to 420 s."""
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("slow-scrape", layout=Layout(tp=4, pp=2, dp=2), nodes=2, duration_s=600, scrape_s=15.0,
                  faults=[Fault("slowdown", rank=13, start_s=150, end_s=420, magnitude=0.3)])
    om, _, _ = write_replay(sc, tmp_path_factory.mktemp("slow"))
    return sc, om


def test_live_loop_follows_the_data_and_replay_gives_the_same_events(slow_scrape_replay, tmp_path: Path) -> None:
    """No config: the live service learns the 15 s spacing at its first cycle, widens its windows
    to 45 s, exports what it sees — and prints exactly the events `rankwatch detect --replay`
    prints for the same samples."""
    import json

    from rankwatch.cli import main
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.metrics import DetectorMetrics
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import DetectorService, align_down, align_up
    from rankwatch.detectors.source import PromSource

    sc, om = slow_scrape_replay
    cfg = DetectorConfig()
    replayed = tmp_path / "replay.jsonl"
    assert main(["detect", "--replay", str(om), "--quiet", "--events-file", str(replayed)]) == 0
    with ReplayDataset(om) as ds:
        src = PromSource(PromClient(PromConnection(ds.url)), cfg.window_s, cfg.efa_error_counters)
        metrics = DetectorMetrics(cfg.interval_s)
        svc = DetectorService(src, DetectorCore(cfg), interval_s=cfg.interval_s, metrics=metrics,
                              cadence=Cadence(cfg, src.sample_spacing))
        try:
            # the live grid from the first time whose 45 s windows the data covers, as replay does
            t, live, results = align_up(ds.min_time + 45, 15), [], []
            while t <= align_down(ds.max_time, 15):
                res = svc.run_cycle(t)
                results.append(res)
                live += [json.loads(e.to_json()) for e in res.events]
                t += svc.interval_s
        finally:
            src.close()
    assert (svc.interval_s, src.window_s, src.node_window_s) == (15.0, 45.0, 45.0)
    assert live == [json.loads(line) for line in replayed.read_text().splitlines()]
    assert [(e["state"], e["rank"]) for e in live if e["kind"] == "straggler"] == [("firing", 13), ("resolved", 13)]
    # what it saw, on the cycle result (for a heartbeat) and in /metrics
    cov = results[-1].coverage
    assert cov is not None and cov.describe() == "run sim-run 16/16 ranks; GPUs 16/16; NICs 8/8; node exporters 2/2"
    value = metrics.registry.get_sample_value
    assert value("rankwatch_detector_coverage_known", {"source": "ranks"}) == 16
    assert value("rankwatch_detector_coverage_with_data", {"source": "nics"}) == 8
    assert value("rankwatch_detector_run_ranks_with_data", {"run": "sim-run"}) == 16
    assert value("rankwatch_detector_sample_spacing_seconds", {"source": "probe"}) == 15
    assert value("rankwatch_detector_window_seconds", {"source": "node"}) == 45
    assert value("rankwatch_detector_interval_seconds") == 15
    assert value("rankwatch_detector_last_cycle_failed_queries") == 0
    assert value("rankwatch_detector_last_cycle_queries") == len(src.queries)
