"""Alertmanager delivery: detector episodes as alerts on its v2 API (``POST /api/v2/alerts``), so
teams that already route through Alertmanager get silences, inhibition and routing for free.

One alert per episode, identified by its labels (alertname from the kind, run, rank, node, gpu,
nic, severity, episode). Firing alerts carry ``startsAt`` and an ``endsAt`` a few resend
intervals ahead and are re-posted every ``resend_interval_s`` (as Prometheus does), so
Alertmanager resolves them by itself if the detector dies; a resolved episode is posted once
more with ``endsAt`` = the time it resolved. Posting the same alert again is idempotent.

A 4xx answer other than 408 and 429 (Alertmanager refuses the alert itself) is permanent: the
notification is reported once with Alertmanager's text and dropped, so the episode's resolved
notification and everything after it still go out; other failures are retried."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import requests

from rankwatch.alerts.config import AlertmanagerConfig, LinksConfig
from rankwatch.alerts.delivery import DeliveryError, is_permanent_status
from rankwatch.alerts.lifecycle import EpisodeView
from rankwatch.alerts.links import alert_name
from rankwatch.alerts.links import render as render_link
from rankwatch.alerts.render import episode_description, kind_label, short_where
from rankwatch.secrets import redact

log = logging.getLogger(__name__)

DEFAULT_RUNBOOK = "https://github.com/rankwatch/rankwatch/blob/main/docs/runbooks/{alert}.md"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def alert_for(ep: EpisodeView, links: LinksConfig, *, now: float, ends_in_s: float, resolved: bool,
              generator_url: str | None = None) -> dict[str, Any]:
    """The v2 API alert object of an episode (pure). ``resolved=False`` posts it as firing even
    if it has resolved since (a late first delivery): Alertmanager then sees both states."""
    ev = ep.firing
    labels = {"alertname": alert_name(ev.kind), "kind": ev.kind, "severity": ev.severity,
              "source": "rankwatch-detector", "episode": ep.episode}
    for key, value in (("run", ev.run), ("rank", ev.rank), ("node", ev.node), ("gpu", ev.gpu), ("nic", ev.nic)):
        if value not in (None, ""):
            labels[key] = str(value)
    starts = ev.since if ev.since is not None else ev.time
    annotations = {
        "summary": f"{kind_label(ev.kind)}: {short_where(ev)}" + (f" (run {ev.run})" if ev.run else ""),
        "description": episode_description(ep),
        "runbook_url": render_link(links.runbook_url or DEFAULT_RUNBOOK, ev) or "",
    }
    grafana = render_link(links.grafana_url, ev, now=now)
    if grafana:
        annotations["dashboard_url"] = grafana
    alert: dict[str, Any] = {"labels": labels, "annotations": annotations, "startsAt": _iso(starts)}
    if resolved and ep.resolved is not None:
        alert["endsAt"] = _iso(max(ep.resolved.time, starts))
    else:
        alert["endsAt"] = _iso(now + ends_in_s)
    if generator_url:
        alert["generatorURL"] = generator_url
    return alert


class AlertmanagerNotifier:
    name = "alertmanager"
    per_episode = True

    def __init__(self, cfg: AlertmanagerConfig, links: LinksConfig) -> None:
        self.cfg = cfg
        self.links = links
        self._session = requests.Session()
        # The first re-post is one interval after start: a restarted detector re-posts within
        # one interval, well before the endsAt (4 intervals) of its last posts.
        self._last_resend = time.time()

    def wants(self, action: str) -> bool:
        return action in ("firing", "resolved")

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        try:
            r = self._session.post(self.cfg.url + "/api/v2/alerts", json=alerts, timeout=self.cfg.timeout_s)
        except requests.RequestException as exc:
            raise DeliveryError(f"Alertmanager unreachable: {type(exc).__name__}") from None
        if r.status_code != 200:
            retry_after = None
            try:
                retry_after = float(r.headers["Retry-After"]) if "Retry-After" in r.headers else None
            except ValueError:
                pass
            raise DeliveryError(f"Alertmanager answered HTTP {r.status_code}: {redact(r.text.strip())[:300]}",
                                retry_after, permanent=is_permanent_status(r.status_code))

    def deliver(self, action: str, ep: EpisodeView, prior: dict[str, Any] | None, key: str) -> dict[str, Any]:
        self._post([alert_for(ep, self.links, now=time.time(), ends_in_s=4 * self.cfg.resend_interval_s,
                              resolved=(action == "resolved"), generator_url=self.cfg.generator_url)])
        return {"posted": action}

    def resend(self, firing: list[EpisodeView], now: float) -> None:
        """Re-post the firing alerts every resend interval (best effort)."""
        if not firing or now - self._last_resend < self.cfg.resend_interval_s:
            return
        self._last_resend = now
        try:
            self._post([alert_for(ep, self.links, now=now, ends_in_s=4 * self.cfg.resend_interval_s,
                                  resolved=False, generator_url=self.cfg.generator_url) for ep in firing])
        except DeliveryError as exc:
            log.warning("alertmanager: resend of %d firing alerts failed: %s", len(firing), exc)
