"""A real Prometheus scrapes a running `rankwatch node-exporter --simulate` (a simulated
p5.48xlarge: 8 GPUs, 32 EFA devices): every GPU and EFA device is queryable, counters advance,
EFA series join to the host name, and every query of NVIDIA's dcgm-exporter Grafana dashboard
returns data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import scrape_config

from rankwatch import promserver

DASHBOARD = Path(__file__).parent / "fixtures" / "node" / "dcgm-exporter-dashboard.json"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = promserver.free_port()
    log = tmp_path_factory.mktemp("exporter") / "exporter.log"
    env = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).parents[1]))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rankwatch", "node-exporter", "--simulate",
                                 "--web.listen-address", f"127.0.0.1:{port}", "--hostname", "p5-node-01"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
        text = log.read_text()
        assert code == 0, text
        # the temporary sysfs tree of the simulation is gone
        m = re.search(r"sysfs tree (\S+)\)", text)
        assert m and not Path(m.group(1)).exists(), text


@pytest.fixture(scope="module")
def prometheus(exporter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mp = promserver.start_prometheus(scrape_config({"node": [exporter]}),
                                     workdir=tmp_path_factory.mktemp("prom"))
    try:
        # enough scrapes for rate() over counters that the simulation advances once a second
        promserver.wait_for_series(mp.url, "count_over_time(node_amazonefa_tx_bytes[1m]) >= 5", min_series=32)
        yield mp.url
    finally:
        mp.stop()


def q(url: str, promql: str) -> list[dict]:
    return promserver.query(url, promql)


def test_every_gpu_and_efa_device_is_in_prometheus(prometheus: str, exporter: str) -> None:
    gpus = q(prometheus, "DCGM_FI_DEV_GPU_TEMP")
    assert sorted(int(r["metric"]["gpu"]) for r in gpus) == list(range(8))
    for r in gpus:
        m = r["metric"]
        assert m["Hostname"] == "p5-node-01" and m["instance"] == exporter
        assert m["modelName"] == "NVIDIA H100 80GB HBM3" and m["UUID"].startswith("GPU-")
    devices = {r["metric"]["device"] for r in q(prometheus, "node_amazonefa_info")}
    assert len(devices) == 32 and all(d.startswith("rdmap") for d in devices)
    for family in ("node_amazonefa_tx_bytes", "node_amazonefa_rx_bytes", "node_amazonefa_retrans_pkts",
                   "node_amazonefa_unresponsive_remote_events", "node_amazonefa_rx_drops"):
        assert {r["metric"]["device"] for r in q(prometheus, family)} == devices, family
    assert len(q(prometheus, "node_amazonefa_keep_alive_rcvd")) == 32
    # the simulated links carry traffic: ~40 % of 100 Gb/s per device
    # (rate() divides by the whole window, too long for a series this young: use the samples)
    rates = []
    for r in q(prometheus, "node_amazonefa_tx_bytes[1m]"):
        (t0, v0), (t1, v1) = r["values"][0], r["values"][-1]
        rates.append((float(v1) - float(v0)) / (t1 - t0))
    assert len(rates) == 32 and all(3e9 < v < 7e9 for v in rates), rates
    success = q(prometheus, "rankwatch_exporter_collector_success")
    assert {r["metric"]["collector"]: r["value"][1] for r in success} == {"gpu": "1", "efa": "1"}


def test_efa_series_join_to_the_host_name(prometheus: str) -> None:
    joined = q(prometheus, "node_amazonefa_tx_bytes * on(instance) group_left(Hostname) rankwatch_node_info")
    assert len(joined) == 32
    assert {r["metric"]["Hostname"] for r in joined} == {"p5-node-01"}


def test_every_dcgm_dashboard_query_returns_data(prometheus: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # Template variables as Grafana resolves them: label_values(), then "All" as a regex.
    values: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"])
        assert m, var["query"]
        r = requests.get(f"{prometheus}/api/v1/label/{m.group(2)}/values", params={"match[]": m.group(1)}, timeout=10)
        found = r.json()["data"]
        assert found, var["query"]
        # Grafana escapes regex metacharacters, doubled inside a PromQL string literal
        values[var["name"]] = "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in found) + ")"
    exprs = [t["expr"] for panel in _panels(dashboard) for t in panel.get("targets", []) if t.get("expr")]
    assert len(exprs) == 8
    for expr in exprs:
        promql = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)
        result = q(prometheus, promql)
        assert result, f"no data for dashboard query {expr}"
        assert all(float(r["value"][1]) == float(r["value"][1]) for r in result)  # not NaN


def _panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])
