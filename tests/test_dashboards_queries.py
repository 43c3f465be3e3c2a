"""Every dashboard query — panels, variables, annotations — runs against a real Prometheus
holding simulated metrics (backfilled with promtool) and must parse and return series."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests

from rankwatch import promserver
from rankwatch.dashboards.build import render_all

T0 = 1_790_000_000  # fixed, so the data and the query window are reproducible
STEP = 15
SAMPLES = 121  # 30 minutes
END = T0 + STEP * (SAMPLES - 1)
RUN = "llama-70b-pt-7"
NODES = ("p5-001", "p5-002")
GPUS = (0, 1)
DEVICES = ("rdmap0s6", "rdmap1s6")
SLOW_RANK = 3  # node p5-002, gpu 1, pipeline stage 1
FAULTY = ("p5-002", 1)  # GPU with XID 79 / FAIL / DBE
LOST = ("p5-001", 0)  # stops answering NVML for the last 10 scrapes
LOST_FROM = SAMPLES - 10
IMPAIRED = ("p5-002", "rdmap1s6")


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}"


class Series:
    """Accumulates OpenMetrics lines grouped by family, as promtool's backfill wants."""

    def __init__(self) -> None:
        self.families: dict[str, list[str]] = {}

    def add(self, name: str, labels: dict[str, Any], values: list[float]) -> None:
        lab = _labels(**labels)
        lines = self.families.setdefault(name, [])
        for i, v in enumerate(values):
            lines.append(f"{name}{lab} {v:g} {T0 + i * STEP}")

    def text(self) -> str:
        out = []
        for name, lines in self.families.items():
            out.append(f"# TYPE {name} gauge")
            out += lines
        return "\n".join(out) + "\n# EOF\n"


def _counter(rate_per_s: float, start: float = 0.0, from_i: int = 0) -> list[float]:
    return [start + rate_per_s * STEP * max(0, i - from_i) for i in range(SAMPLES)]


def _const(v: float) -> list[float]:
    return [v] * SAMPLES


