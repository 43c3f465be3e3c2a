"""One truth per rule: the exporter's health status, the detector's gpu_fault and the Prometheus
XID and EFA alerts say the same thing, because they come from one table and one rule; the
generated parts of the committed rule file are up to date.

Every XID of the table, and a code the table does not know, goes through the real GPU collector
(simulated NVML, the XID listener), the detector core and the committed alert rules under the
real promtool."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import promserver, rulegen, xids
from rankwatch.assets import rule_files
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.model import GpuObs, NicObs, Snapshot
from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.sim.nvml import SimulatedNVML

CODES = sorted(xids.XIDS) + [999]  # 999: a code nobody vetted
T0 = 1_750_000_000.0


def _exporter_status(codes: list[int]) -> dict[int, int]:
    """DCGM_EXP_GPU_HEALTH_STATUS (worst watch) of a GPU after it raised each XID, one GPU per code."""
    out: dict[int, int] = {}
    for start in range(0, len(codes), 8):
        batch = codes[start:start + 8]
        sim = SimulatedNVML("n", seed=1)
        collector = GpuCollector(nvml=sim, xid_wait_ms=200)
        try:
            for gpu, code in enumerate(batch):
                sim.inject(gpu, "xid", xid=code)
            deadline = time.monotonic() + 120  # only against a hang: the loop waits for the data
            while True:
                fams = {f.name: f for f in text_string_to_metric_families(render(collector.collect()).decode())}
                seen = {(s.labels["gpu"], s.labels["xid"]) for s in fams["DCGM_EXP_XID_ERRORS_COUNT"].samples
                        if s.value >= 1}
                if all((str(g), str(c)) in seen for g, c in enumerate(batch)):
                    break
                assert time.monotonic() < deadline, f"the XID listener never delivered {batch}"
                time.sleep(0.02)
            for gpu, code in enumerate(batch):
                out[code] = int(max(s.value for s in fams["DCGM_EXP_GPU_HEALTH_STATUS"].samples
                                    if s.labels["gpu"] == str(gpu)))
        finally:
            collector.close()
    return out


def _detector_severity(code: int) -> str | None:
    events = DetectorCore().evaluate(Snapshot(time=T0, window_s=15.0, gpus=[
        GpuObs(node="n", gpu="0", xid_increase={code: 1.0})]))
    severities = {e.severity for e in events if e.kind == "gpu_fault" and e.state == "firing"}
    assert len(severities) <= 1
    return severities.pop() if severities else None


def _annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    """The alert's annotations as the committed rules write them, for templates that use only
    ``{{ $labels.NAME }}`` (the XID alerts)."""
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    out = {}
                    for k, v in rule["annotations"].items():
                        for name, value in labels.items():
                            v = v.replace(f"{{{{ $labels.{name} }}}}", value)
                        assert "{{" not in v, v
                        out[k] = v
                    return out
    raise AssertionError(f"no alert {alert}")


def _promtool_alerts(codes: list[int], tmp_path: Path, expect: dict[int, str | None]) -> None:
    """Run the committed rules under promtool with one XID series per code and the given
    expectation (alert name per code, None = no XID alert)."""
    series = [{"series": f'DCGM_EXP_XID_ERRORS_COUNT{{xid="{c}",gpu="{i}",UUID="GPU-{i}",Hostname="n",'
                         f'instance="n:9410",job="node"}}', "values": "0x10 1x20"} for i, c in enumerate(codes)]
    cases = []
    for alert in ("RankwatchGpuXidHardware", "RankwatchGpuXidOther"):
        firing = [(i, c) for i, c in enumerate(codes) if expect[c] == alert]
        exp = []
        for i, c in firing:
            labels = {"severity": "critical" if alert.endswith("Hardware") else "warning",
                      "xid_class": "hardware" if alert.endswith("Hardware") else "other", "xid": str(c),
                      "gpu": str(i), "UUID": f"GPU-{i}", "Hostname": "n", "instance": "n:9410", "job": "node"}
            exp.append({"exp_labels": labels, "exp_annotations": _annotations(alert, labels)})
        cases.append({"eval_time": "15m30s", "alertname": alert, "exp_alerts": exp})
    doc = {"rule_files": [str(p) for p in rule_files()], "evaluation_interval": "30s",
           "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}]}
    path = tmp_path / "xids.test.yml"
    path.write_text(yaml.safe_dump(doc))
    res = promserver.promtool("test", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_exporter_detector_and_alert_rules_classify_every_xid_alike(tmp_path: Path) -> None:
    status = _exporter_status(CODES)
    severity = {c: _detector_severity(c) for c in CODES}
    by_status = {xids.FAIL: ("critical", "RankwatchGpuXidHardware"), xids.WARN: ("warning", "RankwatchGpuXidOther"),
                 xids.PASS: (None, None)}
    for code in CODES:
        sev, alert = by_status[status[code]]
        assert severity[code] == sev, f"XID {code}: exporter status {status[code]}, detector {severity[code]}"
    _promtool_alerts(CODES, tmp_path, {c: by_status[status[c]][1] for c in CODES})
    # all three classes occur, so the comparison covers each of them
    assert {status[c] for c in CODES} == {xids.PASS, xids.WARN, xids.FAIL}
    assert status[999] == xids.WARN and severity[79] == "critical" and severity[13] is None


def test_committed_rules_are_generated_from_the_tables(capsys) -> None:
    path = rulegen.alert_file()
    text = path.read_text()
    assert rulegen.render(text) == text, "alerts/rankwatch-alerts.yml is stale: run `make rules`"
    assert rulegen.main(["--check"]) == 0
    fail_codes = "|".join(str(c) for c in xids.codes(xids.FAIL))
    assert f'xid=~"{fail_codes}"' in text


def test_stale_rules_are_reported_and_rewritten(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rankwatch-alerts.yml"
    text = rulegen.alert_file().read_text()
    path.write_text(text.replace('xid=~"48|', 'xid=~"63|48|'))
    assert rulegen.main(["--check", str(path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert rulegen.main([str(path)]) == 0
    assert path.read_text() == text
    # a file without the markers is an error that names it
    bad = tmp_path / "other.yml"
    bad.write_text("groups: []\n")
    assert rulegen.main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize(("errors", "packets", "fires"), [
    (300.0, 1e7, True),  # 30 per million packets, 1 per second over 5 min
    (300.0, 1e8, False),  # the same errors on a NIC ten times busier: 3 per million
    (140.0, 0.0, False),  # an idle NIC: under the floor of 0.5 per second
])
def test_detector_and_prometheus_network_rules_agree(errors: float, packets: float, fires: bool,
                                                      tmp_path: Path) -> None:
    # the detector, over a 300 s window so that both see the same counts
    core = DetectorCore()
    nic = NicObs(node="n1", device="rdmap16s27", increase={"retrans_pkts": errors, "tx_pkts": packets / 2,
                                                           "rx_pkts": packets / 2})
    events = []
    for k in range(3):  # network_persist_windows evaluations
        events += core.evaluate(Snapshot(time=T0 + 300 * k, window_s=300.0, nics=[nic]))
    assert bool([e for e in events if e.kind == "network"]) == fires
    # Prometheus: the same counts per 5 min, as counters growing each minute
    per_min_e, per_min_p = errors / 5, packets / 5

    def s(name: str, step: float) -> dict:
        return {"series": f'node_amazonefa_{name}{{device="rdmap16s27",port="1",instance="n1:9410",job="node"}}',
                "values": f"0+{step:g}x40"}

    doc = {"rule_files": [str(p) for p in rule_files()], "evaluation_interval": "30s", "tests": [{
        "interval": "1m",
        "input_series": [s("retrans_pkts", per_min_e), s("tx_pkts", per_min_p / 2), s("rx_pkts", per_min_p / 2)],
        "alert_rule_test": [{"eval_time": "20m30s", "alertname": "RankwatchEfaErrorsRising", "exp_alerts": [
            {"exp_labels": {"severity": "warning", "device": "rdmap16s27", "port": "1", "instance": "n1:9410"},
             "exp_annotations": {
                 "summary": "EFA rdmap16s27 on n1:9410: 30 errors per million packets",
                 "description": "EFA device rdmap16s27 port 1 (n1:9410) counted 30 error events per million packets "
                                "it sent and received over 5 min (threshold 10, and at least 150 events). Collectives "
                                "through this NIC are retried or rerouted; the job slows to its pace.",
                 "runbook_url": rulegen.RUNBOOK.format("RankwatchEfaErrorsRising")}}]
            if fires else []}]}]}
    path = tmp_path / "efa.test.yml"
    path.write_text(yaml.safe_dump(doc))
    res = promserver.promtool("test", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
