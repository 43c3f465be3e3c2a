"""The shipped deploy configs as a user meets them: a real Prometheus scrapes a real training job
(torchrun, gloo on CPU, one rank slowed) and a simulated node exporter at the scrape intervals
and timeouts that deploy/compose/prometheus.yml, deploy/kubernetes/base/monitors.yaml and
deploy/slurm/prometheus-amp.yml set, and `rankwatch detector` runs with its defaults (no
config, no --interval/--window): it learns the intervals and names the straggler.

One run per distinct (probe, node) interval pair the configs ship; waits are on the detector's
events file, with a deadline that only guards against a broken run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_detector_e2e_done import SLOW_RANK, free_port_block, start_sim_node, start_slow_job, stop

from rankwatch import promserver

DEADLINE_S = 600.0


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, f"unexpected duration {duration!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def shipped_intervals() -> dict[tuple[float, float, float, float], list[str]]:
    """(probe interval, probe timeout, node interval, node timeout) -> the configs that ship it."""
    out: dict[tuple[float, float, float, float], list[str]] = {}
    for path in ("deploy/compose/prometheus.yml", "deploy/slurm/prometheus-amp.yml"):
        doc = yaml.safe_load((REPO / path).read_text())
        g = doc["global"]
        jobs = {j["job_name"]: (seconds(j.get("scrape_interval", g["scrape_interval"])),
                                seconds(j.get("scrape_timeout", g.get("scrape_timeout", "10s"))))
                for j in doc["scrape_configs"]}
        out.setdefault((*jobs["rankwatch-probe"], *jobs["rankwatch-node"]), []).append(path)
    path = "deploy/kubernetes/base/monitors.yaml"
    monitors = {d["metadata"]["name"]: d["spec"]["podMetricsEndpoints"][0]
                for d in yaml.safe_load_all((REPO / path).read_text()) if d and d["kind"] == "PodMonitor"}
    probe, node = monitors["rankwatch-probes"], monitors["rankwatch-node-exporter"]
    key = (seconds(probe["interval"]), seconds(probe["scrapeTimeout"]), seconds(node["interval"]),
           seconds(node["scrapeTimeout"]))
    out.setdefault(key, []).append(path)
    return out


SHIPPED = shipped_intervals()


def test_every_deploy_config_was_read() -> None:
    assert sorted(p for paths in SHIPPED.values() for p in paths) == [
        "deploy/compose/prometheus.yml", "deploy/kubernetes/base/monitors.yaml", "deploy/slurm/prometheus-amp.yml"]


@pytest.mark.slow
@pytest.mark.parametrize("intervals", sorted(SHIPPED),
                         ids=lambda k: f"probe{k[0]:g}s-node{k[2]:g}s({'+'.join(Path(p).parent.name for p in SHIPPED[k])})")
def test_defaults_find_a_straggler_at_the_shipped_scrape_intervals(intervals, prometheus_factory, tmp_path: Path,
                                                                   subprocess_env) -> None:
    probe_s, probe_timeout, node_s, node_timeout = intervals
    env = dict(subprocess_env, RANKWATCH_NODE="simnode-0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="0,1,2,3")
    node_port = promserver.free_port()
    probe_base = free_port_block(4)
    node = start_sim_node(env, tmp_path, node_port)
    job = start_slow_job(env, tmp_path, probe_base, "shipped", "--steps", "0", "--stop-file", str(tmp_path / "stop"))
    detector = None
    try:
        prom = prometheus_factory(
            "global:\n  evaluation_interval: 15s\nscrape_configs:\n"
            f"  - job_name: rankwatch-node\n    scrape_interval: {node_s:g}s\n    scrape_timeout: {node_timeout:g}s\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{node_port}']\n"
            f"  - job_name: rankwatch-probe\n    scrape_interval: {probe_s:g}s\n    scrape_timeout: {probe_timeout:g}s\n"
            f"    static_configs:\n      - targets: [{', '.join(repr(f'127.0.0.1:{probe_base + i}') for i in range(4))}]\n")
        events_file = tmp_path / "events.jsonl"
        detector = subprocess.Popen(
            [sys.executable, "-m", "rankwatch", "detector", "--prometheus", prom.url, "--events-file", str(events_file),
             "--state-db", str(tmp_path / "state.sqlite"), "--listen", f"127.0.0.1:{promserver.free_port()}"],
            env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "detector.log", "w"), text=True,
            start_new_session=True)
        firing = None
        deadline = time.monotonic() + DEADLINE_S
        while firing is None and time.monotonic() < deadline:
            assert detector.poll() is None, (tmp_path / "detector.log").read_text()[-3000:]
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            if events_file.exists():
                firing = next((e for e in map(json.loads, events_file.read_text().splitlines())
                               if e["kind"] == "straggler" and e["state"] == "firing"), None)
            time.sleep(1.0)
        assert firing is not None, "no straggler\n" + (tmp_path / "detector.log").read_text()[-3000:]
        stop(detector)
        assert detector.returncode == 0
    finally:
        if detector is not None:
            stop(detector)
        stop(job)
        stop(node)
    assert (firing["run"], firing["rank"], firing["node"], firing["gpu"]) == ("shipped", SLOW_RANK, "simnode-0", "2")
    assert firing["evidence"]["compute_slowdown"] > 0.3
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert {e["rank"] for e in events if e["kind"] == "straggler"} == {SLOW_RANK}
    log = (tmp_path / "detector.log").read_text()
    # it learned the shipped intervals and planned its windows from them, without being told
    window = max(15.0, max(15.0, probe_s) + probe_s, 3 * probe_s)
    assert f"sample spacing: probe scrape {probe_s:g} s, node scrape {node_s:g} s; window {window:g} s" in log, log[-3000:]
    assert "watching run shipped: 4 ranks (layout labels: no" in log