def simulated_fleet() -> str:
    """2 nodes × 2 GPUs × 2 EFA devices, 4 ranks in 2 pipeline stages; rank 3 is slow from the
    middle of the window, its GPU fails, and one of its node's NICs is impaired. Detector
    series as rankwatch's detector exports them."""
    s = Series()
    half = SAMPLES // 2
    rank = 0
    for node in NODES:
        inst = f"{node}:9410"
        s.add("rankwatch_node_info", {"instance": inst, "job": "rankwatch-node", "Hostname": node}, _const(1))
        s.add("up", {"instance": inst, "job": "rankwatch-node"}, _const(1))
        s.add("rankwatch_gpu_expected", {"instance": inst, "job": "rankwatch-node"}, _const(len(GPUS)))
        s.add("rankwatch_gpu_answering", {"instance": inst, "job": "rankwatch-node"},
              [len(GPUS) - (node == LOST[0] and i >= LOST_FROM) for i in range(SAMPLES)])
        for gpu in GPUS:
            faulty = (node, gpu) == FAULTY
            g = {"gpu": gpu, "UUID": f"GPU-{node}-{gpu}", "pci_bus_id": f"00000000:{gpu + 1:02X}:00.0",
                 "device": f"nvidia{gpu}", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": node,
                 "DCGM_FI_DRIVER_VERSION": "550.127.08", "instance": inst, "job": "rankwatch-node"}
            for name, v in (("DCGM_FI_DEV_GPU_UTIL", 97), ("DCGM_FI_DEV_GPU_TEMP", 61), ("DCGM_FI_DEV_POWER_USAGE", 650),
                            ("DCGM_FI_DEV_FB_USED", 70000), ("DCGM_FI_DEV_FB_FREE", 11000),
                            ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 0), ("DCGM_FI_DEV_ROW_REMAP_FAILURE", 0),
                            ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 2)):
                s.add(name, g, _const(v))
            s.add("rankwatch_gpu_up", g, [0 if (node, gpu) == LOST and i >= LOST_FROM else 1 for i in range(SAMPLES)])
            s.add("DCGM_FI_DEV_SM_CLOCK", g, [1980 if not faulty or i < half else 1410 for i in range(SAMPLES)])
            s.add("DCGM_FI_DEV_XID_ERRORS", g, [79 if faulty and i >= half else 0 for i in range(SAMPLES)])
            s.add("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", g, [1 if faulty and i >= half else 0 for i in range(SAMPLES)])
            s.add("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", g, _const(1 if faulty else 0))
            s.add("DCGM_FI_DEV_POWER_VIOLATION", g, _counter(3e8 if faulty else 0, from_i=half))
            s.add("DCGM_FI_DEV_THERMAL_VIOLATION", g, _counter(1e8 if faulty else 0, from_i=half))
            s.add("DCGM_EXP_XID_ERRORS_COUNT", {**g, "xid": 79}, [1 if faulty and i >= half else 0 for i in range(SAMPLES)])
            s.add("DCGM_EXP_CLOCK_EVENTS_COUNT", {**g, "clock_event": "power_cap"},
                  [max(0, i - half) if faulty else 0 for i in range(SAMPLES)])
            for watch in ("MEM", "ALL"):
                s.add("DCGM_EXP_GPU_HEALTH_STATUS", {**g, "health_watch": watch},
                      [20 if faulty and i >= half else 0 for i in range(SAMPLES)])
            # ranks: one per GPU
            slow = rank == SLOW_RANK
            r = {"run": RUN, "rank": rank, "local_rank": gpu, "node": node, "instance": f"{node}:{9420 + gpu}",
                 "job": "rankwatch-probe"}
            s.add("rankwatch_rank_info", {**r, "world_size": 4, "gpu": gpu, "gpu_uuid": g["UUID"], "pp": rank // 2,
                                          "tp": 0, "dp": rank % 2}, _const(1))
            steps_per_s = 0.5
            s.add("rankwatch_steps_total", r, _counter(steps_per_s))
            s.add("rankwatch_step", r, [100 + i * STEP * steps_per_s for i in range(SAMPLES)])
            s.add("rankwatch_step_seconds_total", r, _counter(steps_per_s * 2.0))
            s.add("rankwatch_tokens_total", r, _counter(steps_per_s * 8192))
            s.add("rankwatch_last_step_timestamp_seconds", r, [T0 + i * STEP for i in range(SAMPLES)])
            for section, per_step in (("forward", 0.6), ("backward", 1.0), ("optimizer", 0.1), ("dataloader", 0.05),
                                      ("comm", 0.25)):
                if slow and section in ("forward", "backward"):
                    vals = [steps_per_s * STEP * (min(i, half) * per_step + max(0, i - half) * per_step * 1.15)
                            for i in range(SAMPLES)]
                elif section == "comm" and not slow:
                    vals = [steps_per_s * STEP * (min(i, half) * per_step + max(0, i - half) * (per_step + 0.24))
                            for i in range(SAMPLES)]
                else:
                    vals = _counter(steps_per_s * per_step)
                s.add("rankwatch_section_seconds_total", {**r, "section": section}, vals)
                s.add("rankwatch_section_count_total", {**r, "section": section}, _counter(steps_per_s))
            det = {"instance": "detector:9415", "job": "rankwatch-detector", "run": RUN, "rank": rank}
            s.add("rankwatch_detector_rank_score", det, [6.5 if slow and i >= half else 0.4 for i in range(SAMPLES)])
            s.add("rankwatch_detector_rank_flagged", det, [1 if slow and i > half + 4 else 0 for i in range(SAMPLES)])
            rank += 1
        for dev in DEVICES:
            bad = (node, dev) == IMPAIRED
            e = {"device": dev, "port": 1, "instance": inst, "job": "rankwatch-node"}
            s.add("node_amazonefa_info", {"device": dev, "instance": inst, "job": "rankwatch-node"}, _const(1))
            for counter, per_s in (("tx_bytes", 2e10), ("rx_bytes", 2e10), ("tx_pkts", 2e6), ("rx_pkts", 2e6),
                                   ("rdma_read_bytes", 5e9), ("rdma_write_bytes", 1e10), ("retrans_bytes", 1e5),
                                   ("rdma_read_wr_err", 0), ("rdma_write_wr_err", 0)):
                s.add(f"node_amazonefa_{counter}", e, _counter(per_s))
            s.add("node_amazonefa_retrans_pkts", e, _counter(2e3 if bad else 10))
            for counter in ("retrans_timeout_events", "unresponsive_remote_events", "impaired_remote_conn_events",
                            "rx_drops"):
                s.add(f"node_amazonefa_{counter}", e, _counter(0.05 if bad else 0, from_i=half))
    det = {"instance": "detector:9415", "job": "rankwatch-detector"}
    s.add("rankwatch_detector_events_total", {**det, "kind": "straggler", "state": "firing"},
          [1 if i > half + 4 else 0 for i in range(SAMPLES)])
    s.add("rankwatch_detector_events_total", {**det, "kind": "gpu_fault", "state": "firing"},
          [1 if i > half + 2 else 0 for i in range(SAMPLES)])
    return s.text()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory):
    wd = tmp_path_factory.mktemp("dash-prom")
    om = wd / "fleet.om"
    om.write_text(simulated_fleet())
    promserver.backfill_openmetrics(om, wd / "data", block_duration="2h")
    mp = promserver.start_prometheus("global: {scrape_interval: 15s}\n", workdir=wd / "prom", storage_dir=wd / "data")
    try:
        yield mp.url
    finally:
        mp.stop()


