"""The detector's recording rules (alerts/rankwatch-rules.yml, group rankwatch.detector_inputs):
a real Prometheus evaluating them live over a real p5 node exporter and real probes, the
detector taking that path once they answer — with the same GPUs, NICs and verdicts as through
the raw series — and falling back when they stop: one cycle lacks what the rules gave (a query
error, never a zero), the next reads the raw series."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import feed_steps, serve_node_probes

from rankwatch import promserver
from rankwatch.assets import rule_files
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.network import NetworkHealth
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.promql import RULE_EFA_COUNTERS, RULES_PRESENT, build_queries
from rankwatch.detectors.source import PromSource
from rankwatch.sim.node import SimulatedNode

SECTIONS = {"dataloader": 0.02, "forward": 0.3, "backward": 0.55, "optimizer": 0.05, "comm": 0.08}
GROUP = "rankwatch.detector_inputs"


def _detector_group() -> dict:
    (group,) = [g for f in rule_files() for g in yaml.safe_load(f.read_text())["groups"] if g["name"] == GROUP]
    return group


def test_the_rules_sum_the_counters_the_detector_reads_by_default() -> None:
    exprs = " ".join(r["expr"] for r in _detector_group()["rules"])
    assert RULE_EFA_COUNTERS == DetectorConfig().efa_error_counters
    assert all(c in exprs for c in RULE_EFA_COUNTERS)
    assert any(r["record"] == RULES_PRESENT for r in _detector_group()["rules"])
    # configured otherwise, the EFA queries stay on the raw counters even on the rules path
    other = [q.expr for q in build_queries(15.0, ("retrans_pkts",), rules=True) if q.name.startswith("efa:")]
    assert other and not any("rankwatch:efa" in e for e in other)


@pytest.mark.slow
def test_rules_path_sees_what_the_raw_path_sees_and_falls_back(tmp_path: Path, prometheus_factory, caplog) -> None:
    node = SimulatedNode("node-rp", gpus=8, efa=32)
    node_server = node.serve("127.0.0.1", 0)
    node.efa.inject(3, "retransmits", rate=50_000)  # one device port far over the error rule
    probes, servers, targets = serve_node_probes("rp-run", "node-rp")
    stop_feeding = feed_steps(probes, SECTIONS)  # steps recorded all along, as in training
    rules = tmp_path / "rules" / "detector.yml"
    rules.parent.mkdir()
    rules.write_text(yaml.safe_dump({"groups": [{**_detector_group(), "interval": "1s"}]}, sort_keys=False))
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": "rankwatch-node",
                                  "static_configs": [{"targets": [f"127.0.0.1:{node_server.port}"]}]},
                                 {"job_name": "rankwatch-probe", "static_configs": [{"targets": targets}]}]}
    prom = prometheus_factory(yaml.safe_dump(config, sort_keys=False))
    cfg = DetectorConfig(interval_s=3.0, window_s=3.0)
    raw = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=20)), cfg.window_s, cfg.efa_error_counters,
                     recording_rules=False)
    ruled = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=20)), cfg.window_s, cfg.efa_error_counters)
    caplog.set_level(logging.INFO, logger="rankwatch.detectors.source")
    try:
        promserver.wait_for_series(prom.url, "count_over_time(rankwatch:efa_packets:sum[5s]) >= 4", min_series=32,
                                   timeout=90)
        promserver.wait_for_series(prom.url, "count_over_time(up[5s]) >= 4", min_series=9, timeout=90)
        t = time.time() - 1.0
        first = ruled.snapshot(t)  # learns that the rules answer: the next cycles read them
        assert ruled.path == "recording rules" and "answer" in caplog.text
        t = time.time() - 1.0
        a, b = raw.snapshot(t), ruled.snapshot(t)
        assert raw.path == "raw series" and ruled.path == "recording rules"
        assert a.errors == b.errors == first.errors == []
        # the same GPUs with the same health, and the same NICs
        assert [(g.node, g.gpu, g.present, g.health, g.last_xid, g.remap_pending) for g in a.gpus] == \
               [(g.node, g.gpu, g.present, g.health, g.last_xid, g.remap_pending) for g in b.gpus]
        assert [(n.node, n.device) for n in a.nics] == [(n.node, n.device) for n in b.nics] and len(a.nics) == 32
        assert set(a.nics_seen) == set(b.nics_seen)
        # packets: both ways summed by the rule. Compared over 12 s windows: a rule evaluated at
        # the scrape interval samples the scrapes with a phase of its own, so over a 3 s window
        # (three samples) the two increases can differ by a whole scrape's worth (2x, seen on an
        # idle machine); over twelve samples by a fraction of that.
        promserver.wait_for_series(prom.url, "count_over_time(rankwatch:efa_packets:sum[14s]) >= 13", min_series=32,
                                   timeout=90)
        raw_long = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=20)), 12.0, cfg.efa_error_counters,
                              recording_rules=False)
        ruled_long = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=20)), 12.0, cfg.efa_error_counters)
        try:
            t = time.time() - 1.0
            ruled_long.snapshot(t)
            t = time.time() - 1.0
            la, lb = raw_long.snapshot(t), ruled_long.snapshot(t)
            assert ruled_long.path == "recording rules" and len(la.nics) == len(lb.nics) == 32
            for x, y in zip(la.nics, lb.nics, strict=True):
                assert y.increase["packets_sum"] == pytest.approx(x.increase["tx_pkts"] + x.increase["rx_pkts"],
                                                                  rel=0.5)
        finally:
            raw_long.close()
            ruled_long.close()
        # the network verdict is the same: the one device with retransmits, on both paths
        net = NetworkHealth(cfg)
        fa, _ = net.evaluate(a)
        fb, _ = net.evaluate(b)
        assert [(f.key, f.flagged, f.subject["nic"]) for f in fa] == [(f.key, f.flagged, f.subject["nic"]) for f in fb]
        assert [f.flagged for f in fa] == [True]
        # and a whole core over the rules path raises what it raises over the raw path
        ca, cb = DetectorCore(cfg), DetectorCore(cfg)
        for _ in range(4):
            time.sleep(cfg.interval_s)
            t = time.time() - 1.0
            ea, eb = ca.evaluate(raw.snapshot(t)), cb.evaluate(ruled.snapshot(t))
            assert [(e.kind, e.state, e.node) for e in ea] == [(e.kind, e.state, e.node) for e in eb]
        # the rules stop (a Prometheus without them): one cycle withholds what they gave —
        # missing, never zero — and the next reads the raw series again
        config.pop("rule_files")
        (prom.workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        assert requests.post(prom.url + "/-/reload", timeout=30).status_code == 200
        deadline = time.monotonic() + 120
        while ruled.path == "recording rules" and time.monotonic() < deadline:
            snap = ruled.snapshot(time.time() + 400)  # past the lookback: the rules' series are gone
        assert ruled.path == "raw series" and "stopped answering" in caplog.text
        assert any("recording rules it read stopped answering" in e for e in snap.errors)
        assert not any(n.increase.get("packets_sum") for n in snap.nics)
    finally:
        stop_feeding()
        raw.close()
        ruled.close()
        for srv, _thread in servers:
            srv.shutdown()
        for p in probes:
            p.close()
        node_server.stop()
        node.close()


@pytest.mark.slow
def test_rules_evaluated_too_rarely_for_the_window_leave_the_raw_path_alone(tmp_path: Path,
                                                                           prometheus_factory) -> None:
    # Rules evaluated every 10 s against a 3 s node window: increase() over the rules' sums would
    # see one sample at best. The detector must stay on the raw series at every cycle — not
    # switch in whenever an evaluation happens to fall inside the window and lose the NICs at
    # the next cycle.
    node = SimulatedNode("node-slow", gpus=2, efa=4)
    node_server = node.serve("127.0.0.1", 0)
    rules = tmp_path / "detector.yml"
    rules.write_text(yaml.safe_dump({"groups": [{**_detector_group(), "interval": "10s"}]}, sort_keys=False))
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "rule_files": [str(rules)],
              "scrape_configs": [{"job_name": "rankwatch-node",
                                  "static_configs": [{"targets": [f"127.0.0.1:{node_server.port}"]}]}]}
    prom = prometheus_factory(yaml.safe_dump(config, sort_keys=False))
    src = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=20)), 3.0, DetectorConfig().efa_error_counters)
    try:
        # four evaluations of the rules: the cycles below cover the last 20 s, two evaluation
        # intervals, and the scrapes began 10 s before them (the first evaluation can come
        # before the first scrape, when no 3 s window holds two samples yet)
        promserver.wait_for_series(prom.url, f"count_over_time({RULES_PRESENT}[1h]) >= 4", min_series=1, timeout=120)
        end = float(requests.get(prom.url + "/api/v1/query", params={"query": f"timestamp({RULES_PRESENT})"},
                                 timeout=30).json()["data"]["result"][0]["value"][1])
        for k in range(21):  # a cycle every second of data time, over two evaluation intervals
            snap = src.snapshot(end - 20.0 + k)
            assert src.path == "raw series"
            assert snap.errors == [] and len(snap.nics) == 4, (k, snap.errors)
    finally:
        src.close()
        node_server.stop()
        node.close()
