"""Create or update the Grafana-managed alert rules through Grafana's alerting provisioning
HTTP API, one call per rule group: ``PUT /api/v1/provisioning/folder/{uid}/rule-groups/{group}``
replaces the group (its rules created, changed or removed together) and sets its interval.

Each group is read first and left alone when Grafana already holds the same rules, so a second
push changes nothing. Rules pushed this way carry provenance "api": Grafana shows them as
provisioned and refuses edits in the UI, which keeps ``alerts/`` the single source of truth;
``editable`` sends ``X-Disable-Provenance`` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rankwatch.dashboards.alert_rules import FOLDER_TITLE, FOLDER_UID, api_rule_groups
from rankwatch.dashboards.push import GrafanaClient
from rankwatch.errors import RankwatchError
from rankwatch.rulefiles import duration_seconds

log = logging.getLogger(__name__)

# The name the dashboards' $datasource variable opens on (rankwatch.dashboards.common).
DASHBOARD_DATASOURCE_NAME = "Prometheus"
# Rule fields rankwatch sets; anything else Grafana stores (ids, updated, provenance...) is ignored
# when deciding whether a group changed.
COMPARED = ("uid", "title", "condition", "noDataState", "execErrState", "annotations", "labels", "isPaused")
OPTIONAL_DURATIONS = ("keepFiringFor",)


@dataclass
class GroupResult:
    title: str
    action: str  # "created", "updated", "unchanged"
    rules: int


def dashboard_datasource(client: GrafanaClient, uid: str | None = None) -> str:
    """The uid of the Prometheus datasource the alert rules query: ``uid`` if it exists, else the
    one the dashboards' ``$datasource`` variable opens on (the datasource named "Prometheus",
    else the default Prometheus datasource, else the only one)."""
    if uid:
        resp = client.call("GET", f"/api/datasources/uid/{quote(uid, safe='')}")
        if resp.status_code == 404:
            raise RankwatchError(f"Grafana has no datasource with uid {uid!r} (see Connections → Data sources)")
        if resp.status_code != 200:
            raise RankwatchError(f"Grafana: reading datasource {uid!r} failed ({resp.status_code}): "
                                 f"{client.message(resp)}")
        return uid
    resp = client.call("GET", "/api/datasources")
    if resp.status_code != 200:
        raise RankwatchError(f"Grafana: listing datasources failed ({resp.status_code}): {client.message(resp)}")
    prom = [d for d in resp.json() if d.get("type") == "prometheus"]
    for pick in ([d for d in prom if d.get("name") == DASHBOARD_DATASOURCE_NAME], [d for d in prom if d.get("isDefault")],
                 prom if len(prom) == 1 else []):
        if pick:
            return str(pick[0]["uid"])
    names = ", ".join(f"{d.get('name')} ({d.get('uid')})" for d in prom) or "none"
    raise RankwatchError(f"cannot tell which Prometheus datasource the alert rules should query (prometheus "
                         f"datasources: {names}); pass --datasource-uid")


def _comparable(rule: dict[str, Any]) -> dict[str, Any]:
    out = {k: rule.get(k) for k in COMPARED}
    out["annotations"] = out["annotations"] or {}
    out["labels"] = out["labels"] or {}
    out["for_s"] = duration_seconds(str(rule.get("for") or "0s"))
    for key in OPTIONAL_DURATIONS:
        out[key] = duration_seconds(str(rule.get(key) or "0s"))
    out["data"] = [(q.get("refId"), q.get("datasourceUid"), q.get("relativeTimeRange"), q.get("model"))
                   for q in rule.get("data") or []]
    return out


def _same(stored: dict[str, Any], desired: dict[str, Any]) -> bool:
    if int(stored.get("interval") or 0) != desired["interval"]:
        return False
    theirs = stored.get("rules") or []
    if len(theirs) != len(desired["rules"]):
        return False
    for have, want in zip(theirs, desired["rules"], strict=True):
        mine = _comparable(want)
        # Grafana may add model defaults; only the keys rankwatch sets are compared.
        got = _comparable(have)
        got["data"] = [(ref, ds, rng, {k: (model or {}).get(k) for k in want_model})
                       for (ref, ds, rng, model), (_, _, _, want_model) in zip(got["data"], mine["data"], strict=False)]
        if got != mine:
            return False
    return True


def push_alert_rules(client: GrafanaClient, rule_files: list[Path], *, folder_uid: str = FOLDER_UID,
                     folder_title: str = FOLDER_TITLE, datasource_uid: str | None = None,
                     overwrite: bool = True, editable: bool = False) -> list[GroupResult]:
    """Create or update one Grafana rule group per group of ``rule_files``."""
    folder = client.ensure_folder(folder_uid, folder_title)
    datasource = dashboard_datasource(client, datasource_uid)
    headers = {"X-Disable-Provenance": "true"} if editable else {}
    results = []
    for group in api_rule_groups(rule_files, datasource, folder):
        path = f"/api/v1/provisioning/folder/{quote(folder, safe='')}/rule-groups/{quote(group['title'], safe='')}"
        resp = client.call("GET", path)
        if resp.status_code == 200:
            stored = resp.json()
            if _same(stored, group):
                results.append(GroupResult(group["title"], "unchanged", len(group["rules"])))
                continue
            if not overwrite and stored.get("rules"):
                raise RankwatchError(f"alert rule group {group['title']!r} in folder {folder!r} differs from alerts/ "
                                     "(changed in Grafana?); rerun with --overwrite to replace it")
            action = "updated" if stored.get("rules") else "created"
        elif resp.status_code == 404:
            action = "created"
        else:
            raise RankwatchError(f"Grafana: reading alert rule group {group['title']!r} failed ({resp.status_code}): "
                                 f"{client.message(resp)}")
        resp = client.call("PUT", path, group, headers=headers)
        if resp.status_code == 403:
            raise RankwatchError(f"Grafana refused alert rule group {group['title']!r} (403): {client.message(resp)}; "
                                 "rules provisioned from files (provisioning/alerting, the grafana_alert ConfigMap) "
                                 "can only change there, and the service account needs alert rule write access")
        if resp.status_code == 409:
            raise RankwatchError(f"alert rule group {group['title']!r} changed in Grafana while this push wrote it "
                                 f"(409 conflict: {client.message(resp)}); rerun the push")
        if resp.status_code != 200:
            raise RankwatchError(f"Grafana refused alert rule group {group['title']!r} ({resp.status_code}): "
                                 f"{client.message(resp)}")
        log.info("%s Grafana alert rule group %r (%d rules)", action, group["title"], len(group["rules"]))
        results.append(GroupResult(group["title"], action, len(group["rules"])))
    return results
