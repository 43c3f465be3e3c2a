"""Grafana-managed alert rules (Grafana ≥ 10, Amazon Managed Grafana) made from the Prometheus
alerting rules in ``alerts/``: one Grafana rule per alert, same PromQL, ``for``, labels,
annotations and runbook link, querying the Prometheus datasource the dashboards open on.

Each rule evaluates like the Prometheus rule it comes from (the scheme Grafana's own
Prometheus-rule importer uses): query A is the alert's PromQL as an instant query, so it
returns exactly the series Prometheus would alert on; B is the math expression
``is_number($A) || is_nan($A) || is_inf($A)`` and C the threshold ``B > 0``, which fire for
every series A returns, whatever its value (a GPU count of 0 included; a reduce step would
add nothing to an instant query's single value). No series means not firing (noDataState
OK), as in Prometheus; a failing query is an Error state, never a silent OK.

Two renderings: the file-provisioning YAML (``apiVersion: 1``, groups with folder/interval/
rules) with its Kubernetes ConfigMap for the Grafana sidecar, and the rule groups the
provisioning HTTP API takes (``PUT /api/v1/provisioning/folder/{uid}/rule-groups/{group}``).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rankwatch.errors import InputError
from rankwatch.rulefiles import AlertRule, alert_rules, dump_yaml, duration_seconds

# The uid of the datasource the dashboards' $datasource variable opens on where rankwatch
# provisions it (docker compose: dashboards/provisioning/datasources) and kube-prometheus-stack's.
DEFAULT_DATASOURCE_UID = "prometheus"
FOLDER_UID = "rankwatch"
FOLDER_TITLE = "rankwatch"
# Grafana's default and the usual Prometheus evaluation_interval of the shipped configs is 15 s;
# 30 s halves the query load on a big fleet and still evaluates a `for: 1m` rule twice.
DEFAULT_INTERVAL = "30s"
# How far back the instant query may look: PromQL range selectors carry their own windows, this
# only bounds what Grafana asks the datasource for.
QUERY_RANGE_S = 600
EXPR_UID = "__expr__"
PROVISIONING_FILE = "rankwatch-alert-rules.yaml"
CONFIGMAP_FILE = "grafana-alert-rules.yaml"

# Grafana's $value is a summary of every query and expression; the alert's PromQL value is
# $values.A.Value.
_VALUE = re.compile(r"\$value\b")


def grafana_annotations(annotations: dict[str, str]) -> dict[str, str]:
    """Prometheus annotation templates as Grafana evaluates them."""
    return {k: _VALUE.sub("$values.A.Value", v) for k, v in annotations.items()}


def rule_uid(rule: AlertRule, occurrence: int) -> str:
    """A stable uid (Grafana: at most 40 of [A-Za-z0-9_-]) from the group, name and occurrence."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", rule.name).strip("-")[:24]
    digest = hashlib.sha1(f"{rule.group}/{rule.name}/{occurrence}".encode()).hexdigest()[:10]
    return f"rw-{slug}-{digest}"


def _queries(expr: str, datasource_uid: str) -> list[dict[str, Any]]:
    ds = {"type": "prometheus", "uid": datasource_uid}
    expr_ds = {"type": "__expr__", "uid": EXPR_UID}
    return [
        {"refId": "A", "relativeTimeRange": {"from": QUERY_RANGE_S, "to": 0}, "datasourceUid": datasource_uid,
         "model": {"refId": "A", "datasource": ds, "expr": expr, "instant": True, "range": False,
                   "intervalMs": 1000, "maxDataPoints": 43200}},
        {"refId": "B", "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": EXPR_UID,
         "model": {"refId": "B", "datasource": expr_ds, "type": "math",
                   "expression": "is_number($A) || is_nan($A) || is_inf($A)"}},
        {"refId": "C", "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": EXPR_UID,
         "model": {"refId": "C", "datasource": expr_ds, "type": "threshold", "expression": "B",
                   "conditions": [{"evaluator": {"type": "gt", "params": [0]}}]}},
    ]


