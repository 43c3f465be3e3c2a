"""A local stand-in for the few Grafana HTTP API endpoints `rankwatch dashboards push` uses,
with Grafana's status codes and bodies: 401 for a wrong token, 404 for a missing folder or
dashboard, 409 for a duplicate folder, 412 `version-mismatch` / `name-exists` when a save
without overwrite would lose someone else's change. It also speaks the alerting provisioning
API's rule groups (`/api/v1/provisioning/folder/{uid}/rule-groups/{group}`) with Grafana's
validation (400: unknown datasource, condition not a refId, title not unique in the folder),
provenance (403: rules provisioned from files, or by the API when X-Disable-Provenance asks
for editable ones, cannot change provenance) and 409 for a concurrent writer. State lives in
memory."""

from __future__ import annotations

import json
import re
import threading
from typing import Any
from urllib.parse import unquote

from rankwatch.sim.local_api import LocalJsonApi


class FakeGrafana(LocalJsonApi):
    """``with FakeGrafana(token="t") as g: g.url`` — serves on 127.0.0.1, a free port."""

    def __init__(self, token: str, datasources: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.token = token
        self.datasources = datasources if datasources is not None else [
            {"id": 1, "uid": "prometheus", "name": "Prometheus", "type": "prometheus", "isDefault": True}]
        # (folder uid, group) → {"title", "folderUid", "interval", "rules": [rule with "provenance"]}
        self.rule_groups: dict[tuple[str, str], dict[str, Any]] = {}
        self.conflict_next_write = False  # answer the next rule group write 409 (a concurrent writer won)
        self.request_headers: dict[str, str] = {}  # headers of the request being handled
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid → {"dashboard", "folderUid", "version"}
        self._lock = threading.Lock()
        self._ids = 0

    def edit_in_ui(self, uid: str) -> None:
        """What a user saving the dashboard in the Grafana UI does: a new version."""
        with self._lock:
            self.dashboards[uid]["version"] += 1
            self.dashboards[uid]["dashboard"]["version"] = self.dashboards[uid]["version"]

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # --- API -------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            if m := re.fullmatch(r"/api/folders/([^/?]+)", path):
                folder = self.folders.get(m[1])
                if method == "GET":
                    return (200, folder) if folder else (404, {"message": "folder not found", "status": "not-found"})
            if path.startswith("/api/folders") and method == "GET":
                return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]
            if path == "/api/folders" and method == "POST":
                uid, title = body.get("uid"), body.get("title")
                if not title:
                    return 400, {"message": "folder title cannot be empty"}
                if uid in self.folders or any(f["title"] == title for f in self.folders.values()):
                    return 409, {"message": "a folder with the same name or uid already exists"}
                self.folders[uid] = {"id": self._next_id(), "uid": uid, "title": title, "version": 1}
                return 200, self.folders[uid]
            if m := re.fullmatch(r"/api/dashboards/uid/([^/?]+)", path):
                stored = self.dashboards.get(m[1])
                if not stored:
                    return 404, {"message": "Dashboard not found"}
                return 200, {"dashboard": stored["dashboard"],
                             "meta": {"folderUid": stored["folderUid"], "version": stored["version"]}}
            if path == "/api/dashboards/db" and method == "POST":
                return self._save(body)
            if path == "/api/datasources" and method == "GET":
                return 200, self.datasources
            if m := re.fullmatch(r"/api/datasources/uid/([^/?]+)", path):
                found = [d for d in self.datasources if d["uid"] == unquote(m[1])]
                return (200, found[0]) if found else (404, {"message": "Data source not found"})
            if m := re.fullmatch(r"/api/v1/provisioning/folder/([^/?]+)/rule-groups/([^/?]+)", path):
                key = (unquote(m[1]), unquote(m[2]))
                if method == "GET":
                    group = self.rule_groups.get(key)
                    return (200, group) if group else (404, {"message": "rule group not found under this namespace"})
                if method == "PUT":
                    return self._put_rule_group(key, body)
        return 404, {"message": "Not found"}

    # --- alerting provisioning ---------------------------------------------------------------
    def _put_rule_group(self, key: tuple[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        folder_uid, title = key
        if folder_uid not in self.folders:
            return 404, {"message": "folder not found"}
        provenance = "" if any(k.lower() == "x-disable-provenance" for k in self.request_headers) else "api"
        known = {d["uid"] for d in self.datasources} | {"__expr__"}
        rules = body.get("rules") or []
        others = {r["title"] for k, g in self.rule_groups.items() if k[0] == folder_uid and k != key for r in g["rules"]}
        for rule in rules:
            name = rule.get("title") or ""
            if not name or len(name) > 190:
                return 400, {"message": "invalid alert rule: title is empty or longer than 190 characters"}
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule.get("uid") or ""):
                return 400, {"message": f"invalid alert rule {name}: uid {rule.get('uid')!r} is not valid"}
            refs = [q.get("refId") for q in rule.get("data") or []]
            if rule.get("condition") not in refs:
                return 400, {"message": f"invalid alert rule {name}: condition {rule.get('condition')} does not "
                             f"exist, must be one of {refs}"}
            for q in rule.get("data") or []:
                if q.get("datasourceUid") not in known:
                    return 400, {"message": f"invalid alert rule {name}: data source {q.get('datasourceUid')} "
                                 "not found"}
            if rule.get("noDataState") not in ("NoData", "Alerting", "OK") or \
                    rule.get("execErrState") not in ("Error", "Alerting", "OK", "KeepLast"):
                return 400, {"message": f"invalid alert rule {name}: unknown noDataState/execErrState"}
            if name in others:
                return 400, {"message": "a conflicting alert rule is found: rule title under the same "
                             "organisation and folder should be unique"}
        stored = {r["uid"]: r for g in self.rule_groups.values() for r in g["rules"]}
        for rule in rules:
            before = stored.get(rule["uid"], {}).get("provenance")
            if before is not None and before != provenance and (before == "file" or provenance == ""):
                return 403, {"message": f"Resource with provenance status '{before}' cannot be changed to "
                             f"'{provenance}'. You must use appropriate API and permissions to manage this resource"}
        if self.conflict_next_write:
            self.conflict_next_write = False
            return 409, {"message": "failed to update rule group: optimistic lock: the rule group was changed"}
        saved = []
        for rule in rules:
            prior = stored.get(rule["uid"], {})
            saved.append({**rule, "id": prior.get("id") or self._next_id(), "orgID": 1, "folderUID": folder_uid,
                          "ruleGroup": title, "provenance": provenance, "updated": "2026-01-01T00:00:00Z"})
        self.rule_groups[key] = {"title": title, "folderUid": folder_uid, "interval": int(body.get("interval") or 60),
                                 "rules": saved}
        return 200, {"title": title, "folderUid": folder_uid, "interval": self.rule_groups[key]["interval"],
                     "rules": saved}

    def _save(self, body: dict[str, Any]) -> tuple[int, Any]:
        dash = dict(body.get("dashboard") or {})
        overwrite = bool(body.get("overwrite"))
        folder_uid = body.get("folderUid") or ""
        if folder_uid and folder_uid not in self.folders:
            return 400, {"message": "folder not found", "status": "not-found"}
        uid = dash.get("uid")
        if not uid or not dash.get("title"):
            return 400, {"message": "Dashboard title cannot be empty"}
        stored = self.dashboards.get(uid)
        if not overwrite:
            if stored and dash.get("version") != stored["version"]:
                return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
            for other_uid, other in self.dashboards.items():
                if (other_uid != uid and other["folderUid"] == folder_uid
                        and other["dashboard"].get("title") == dash["title"]):
                    return 412, {"message": "A dashboard with the same name in the folder already exists",
                                 "status": "name-exists"}
        version = (stored["version"] + 1) if stored else 1
        dash_id = stored["dashboard"]["id"] if stored else self._next_id()
        dash.update(id=dash_id, version=version)
        self.dashboards[uid] = {"dashboard": dash, "folderUid": folder_uid, "version": version}
        return 200, {"id": dash_id, "uid": uid, "url": f"/d/{uid}/{dash['title'].lower().replace(' ', '-')}",
                     "status": "success", "version": version, "slug": dash["title"].lower().replace(" ", "-")}

    def respond(self, method: str, path: str, headers: dict[str, str],
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"message": "Invalid API key", "messageId": "api-key.invalid", "statusCode": 401}, {}
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 400, {"message": "bad request data"}, {}
        self.request_headers = headers
        status, payload = self.handle(method, path, body)
        return status, payload, {}
