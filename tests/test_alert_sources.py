"""One source of truth: alerts/rankwatch-*.yml. The Prometheus rules, the PrometheusRule that
Kubernetes applies, the rule groups namespace uploaded to AMP and the Grafana alert rules (file
provisioning, sidecar ConfigMap and provisioning API bodies) carry the same alerts with the same
expressions, `for`, labels and annotations, whatever rules alerts/ holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from rankwatch import assets
from rankwatch.cli import main
from rankwatch.dashboards.alert_rules import (
    CONFIGMAP_FILE,
    PROVISIONING_FILE,
    api_rule_groups,
    grafana_annotations,
)
from rankwatch.rulefiles import duration_seconds

REPO = Path(__file__).resolve().parents[1]
TOPIC = "arn:aws:sns:us-west-2:123456789012:rankwatch-alerts"

# group, name, expr, for (s), labels, annotations, keep_firing_for (s)
Alert = tuple[str, str, str, float, tuple, tuple, float]


def _items(d: dict[str, Any] | None) -> tuple:
    return tuple(sorted((str(k), str(v)) for k, v in (d or {}).items()))


def from_prometheus_groups(groups: list[dict[str, Any]]) -> list[Alert]:
    return [(g["name"], r["alert"], r["expr"], duration_seconds(str(r.get("for") or "")), _items(r.get("labels")),
             _items(grafana_annotations(r.get("annotations") or {})),
             duration_seconds(str(r.get("keep_firing_for") or "")))
            for g in groups for r in g["rules"] if "alert" in r]


def from_grafana_rules(groups: list[tuple[str, list[dict[str, Any]]]], *, file_provisioning: bool) -> list[Alert]:
    out = []
    for group, rules in groups:
        for r in rules:
            query = next(q for q in r["data"] if q["refId"] == "A")
            labels = r.get("labels") or {}
            if file_provisioning:  # $$ is how the file writes a literal $ in a label
                labels = {k: v.replace("$$", "$") for k, v in labels.items()}
            # Grafana wants unique titles: an alert name used twice gets " (group #n)" appended.
            name = re.sub(r" \(\S+ #\d+\)$", "", r["title"])
            out.append((group, name, query["model"]["expr"], duration_seconds(r["for"]), _items(labels),
                        _items(r.get("annotations")), duration_seconds(str(r.get("keepFiringFor") or ""))))
    return out


def source_alerts() -> list[Alert]:
    groups = [g for f in assets.rule_files() for g in yaml.safe_load(f.read_text())["groups"]]
    return from_prometheus_groups(groups)


@pytest.fixture(scope="module")
def renderings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Alert]]:
    out = tmp_path_factory.mktemp("amp")
    assert main(["deploy", "amp", "--dry-run", "--out", str(out), "--sns-topic-arn", TOPIC]) == 0
    amp = yaml.safe_load((out / "rule-groups-namespace-rankwatch.yaml").read_text())["groups"]
    crd = yaml.safe_load((REPO / "deploy/kubernetes/base/generated/prometheusrule.yaml").read_text())
    provisioning = yaml.safe_load((REPO / "dashboards/alerting" / PROVISIONING_FILE).read_text())
    configmap = yaml.safe_load((REPO / "deploy/kubernetes/base/generated" / CONFIGMAP_FILE).read_text())
    cm_doc = yaml.safe_load(configmap["data"][PROVISIONING_FILE])
    api = api_rule_groups(assets.rule_files(), "prometheus", "rankwatch")
    return {
        "PrometheusRule (deploy/kubernetes/base/generated)": from_prometheus_groups(crd["spec"]["groups"]),
        "AMP rule groups namespace (deploy amp --dry-run)": from_prometheus_groups(amp),
        "Grafana file provisioning (dashboards/alerting)": from_grafana_rules(
            [(g["name"], g["rules"]) for g in provisioning["groups"]], file_provisioning=True),
        "Grafana sidecar ConfigMap": from_grafana_rules(
            [(g["name"], g["rules"]) for g in cm_doc["groups"]], file_provisioning=True),
        "Grafana provisioning API (dashboards push --alerts)": from_grafana_rules(
            [(g["title"], g["rules"]) for g in api], file_provisioning=False),
    }


def _differences(source: list[Alert], other: list[Alert]) -> list[str]:
    problems = []
    names = {a[1] for a in source}
    missing = [a for a in source if a not in other]
    extra = [a for a in other if a not in source]
    for a in missing:
        problems.append(f"missing or different: {a[0]}/{a[1]}")
    for a in extra:
        problems.append(f"{'differs' if a[1] in names else 'not in alerts/'}: {a[0]}/{a[1]}")
    if not problems and [a[:2] for a in source] != [a[:2] for a in other]:
        problems.append("same alerts in another order")
    return problems


def test_source_has_alerts() -> None:
    alerts = source_alerts()
    assert alerts and len({(a[0], a[1]) for a in alerts}) == len(alerts)


@pytest.mark.parametrize("where", [
    "PrometheusRule (deploy/kubernetes/base/generated)",
    "AMP rule groups namespace (deploy amp --dry-run)",
    "Grafana file provisioning (dashboards/alerting)",
    "Grafana sidecar ConfigMap",
    "Grafana provisioning API (dashboards push --alerts)",
])
def test_every_rendering_carries_the_same_alerts(renderings: dict[str, list[Alert]], where: str) -> None:
    problems = _differences(source_alerts(), renderings[where])
    assert not problems, f"{where} drifted from alerts/ (run `make dashboards`):\n" + "\n".join(problems)


def test_the_comparison_notices_drift(renderings: dict[str, list[Alert]]) -> None:
    """A changed expression, a lost `for`, a dropped alert and an extra one are all reported."""
    source = source_alerts()
    grafana = list(renderings["Grafana provisioning API (dashboards push --alerts)"])
    changed = grafana[0][:2] + (grafana[0][2] + " > 1",) + grafana[0][3:]
    lost_for = next(i for i, a in enumerate(grafana) if a[3] > 0)
    drifted = [changed, *grafana[1:]]
    drifted[lost_for] = drifted[lost_for][:3] + (0.0,) + drifted[lost_for][4:]
    problems = _differences(source, drifted[:-1] + [("extra", "RankwatchNew", "up", 0.0, (), (), 0.0)])
    text = "\n".join(problems)
    assert f"differs: {grafana[0][0]}/{grafana[0][1]}" in text
    assert f"differs: {grafana[lost_for][0]}/{grafana[lost_for][1]}" in text
    assert f"missing or different: {source[-1][0]}/{source[-1][1]}" in text
    assert "not in alerts/: extra/RankwatchNew" in text