def grafana_rules(files: Iterable[Path], datasource_uid: str = DEFAULT_DATASOURCE_UID) -> list[dict[str, Any]]:
    """One Grafana rule per alerting rule of ``files`` (API field names), in source order.

    Grafana names an alert by its rule title and wants titles unique in a folder; an alert
    name used by several rules gets its group and position appended."""
    rules = alert_rules(files)
    if not rules:
        raise InputError("no alerting rules in the rule files")
    counts = Counter(r.name for r in rules)
    seen: Counter[str] = Counter()
    out = []
    for r in rules:
        occurrence = seen[r.name]
        seen[r.name] += 1
        title = r.name if counts[r.name] == 1 else f"{r.name} ({r.group} #{occurrence + 1})"
        for_s = duration_seconds(r.for_)
        extra = {"keepFiringFor": r.keep_firing_for} if r.keep_firing_for else {}  # Grafana >= 11.6
        out.append({
            "uid": rule_uid(r, occurrence),
            "title": title,
            "ruleGroup": r.group,
            "condition": "C",
            "data": _queries(r.expr, datasource_uid),
            "noDataState": "OK",
            "execErrState": "Error",
            "for": r.for_ or "0s",
            "annotations": grafana_annotations(r.annotations),
            "labels": dict(r.labels),
            "isPaused": False,
            **extra,
            "_interval": r.interval or DEFAULT_INTERVAL,
            "_for_s": for_s,
        })
    return out


def _groups(rules: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        groups.setdefault(rule["ruleGroup"], []).append(rule)
    return groups


def _public(rule: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rule.items() if not k.startswith("_")}


def api_rule_groups(files: Iterable[Path], datasource_uid: str, folder_uid: str) -> list[dict[str, Any]]:
    """The bodies for ``PUT /api/v1/provisioning/folder/{folder_uid}/rule-groups/{title}``."""
    out = []
    for name, rules in _groups(grafana_rules(files, datasource_uid)).items():
        out.append({"title": name, "folderUid": folder_uid,
                    "interval": int(duration_seconds(rules[0]["_interval"])),
                    "rules": [{**_public(r), "folderUID": folder_uid, "orgID": 1} for r in rules]})
    return out


def _escape_env(value: str) -> str:
    # File provisioning expands $VAR in labels (not in annotations or query models): $$ is a $.
    return value.replace("$", "$$")


def provisioning_file(files: Iterable[Path], datasource_uid: str = DEFAULT_DATASOURCE_UID,
                      folder: str = FOLDER_TITLE) -> str:
    """The alert rules as a Grafana file-provisioning document (provisioning/alerting/*.yaml)."""
    groups = []
    for name, rules in _groups(grafana_rules(files, datasource_uid)).items():
        entries = []
        for r in rules:
            if any("${" in v for v in r["annotations"].values()):
                raise InputError(f"alert {r['title']}: an annotation contains '${{', which Grafana's file "
                                 "provisioning would replace with an environment variable")
            entries.append({
                "uid": r["uid"], "title": r["title"], "condition": r["condition"], "data": r["data"],
                "noDataState": r["noDataState"], "execErrState": r["execErrState"], "for": r["for"],
                "annotations": r["annotations"],
                "labels": {k: _escape_env(v) for k, v in r["labels"].items()},
                "isPaused": r["isPaused"],
                **({"keepFiringFor": r["keepFiringFor"]} if "keepFiringFor" in r else {}),
            })
        groups.append({"orgId": 1, "name": name, "folder": folder, "interval": rules[0]["_interval"],
                       "rules": entries})
    header = ("# Grafana alert rules generated from alerts/rankwatch-*.yml by `make dashboards`\n"
              "# (rankwatch.dashboards.alert_rules); do not edit. Mount at /etc/grafana/provisioning/alerting/.\n")
    return header + dump_yaml({"apiVersion": 1, "groups": groups})


def alert_rules_configmap(provisioning_text: str) -> dict[str, Any]:
    """A ConfigMap the Grafana alerts sidecar (label grafana_alert) loads into
    /etc/grafana/provisioning/alerting and reloads (kube-prometheus-stack:
    grafana.sidecar.alerts.enabled=true)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "rankwatch-grafana-alert-rules",
                     "labels": {"app.kubernetes.io/part-of": "rankwatch", "grafana_alert": "1"}},
        "data": {PROVISIONING_FILE: provisioning_text},
    }