GRAFANA_RANGE = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "30m"}


def _substitute(expr: str, values: dict[str, str]) -> str:
    for key, val in GRAFANA_RANGE.items():
        expr = expr.replace(key, val)
    for name, val in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", val).replace("$" + name, val)
    assert "$" not in expr.replace("$1", ""), f"unresolved variable in {expr}"
    return expr


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def _resolve_variables(url: str, dashboard: dict[str, Any], end: int = END) -> dict[str, str]:
    """Run each variable's query as Grafana would (in order, earlier values substituted) and
    pick All (`.*`) for multi-selects, the first value otherwise. Every variable must offer values."""
    values: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        m = LABEL_VALUES.match(var["definition"])
        assert m, f"{dashboard['title']}: variable {var['name']} is not a label_values() query"
        params: dict[str, Any] = {"start": T0, "end": end}
        if m["selector"]:
            params["match[]"] = _substitute(m["selector"], values)
        body = requests.get(f"{url}/api/v1/label/{m['label']}/values", params=params, timeout=10).json()
        assert body["status"] == "success", body
        assert body["data"], f"{dashboard['title']}: variable {var['name']} offers no values"
        values[var["name"]] = var["allValue"] if var.get("includeAll") else sorted(body["data"])[0]
    return values


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out.append((f"{panel['title']} [{t['refId']}]", t["expr"], t.get("instant", False)))
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']}", ann["expr"], False))
    return out


def _returns_series(url: str, expr: str, instant: bool, end: int = END) -> list[dict[str, Any]]:
    if instant:
        params = {"query": expr, "time": end}
        body = requests.get(f"{url}/api/v1/query", params=params, timeout=10).json()
    else:
        params = {"query": expr, "start": T0 + 300, "end": end, "step": 60}
        body = requests.get(f"{url}/api/v1/query_range", params=params, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]["result"]


@pytest.mark.parametrize("file_name", sorted(render_all()))
def test_every_query_parses_and_returns_series(prometheus: str, file_name: str) -> None:
    dashboard = render_all()[file_name]
    values = _resolve_variables(prometheus, dashboard)
    empty = []
    queries = _queries(dashboard)
    assert len(queries) >= 8
    for where, expr, instant in queries:
        if not _returns_series(prometheus, _substitute(expr, values), instant):
            empty.append(f"{where}: {expr}")
    assert not empty, "queries returning no series:\n" + "\n".join(empty)


def test_straggler_stands_out_in_the_training_run_panels(prometheus: str) -> None:
    """The panels a user reads to find the straggler name rank 3 at the end of the window."""
    dashboard = render_all()["training-run.json"]
    values = _resolve_variables(prometheus, dashboard)
    targets = {p["title"]: p["targets"][0]["expr"] for p in dashboard["panels"] if p.get("targets")}

    def last_by_rank(title: str) -> dict[str, float]:
        result = _returns_series(prometheus, _substitute(targets[title], values), False)
        return {r["metric"]["rank"]: float(r["values"][-1][1]) for r in result}

    compute = last_by_rank("Compute time per step by rank")
    assert max(compute, key=compute.get) == str(SLOW_RANK)
    comm = last_by_rank("Comm wait per step by rank")
    assert min(comm, key=comm.get) == str(SLOW_RANK)
    lost = _returns_series(prometheus, _substitute(targets["Estimated throughput lost"], values), False)
    # Rank 3 computes 0.24 s longer than rank 2, its only stage peer; the median of two is their
    # mean, so it is 0.12 s over the median of a 2 s step: 6 % of every step.
    assert float(lost[0]["values"][-1][1]) == pytest.approx(0.06, abs=0.01)
    assert float(lost[0]["values"][0][1]) == pytest.approx(0.0, abs=0.01)


def test_fleet_table_lists_the_failing_and_the_lost_gpu(prometheus: str) -> None:
    dashboard = render_all()["gpu-health.json"]
    values = _resolve_variables(prometheus, dashboard)
    panel = next(p for p in dashboard["panels"] if p["title"] == "Fleet: GPUs not passing")
    result = _returns_series(prometheus, _substitute(panel["targets"][0]["expr"], values), True)
    rows = {(r["metric"]["Hostname"], r["metric"]["gpu"], r["metric"]["health_watch"], r["value"][1]) for r in result}
    assert rows == {(FAULTY[0], str(FAULTY[1]), "MEM", "20"), (FAULTY[0], str(FAULTY[1]), "ALL", "20"),
                    (LOST[0], str(LOST[1]), "NOT ANSWERING", "20")}


