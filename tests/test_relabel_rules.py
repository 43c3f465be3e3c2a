"""The shipped relabel rules (deploy/prometheus/relabel-*.yml) cut series without taking away
what rankwatch reads: promtool accepts them, a real Prometheus scraping a real p5 node exporter
and real probes through them stores fewer series, and the detector's snapshot holds the same
ranks, GPUs, NICs and quantities as without them."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import feed_steps, serve_node_probes

from rankwatch import promserver
from rankwatch.assets import asset_dir, rule_files
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.promql import build_queries
from rankwatch.detectors.source import PromSource
from rankwatch.rulefiles import load_groups
from rankwatch.sim.node import SimulatedNode

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
FILES = {"drop-unused": DEPLOY / "relabel-drop-unused.yml", "detector-only": DEPLOY / "relabel-detector-only.yml"}
NAME = re.compile(r"\b(?:DCGM_[A-Z_]+|node_amazonefa_[a-z_]+|rankwatch_[a-z_]+)\b")
SECTIONS = {"dataloader": 0.02, "forward": 0.3, "backward": 0.55, "optimizer": 0.05, "comm": 0.08}


def rules(variant: str) -> dict[str, list[dict]]:
    return yaml.safe_load(FILES[variant].read_text())


def kept(name: str, relabel: list[dict]) -> bool:
    """Whether Prometheus keeps series ``name`` through these __name__ rules (anchored regexes)."""
    for r in relabel:
        assert r["source_labels"] == ["__name__"] and r["action"] in ("drop", "keep")
        hit = re.fullmatch(r["regex"], name) is not None
        if (r["action"] == "drop") == hit:
            return False
    return True


def detector_names() -> set[str]:
    cfg = DetectorConfig()
    return {n for q in build_queries(cfg.window_s, cfg.efa_error_counters) for n in NAME.findall(q.expr)}


def rule_names() -> set[str]:
    return {n for _, group in load_groups(rule_files()) for r in group["rules"] for n in NAME.findall(r["expr"])}


def dashboard_names() -> set[str]:
    return {n for f in asset_dir("dashboards").glob("*.json") for n in NAME.findall(f.read_text())}


def split(names: set[str]) -> tuple[set[str], set[str]]:
    """(node-exporter names, probe names); the detector's own metrics are neither."""
    probe = {n for n in names if n.startswith("rankwatch_") and not n.startswith(
        ("rankwatch_node_info", "rankwatch_gpu_", "rankwatch_detector_", "rankwatch_efa_"))}
    node = {n for n in names - probe if not n.startswith("rankwatch_detector_") and ":" not in n}
    return node, probe


@pytest.mark.parametrize("variant", list(FILES))
def test_what_the_detector_and_the_alert_rules_read_survives(variant: str) -> None:
    node, probe = split(detector_names() | rule_names())
    assert {"DCGM_EXP_XID_ERRORS_COUNT", "node_amazonefa_retrans_pkts", "rankwatch_section_seconds_total"} <= node | probe
    r = rules(variant)
    assert [n for n in sorted(node) if not kept(n, r["node_exporter"])] == []
    assert [n for n in sorted(probe) if not kept(n, r["probe"])] == []


def test_drop_unused_keeps_every_series_a_dashboard_shows() -> None:
    node, probe = split(dashboard_names())
    r = rules("drop-unused")
    assert [n for n in sorted(node) if not kept(n, r["node_exporter"])] == []
    assert [n for n in sorted(probe) if not kept(n, r["probe"])] == []


def _shape(snap) -> dict:
    """What the detector got, without the values: which fields are known for which entities."""
    def known(obj) -> dict:
        d = dataclasses.asdict(obj)
        return {k: (sorted(v) if isinstance(v, dict) else v is not None) for k, v in d.items()}
    return {"ranks": sorted(json.dumps(known(r), sort_keys=True) for r in snap.ranks),
            "gpus": sorted(json.dumps(known(g), sort_keys=True) for g in snap.gpus),
            "nics": sorted(json.dumps(known(n), sort_keys=True) for n in snap.nics),
            "nodes": sorted(json.dumps(known(n), sort_keys=True) for n in snap.nodes), "errors": snap.errors}


def test_relabeled_scrapes_store_fewer_series_and_the_detector_sees_the_same(tmp_path: Path) -> None:
    node = SimulatedNode("node-rl", gpus=8, efa=32)
    node_server = node.serve("127.0.0.1", 0)
    probes, servers, targets = serve_node_probes("rl-run", "node-rl")
    proms = {}
    try:
        node_target = f"127.0.0.1:{node_server.port}"
        for variant in ("as shipped", *FILES):
            r = rules(variant) if variant in FILES else {"node_exporter": [], "probe": []}
            cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": [
                {"job_name": "rankwatch-node", "static_configs": [{"targets": [node_target]}],
                 **({"metric_relabel_configs": r["node_exporter"]} if r["node_exporter"] else {})},
                {"job_name": "rankwatch-probe", "static_configs": [{"targets": targets}],
                 **({"metric_relabel_configs": r["probe"]} if r["probe"] else {})}]}
            text = yaml.safe_dump(cfg, sort_keys=False)
            (tmp_path / f"{variant}.yml").write_text(text)
            check = promserver.promtool("check", "config", str(tmp_path / f"{variant}.yml"))
            assert check.returncode == 0, check.stdout + check.stderr
            proms[variant] = promserver.start_prometheus(text, workdir=tmp_path / variant.replace(" ", "-"))
        stop_feeding = feed_steps(probes, SECTIONS)  # steps recorded all along, as in training
        try:
            for prom in proms.values():  # a few scrapes of every target in every Prometheus
                promserver.wait_for_series(prom.url, "count_over_time(up[5s]) >= 4", min_series=9, timeout=60)
            t = time.time() - 0.5
            config = DetectorConfig(interval_s=3.0, window_s=3.0)
            snaps = {}
            for variant, prom in proms.items():
                src = PromSource(PromClient(PromConnection(url=prom.url, timeout_s=10)), config.window_s,
                                 config.efa_error_counters)
                try:
                    snaps[variant] = src.snapshot(t)
                finally:
                    src.close()
        finally:
            stop_feeding()
        stored = {}
        for variant, prom in proms.items():
            rows = promserver.query(prom.url, "scrape_samples_post_metric_relabeling")
            stored[variant] = {r["metric"]["job"]: float(r["value"][1]) for r in rows}
        assert stored["as shipped"]["rankwatch-node"] > 1800
        assert stored["drop-unused"]["rankwatch-node"] < 0.55 * stored["as shipped"]["rankwatch-node"]
        assert stored["detector-only"]["rankwatch-node"] < 0.3 * stored["as shipped"]["rankwatch-node"]
        assert stored["drop-unused"]["rankwatch-probe"] < stored["as shipped"]["rankwatch-probe"]
        # the detector's view through each: same entities, same quantities known
        shapes = {}
        for variant, snap in snaps.items():
            assert len(snap.ranks) == 8 and len(snap.gpus) == 8 and len(snap.nics) == 32, variant
            assert all(r.sections.keys() == SECTIONS.keys() for r in snap.ranks), variant
            shapes[variant] = _shape(snap)
        assert shapes["drop-unused"] == shapes["as shipped"]
        assert shapes["detector-only"] == shapes["as shipped"]
    finally:
        for prom in proms.values():
            prom.stop()
        for srv, _thread in servers:
            srv.shutdown()
        for p in probes:
            p.close()
        node_server.stop()
        node.close()
