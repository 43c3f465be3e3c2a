"""The alert lifecycle: detector events → episodes → incidents → notifications in the outbox.

* An **episode** is one problem on one rank/GPU/NIC, from its firing event to its resolved event
  (the detector's ``episode`` id). A second firing or resolved event for the same episode is a
  duplicate and is ignored, also across restarts: the state is in SQLite.
* An **incident** groups the episodes of one training run whose firing events fall within
  ``group_window_s`` (data time) of the incident's first one: 40 ranks slowed by one bad switch
  are one incident, hence one Slack message and one W&B alert. It resolves when all its
  episodes have resolved.
* Per-incident targets (Slack, W&B) get ``firing`` (held ``group_wait_s`` so that episodes of the
  next cycles join it), ``update`` (episodes joined or recovered after the message went out),
  ``resolved`` and ``reminder`` (every ``renotify_interval_s`` while still firing, wall clock).
  Per-episode targets (Alertmanager) get ``firing`` and ``resolved`` of each episode, since
  Alertmanager groups by itself.

Nothing here talks to the network: it only writes rows into the outbox."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rankwatch.alerts.config import SEVERITIES, NotifyConfig
from rankwatch.alerts.outbox import Outbox
from rankwatch.events import Event

log = logging.getLogger(__name__)


class Target(Protocol):
    """What the lifecycle needs to know about a notifier."""

    name: str
    per_episode: bool  # True: one notification per episode (Alertmanager); False: per incident

    def wants(self, action: str) -> bool: ...


@dataclass
class EpisodeView:
    episode: str
    state: str
    firing: Event
    resolved: Event | None = None

    @property
    def current(self) -> Event:
        return self.resolved or self.firing


@dataclass
class IncidentView:
    id: int
    run: str | None
    state: str
    opened_at: float
    resolved_at: float | None
    reminders: int
    episodes: list[EpisodeView] = field(default_factory=list)

    @property
    def severity(self) -> str:
        return max((e.firing.severity for e in self.episodes), key=_sev_rank, default="warning")

    @property
    def culprit(self) -> EpisodeView:
        """The episode to show first: most severe, then highest score."""
        return max(self.episodes, key=lambda e: (_sev_rank(e.firing.severity), abs(e.firing.score or 0.0)))

    @property
    def active(self) -> list[EpisodeView]:
        return [e for e in self.episodes if e.state == "firing"]


def _sev_rank(sev: str) -> int:
    return SEVERITIES.index(sev) if sev in SEVERITIES else 1


def episode_id(event: Event) -> str:
    """The event's episode id, or one derived from what it is about (stable across the firing
    and resolved events as long as one problem per rank/GPU/NIC and kind is open at a time)."""
    if event.episode:
        return event.episode
    return "|".join(str(x) for x in (event.run, event.kind, event.rank, event.node, event.gpu, event.nic))


class Lifecycle:
    def __init__(self, outbox: Outbox, targets: Sequence[Target], notify: NotifyConfig,
                 clock: Callable[[], float]) -> None:
        self.outbox = outbox
        self.targets = list(targets)
        self.cfg = notify
        self.clock = clock
        self._min_sev = _sev_rank(notify.min_severity)

    # -- events in --------------------------------------------------------------------------

    def accepts(self, event: Event) -> bool:
        return event.kind in self.cfg.kinds and _sev_rank(event.severity) >= self._min_sev

    def ingest(self, events: Iterable[Event]) -> list[Event]:
        """Record events and enqueue the notifications they cause (one transaction). Returns the
        events that were new (not duplicates, not filtered out)."""
        now = self.clock()
        new: list[Event] = []
        with self.outbox.transaction() as c:
            for ev in sorted(events, key=lambda e: (e.time, e.state == "resolved")):
                if ev.state not in ("firing", "resolved"):
                    log.warning("ignoring event with unknown state %r (episode %s)", ev.state, ev.episode)
                    continue
                ep = episode_id(ev)
                row = c.execute("SELECT incident_id, state FROM episodes WHERE episode=?", (ep,)).fetchone()
                if ev.state == "firing":
                    if row is not None or not self.accepts(ev):
                        continue  # duplicate (also after a restart), or filtered out
                    self._fire(c, ev, ep, now)
                else:
                    if row is None or row["state"] == "resolved":
                        continue  # never fired here, or already resolved
                    self._resolve(c, ev, ep, int(row["incident_id"]), now)
                new.append(ev)
        return new

    def _fire(self, c, ev: Event, ep: str, now: float) -> int:
        inc = c.execute(
            "SELECT id FROM incidents WHERE run IS ? AND state='firing' AND ? - opened_at <= ? ORDER BY id DESC LIMIT 1",
            (ev.run, ev.time, self.cfg.group_window_s)).fetchone()
        added = 0
        if inc is None:
            cur = c.execute("INSERT INTO incidents (run, state, opened_at, created_wall, last_notified_wall)"
                            " VALUES (?, 'firing', ?, ?, ?)", (ev.run, ev.time, now, now))
            inc_id = int(cur.lastrowid)
            new_incident = True
        else:
            inc_id = int(inc["id"])
            new_incident = False
        c.execute("INSERT INTO episodes (episode, incident_id, state, firing_json, updated_wall)"
                  " VALUES (?, ?, 'firing', ?, ?)", (ep, inc_id, ev.to_json(), now))
        for t in self.targets:
            if t.per_episode:
                added += Outbox.enqueue(c, key=f"{t.name}:e:{ep}:firing", target=t.name, scope=f"e{ep}",
                                        action="firing", incident_id=inc_id, episode=ep, now=now, not_before=now)
            elif new_incident:
                added += Outbox.enqueue(c, key=f"{t.name}:i{inc_id}:firing", target=t.name, scope=f"i{inc_id}",
                                        action="firing", incident_id=inc_id, episode=None, now=now,
                                        not_before=now + self.cfg.group_wait_s)
            else:
                added += self._update(c, t, inc_id, now)
        return added

    def _update(self, c, t: Target, inc_id: int, now: float) -> int:
        """An incident changed after its message went out. Coalesced: while a firing or an
        update is still queued it will render the current state anyway."""
        if not t.wants("update"):
            return 0
        queued = c.execute("SELECT COUNT(*) AS n FROM outbox WHERE target=? AND scope=? AND status IN ('pending','sending')"
                           " AND action IN ('firing','update')", (t.name, f"i{inc_id}")).fetchone()["n"]
        if queued:
            return 0
        n = c.execute("SELECT COUNT(*) AS n FROM outbox WHERE target=? AND scope=? AND action='update'",
                      (t.name, f"i{inc_id}")).fetchone()["n"]
        return Outbox.enqueue(c, key=f"{t.name}:i{inc_id}:update:{n + 1}", target=t.name, scope=f"i{inc_id}",
                              action="update", incident_id=inc_id, episode=None, now=now, not_before=now)

    def _resolve(self, c, ev: Event, ep: str, inc_id: int, now: float) -> int:
        c.execute("UPDATE episodes SET state='resolved', resolved_json=?, updated_wall=? WHERE episode=?",
                  (ev.to_json(), now, ep))
        open_left = c.execute("SELECT COUNT(*) AS n FROM episodes WHERE incident_id=? AND state='firing'",
                              (inc_id,)).fetchone()["n"]
        added = 0
        if open_left == 0:
            c.execute("UPDATE incidents SET state='resolved', resolved_at=? WHERE id=?", (ev.time, inc_id))
        for t in self.targets:
            if t.per_episode:
                added += Outbox.enqueue(c, key=f"{t.name}:e:{ep}:resolved", target=t.name, scope=f"e{ep}",
                                        action="resolved", incident_id=inc_id, episode=ep, now=now, not_before=now)
            elif open_left == 0:
                # A firing still held by group_wait goes out first (ordered per scope), so the
                # channel always sees "firing" then "resolved" for the same message.
                added += Outbox.enqueue(c, key=f"{t.name}:i{inc_id}:resolved", target=t.name, scope=f"i{inc_id}",
                                        action="resolved", incident_id=inc_id, episode=None, now=now, not_before=now)
            else:
                added += self._update(c, t, inc_id, now)
        return added

    # -- time passes --------------------------------------------------------------------------

    def release_held(self) -> None:
        """Stop holding firings for group_wait (used when the process is about to exit). Only
        rows never tried: a row backing off after a failure, or told by Retry-After when to come
        back, keeps its time."""
        now = self.clock()
        with self.outbox.transaction() as c:
            c.execute("UPDATE outbox SET not_before=? WHERE status='pending' AND action='firing' AND not_before>?"
                      " AND attempts=0 AND last_error IS NULL", (now, now))

    def renotify(self) -> int:
        """Enqueue reminders for incidents still firing after ``renotify_interval_s``."""
        if self.cfg.renotify_interval_s <= 0:
            return 0
        now = self.clock()
        added = 0
        with self.outbox.transaction() as c:
            due = c.execute("SELECT id, reminders FROM incidents WHERE state='firing' AND last_notified_wall <= ?",
                            (now - self.cfg.renotify_interval_s,)).fetchall()
            for inc in due:
                n = int(inc["reminders"]) + 1
                for t in self.targets:
                    if t.per_episode or not t.wants("reminder"):
                        continue
                    added += Outbox.enqueue(c, key=f"{t.name}:i{inc['id']}:reminder:{n}", target=t.name,
                                            scope=f"i{inc['id']}", action="reminder", incident_id=int(inc["id"]),
                                            episode=None, now=now, not_before=now)
                c.execute("UPDATE incidents SET reminders=?, last_notified_wall=? WHERE id=?", (n, now, inc["id"]))
        return added

    def touch(self, incident_id: int) -> None:
        """A message about the incident went out: restart its reminder clock."""
        with self.outbox.transaction() as c:
            c.execute("UPDATE incidents SET last_notified_wall=? WHERE id=?", (self.clock(), incident_id))

    # -- views for rendering ------------------------------------------------------------------

    def incident(self, incident_id: int) -> IncidentView:
        inc = self.outbox.query("SELECT * FROM incidents WHERE id=?", (incident_id,))[0]
        view = IncidentView(id=int(inc["id"]), run=inc["run"], state=inc["state"], opened_at=inc["opened_at"],
                            resolved_at=inc["resolved_at"], reminders=int(inc["reminders"]))
        for r in self.outbox.query("SELECT * FROM episodes WHERE incident_id=? ORDER BY rowid", (incident_id,)):
            view.episodes.append(EpisodeView(
                episode=r["episode"], state=r["state"], firing=Event.from_dict(json.loads(r["firing_json"])),
                resolved=Event.from_dict(json.loads(r["resolved_json"])) if r["resolved_json"] else None))
        return view

    def episode(self, episode: str) -> EpisodeView:
        r = self.outbox.query("SELECT * FROM episodes WHERE episode=?", (episode,))[0]
        return EpisodeView(episode=r["episode"], state=r["state"], firing=Event.from_dict(json.loads(r["firing_json"])),
                           resolved=Event.from_dict(json.loads(r["resolved_json"])) if r["resolved_json"] else None)

    def firing_episodes(self) -> list[EpisodeView]:
        return [self.episode(r["episode"]) for r in self.outbox.query("SELECT episode FROM episodes WHERE state='firing'")]
