"""The dashboards against live exporters: a real Prometheus scraping `rankwatch node-exporter
--simulate` (simulated NVML and EFA sysfs behind the real collectors) and real training-rank
probes. Every query over series these processes serve returns series."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import scrape_config, wait_until

from rankwatch import promserver
from rankwatch.dashboards.build import render_all
from rankwatch.exporters.identity import RankIdentity
from rankwatch.exporters.probe import Probe

NODE = "sim-node-1"
METRIC_NAME = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*[{\[]")
KEYWORDS = {"by", "on", "without", "ignoring", "group_left"}


def _substitute(expr: str, values: dict[str, str]) -> str:
    # windows of ten 1 s scrapes: a late scrape on a busy machine still leaves several samples
    for key, val in {"__rate_interval": "10s", "__interval": "1s", "__range": "10s", **values}.items():
        expr = expr.replace("$" + key, val)
    return expr


@pytest.mark.slow
def test_dashboards_on_live_exporters(prometheus_factory, subprocess_env) -> None:
    node_port = promserver.free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "rankwatch", "node-exporter", "--simulate", "--simulate-gpus", "2", "--simulate-efa", "2",
         "--hostname", NODE, "--web.listen-address", f"127.0.0.1:{node_port}"],
        env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probes = [Probe("live-run", port=promserver.free_port(), addr="127.0.0.1", wandb_run=None,
                    identity=RankIdentity(rank=r, local_rank=r, world_size=2, local_world_size=2, node=NODE, gpu=r,
                                          pp=0, tp=r, dp=0))
              for r in range(2)]
    stop = threading.Event()

    def train() -> None:  # two ranks stepping; rank 1 computes longer, so it waits less
        while not stop.is_set():
            for r, p in enumerate(probes):
                p.record_step(0.2, {"forward": 0.05 + 0.02 * r, "backward": 0.08, "comm": 0.06 - 0.02 * r},
                              tokens=4096)
            time.sleep(0.05)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        # Prometheus starts while the exporter imports; failed first scrapes do not matter.
        prom = prometheus_factory(scrape_config({"rankwatch-node": [f"127.0.0.1:{node_port}"],
                                                 "rankwatch-probe": [f"127.0.0.1:{p.port}" for p in probes]}))
        promserver.wait_http_ok(f"http://127.0.0.1:{node_port}/healthz", proc=exporter)
        # Every query is evaluated at one data time that every target's scrapes have reached,
        # once the windows ending there hold a few scrapes of every target.
        at = 0.0

        def ready() -> bool:
            nonlocal at
            rows = promserver.query(prom.url, "min(timestamp(up))")
            if not rows:
                return False
            at = float(rows[0]["value"][1])
            counts = [promserver.query(prom.url, f"min(count_over_time({m}[10s]))", time_s=at)
                      for m in ("node_amazonefa_tx_bytes", "DCGM_FI_DEV_GPU_TEMP", "rankwatch_steps_total")]
            return all(c and float(c[0]["value"][1]) >= 3 for c in counts)

        wait_until(ready, "three scrapes of every target")
        names = set(requests.get(f"{prom.url}/api/v1/label/__name__/values", timeout=5).json()["data"])
        values = {"run": "live-run", "node": ".*", "gpu": ".*", "device": ".*"}
        checked, empty = 0, []
        for dashboard in render_all().values():
            for panel in dashboard["panels"]:
                for t in panel.get("targets", []):
                    expr = _substitute(t["expr"], values)
                    result = promserver.query(prom.url, expr, time_s=at)  # raises on a parse error
                    used = set(METRIC_NAME.findall(t["expr"])) - KEYWORDS
                    if used <= names and " > 0" not in expr and "== 1" not in expr and "== 0" not in expr:
                        checked += 1
                        if not result:
                            empty.append(f"{dashboard['title']} / {panel['title']}: {expr}")
        assert not empty, "queries returning no series on live exporters:\n" + "\n".join(empty)
        assert checked >= 40
        # The EFA join through rankwatch_node_info names this host.
        efa = promserver.query(prom.url, _substitute(next(
            t["expr"] for d in render_all().values() if d["uid"] == "rankwatch-efa-network"
            for p in d["panels"] if p["title"] == "TX throughput" for t in p["targets"]), values), time_s=at)
        assert {r["metric"]["Hostname"] for r in efa} == {NODE}
    finally:
        stop.set()
        trainer.join(timeout=5)
        for p in probes:
            p.close()
        exporter.terminate()
        try:
            exporter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            exporter.kill()
            exporter.wait()
