"""A local stand-in for the few Grafana HTTP API endpoints `rankwatch dashboards push` uses,
with Grafana's status codes and bodies: 401 for a wrong token, 404 for a missing folder or
dashboard, 409 for a duplicate folder, 412 `version-mismatch` / `name-exists` when a save
without overwrite would lose someone else's change. State lives in memory."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from rankwatch.httpserver import SIM_LIMITS, HttpServer


class FakeGrafana:
    """``with FakeGrafana(token="t") as g: g.url`` — serves on 127.0.0.1, a free port."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}  # uid → {"dashboard", "folderUid", "version"}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status): no headers, no token
        self._lock = threading.Lock()
        self._ids = 0
        self._handler_class = self._handler()
        self._server: HttpServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "use FakeGrafana as a context manager"
        return self._server.url

    def __enter__(self) -> FakeGrafana:
        self._server = HttpServer("127.0.0.1", 0, self._handler_class, limits=SIM_LIMITS, name="rankwatch-sim-grafana")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()

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
        return 404, {"message": "Not found"}

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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    status, payload = 401, {"message": "Invalid API key", "messageId": "api-key.invalid",
                                            "statusCode": 401}
                else:
                    try:
                        body = json.loads(raw) if raw else {}
                    except ValueError:
                        body = None
                    if body is None:
                        status, payload = 400, {"message": "bad request data"}
                    else:
                        status, payload = fake.handle(method, self.path, body)
                fake.requests.append((method, self.path, status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, *args: object) -> None:
                pass

        return Handler
