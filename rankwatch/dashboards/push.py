"""Create or update the rankwatch dashboards through Grafana's HTTP API.

The same calls work on self-hosted Grafana and Amazon Managed Grafana: both take a service
account token as a Bearer token (`GRAFANA_TOKEN`, or a file named by `GRAFANA_TOKEN_FILE` /
`--token-file`). The token is sent in a header only; it is never logged or put in an error.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import requests

from rankwatch.errors import ConfigError, RankwatchError
from rankwatch.secrets import read_secret_file, secret_from_env

log = logging.getLogger(__name__)

DEFAULT_FOLDER_UID = "rankwatch"
DEFAULT_FOLDER_TITLE = "rankwatch"


def resolve_token(token_file: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The service-account token: `GRAFANA_TOKEN`, else the file ``token_file`` or
    `GRAFANA_TOKEN_FILE` (a mounted Secret, a systemd credential)."""
    env = os.environ if environ is None else environ
    token = secret_from_env("GRAFANA_TOKEN", env, what="Grafana token")
    if token:
        return token
    path = token_file or env.get("GRAFANA_TOKEN_FILE")
    if not path:
        raise ConfigError("no Grafana token: set GRAFANA_TOKEN, or GRAFANA_TOKEN_FILE / --token-file to a file "
                          "holding a service account token (Editor role)")
    return read_secret_file(path, what="Grafana token")


def live_run(prometheus_url: str) -> str | None:
    """The run whose ranks reported a step most recently, or None when no probe reports."""
    from rankwatch.promserver import query

    result = query(prometheus_url, "topk(1, max by (run) (rankwatch_last_step_timestamp_seconds))")
    return result[0]["metric"].get("run") if result else None


def preselect(dashboard: dict[str, Any], variable: str, value: str) -> dict[str, Any]:
    """A copy of ``dashboard`` whose ``variable`` opens on ``value`` (if it has that variable)."""
    out = copy.deepcopy(dashboard)
    for var in out.get("templating", {}).get("list", []):
        if var.get("name") == variable:
            var["current"] = {"selected": True, "text": value, "value": value}
    return out


@dataclass
class PushResult:
    uid: str
    title: str
    url: str
    version: int


class GrafanaClient:
    """The few Grafana HTTP API calls a push needs."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json"})
        self.timeout = timeout

    def call(self, method: str, path: str, json_body: Any = None, *,
             headers: dict[str, str] | None = None) -> requests.Response:
        """One API call; 401 (and connection failures) are errors, other statuses are the caller's."""
        url = self.base_url + path
        try:
            resp = self._session.request(method, url, json=json_body, timeout=self.timeout, headers=headers)
        except requests.RequestException as exc:
            raise RankwatchError(f"cannot reach Grafana at {self.base_url}: {type(exc).__name__}") from None
        if resp.status_code == 401:
            raise RankwatchError(f"Grafana at {self.base_url} rejected the token (401 Unauthorized): check that "
                                 "GRAFANA_TOKEN holds a valid, unexpired service account token")
        return resp

    def _call(self, method: str, path: str, json_body: Any = None) -> requests.Response:
        resp = self.call(method, path, json_body)
        if resp.status_code == 403:
            raise RankwatchError(f"Grafana at {self.base_url} refused {method} {path} (403): the service account "
                                 "needs the Editor role (or dashboard write permission on the folder)")
        return resp

    @staticmethod
    def message(resp: requests.Response) -> str:
        """Grafana's error message from ``resp``, shortened."""
        try:
            body = resp.json()
        except ValueError:
            return resp.text[:200]
        return str(body.get("message") or body.get("status") or body)[:300]

    def ensure_folder(self, uid: str, title: str) -> str:
        """The uid of the folder ``uid`` (created with ``title`` if missing), or of an existing
        folder already called ``title``."""
        resp = self._call("GET", f"/api/folders/{uid}")
        if resp.status_code == 200:
            return str(resp.json()["uid"])
        if resp.status_code != 404:
            raise RankwatchError(f"Grafana: looking up folder {uid!r} failed ({resp.status_code}): {self.message(resp)}")
        resp = self._call("POST", "/api/folders", {"uid": uid, "title": title})
        if resp.status_code == 200:
            log.info("created Grafana folder %r", title)
            return str(resp.json()["uid"])
        if resp.status_code in (409, 412):  # a folder with that title exists under another uid
            listing = self._call("GET", "/api/folders?limit=1000")
            for folder in listing.json() if listing.status_code == 200 else []:
                if folder.get("title") == title:
                    return str(folder["uid"])
        raise RankwatchError(f"Grafana: cannot create folder {title!r} ({resp.status_code}): {self.message(resp)}")

    def current_version(self, uid: str) -> int | None:
        resp = self._call("GET", f"/api/dashboards/uid/{uid}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise RankwatchError(f"Grafana: reading dashboard {uid!r} failed ({resp.status_code}): {self.message(resp)}")
        return int(resp.json()["dashboard"].get("version") or 0)

    def save_dashboard(self, dashboard: dict[str, Any], folder_uid: str, *, overwrite: bool) -> PushResult:
        body = {"dashboard": dashboard, "folderUid": folder_uid, "overwrite": overwrite,
                "message": "rankwatch dashboards push"}
        resp = self._call("POST", "/api/dashboards/db", body)
        title, uid = dashboard.get("title"), dashboard.get("uid")
        if resp.status_code == 412:
            status = ""
            try:
                status = resp.json().get("status", "")
            except ValueError:
                pass
            if status == "version-mismatch":
                raise RankwatchError(f"dashboard {title!r} (uid {uid}) was changed in Grafana since this push read "
                                     "it (412 version-mismatch); rerun with --overwrite to replace those changes")
            raise RankwatchError(f"Grafana refused dashboard {title!r} (412 {status or 'precondition failed'}): "
                                 f"{self.message(resp)}")
        if resp.status_code != 200:
            raise RankwatchError(f"Grafana refused dashboard {title!r} ({resp.status_code}): {self.message(resp)}")
        body = resp.json()
        return PushResult(uid=str(body.get("uid", uid)), title=str(title), url=self.base_url + str(body.get("url", "")),
                          version=int(body.get("version", 0)))


def push_dashboards(grafana_url: str, token: str, dashboards: dict[str, dict[str, Any]], *,
                    folder_uid: str = DEFAULT_FOLDER_UID, folder_title: str = DEFAULT_FOLDER_TITLE,
                    overwrite: bool = True, run: str | None = None) -> list[PushResult]:
    """Create or update ``dashboards`` (file name → dashboard JSON) in one folder.

    With ``overwrite`` the generated dashboards replace whatever is stored (they are the
    source of truth, as with file provisioning). Without it each save carries the version
    read just before, so an edit made in Grafana meanwhile is reported (412), not lost.
    ``run`` opens the dashboards on that run."""
    client = GrafanaClient(grafana_url, token)
    folder = client.ensure_folder(folder_uid, folder_title)
    results = []
    for data in dashboards.values():
        dash = preselect(data, "run", run) if run else copy.deepcopy(data)
        dash["id"] = None
        if not overwrite:
            version = client.current_version(dash["uid"])
            if version is not None:
                dash["version"] = version
        result = client.save_dashboard(dash, folder, overwrite=overwrite)
        log.info("pushed %r → %s (version %d)", result.title, result.url, result.version)
        results.append(result)
    return results