def test_efa_trouble_table_names_the_impaired_device(prometheus: str) -> None:
    dashboard = render_all()["efa-network.json"]
    values = _resolve_variables(prometheus, dashboard)
    panel = dashboard["panels"][0]
    result = _returns_series(prometheus, _substitute(panel["targets"][0]["expr"], values), True)
    assert {(r["metric"]["Hostname"], r["metric"]["device"]) for r in result} == {IMPAIRED}
    assert {r["metric"]["counter"] for r in result} >= {"impaired_remote_conn_events", "unresponsive_remote_events"}


def test_queries_fail_loudly_on_a_typo(prometheus: str) -> None:
    """The harness above would notice a broken query: a misspelt metric returns nothing and a
    syntax error is reported by Prometheus."""
    assert _returns_series(prometheus, 'rankwatch_stepz_total{run="x"}', False) == []
    with pytest.raises(AssertionError, match="bad_data"):
        _returns_series(prometheus, "sum by (rank (rate(x[1m]))", False)


def test_committed_json_is_current() -> None:
    from rankwatch.dashboards.build import dashboard_files, stale_files

    repo = Path(__file__).resolve().parents[1]
    assert stale_files(dashboard_files(), repo / "dashboards") == [], "run `make dashboards`"


# --- cross-check with the scenario generator's replay files (rankwatch.sim.scenario) ------------

METRIC_NAME = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*[{\[]")


@pytest.fixture(scope="module")
def scenario_prometheus(tmp_path_factory: pytest.TempPathFactory):
    """A small simulated job from the scenario generator (the replay format the detector and
    the demo use): a slow rank, a throttling GPU, an impaired NIC."""
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario(name="dash", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=600,
                  scrape_s=15, run="sim-dash", start_time=float(T0),
                  faults=[Fault("slowdown", rank=5, start_s=200, magnitude=0.2),
                          Fault("thermal", node=0, gpu=1, start_s=200, magnitude=0.2),
                          Fault("efa", node=1, start_s=200, magnitude=0.3)])
    wd = tmp_path_factory.mktemp("dash-scenario")
    om, _, _ = write_replay(sc, wd)
    families = set(re.findall(r"^# TYPE (\S+)", om.read_text(), re.M))
    promserver.backfill_openmetrics(om, wd / "data", block_duration="2h")
    mp = promserver.start_prometheus("global: {scrape_interval: 15s}\n", workdir=wd / "prom", storage_dir=wd / "data")
    try:
        yield mp.url, families
    finally:
        mp.stop()


def test_queries_against_the_scenario_generator(scenario_prometheus) -> None:
    """Every query parses on the generator's data, and every query over series the generator
    writes (counters there carry `_total` as the probe's do) returns series: the dashboards and
    the simulated job agree on names and labels."""
    url, families = scenario_prometheus
    names = families | {f + "_total" for f in families}
    end = T0 + 600
    checked = 0
    for dashboard in render_all().values():
        values = _resolve_variables(url, dashboard, end)
        for where, expr, instant in _queries(dashboard):
            result = _returns_series(url, _substitute(expr, values), instant, end)
            used = set(METRIC_NAME.findall(expr)) - {"by", "on", "without", "ignoring", "group_left"}
            filtered = " > 0" in expr or "== 1" in expr  # only shows trouble, and this run has little
            if used <= names and not filtered:
                assert result, f"{dashboard['title']} / {where}: no series from the generator's data"
                checked += 1
    assert checked >= 30


# --- the Grafana-managed alert rules (rankwatch.dashboards.alert_rules) ----------------------------

def test_every_grafana_alert_rule_query_runs_and_the_faults_fire(prometheus: str) -> None:
    """Query A of every generated Grafana alert rule (the alert's PromQL, run by Grafana as an
    instant query) parses on a real Prometheus holding the simulated fleet; over the window the
    alerts for the injected faults return series, i.e. their Grafana rules fire."""
    from rankwatch import assets
    from rankwatch.dashboards.alert_rules import grafana_rules

    rules = grafana_rules(assets.rule_files())
    assert rules
    firing = set()
    for rule in rules:
        query = rule["data"][0]
        assert query["refId"] == "A" and query["model"]["instant"] is True
        if _returns_series(prometheus, query["model"]["expr"], False):
            firing.add(rule["title"])
        # As Grafana evaluates it: an instant query at one time; it must parse there too.
        _returns_series(prometheus, query["model"]["expr"], True)
    # XID 79, the double-bit ECC errors and the GPU that stops answering (see simulated_fleet).
    assert {"RankwatchGpuXidHardware", "RankwatchGpuDoubleBitEcc", "RankwatchGpuLost"} <= firing, firing
