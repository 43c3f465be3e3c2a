"""The durable outbox: one SQLite file holding every notification the detector decided to send,
the episodes and incidents they describe, and what each target answered.

A notification is written here (in the same transaction as the episode state change that caused
it) before any delivery is tried, so a crash, a kill -9 or a Slack outage loses nothing: the next
process delivers what is still pending. Each row has a unique idempotency key (target, incident or
episode, action), so replaying the same events enqueues nothing new, and a row is marked delivered
in one transaction with the target's answer (e.g. Slack's message ts), so it is never sent twice.

Rows of one scope (an incident for Slack and W&B, an episode for Alertmanager) are delivered in
order: a "resolved" never overtakes its "firing"."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY,
    run TEXT,
    state TEXT NOT NULL,              -- firing | resolved
    opened_at REAL NOT NULL,          -- data time of the first firing event
    resolved_at REAL,
    created_wall REAL NOT NULL,
    last_notified_wall REAL,
    reminders INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS episodes (
    episode TEXT PRIMARY KEY,
    incident_id INTEGER NOT NULL REFERENCES incidents(id),
    state TEXT NOT NULL,
    firing_json TEXT NOT NULL,
    resolved_json TEXT,
    updated_wall REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS episodes_incident ON episodes(incident_id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,         -- idempotency key
    target TEXT NOT NULL,             -- slack | wandb | alertmanager
    scope TEXT NOT NULL,              -- i<incident> or e<episode>: delivered in id order per scope
    action TEXT NOT NULL,             -- firing | update | resolved | reminder
    incident_id INTEGER,
    episode TEXT,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | sending | delivered | skipped
    created_wall REAL NOT NULL,
    not_before REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sending_wall REAL,
    delivered_wall REAL,
    result TEXT                       -- JSON the target answered (Slack channel + ts, …)
);
CREATE INDEX IF NOT EXISTS outbox_status ON outbox(status, target, not_before);
CREATE INDEX IF NOT EXISTS outbox_scope ON outbox(target, scope, id);
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    key: str
    target: str
    scope: str
    action: str
    incident_id: int | None
    episode: str | None
    status: str
    created_wall: float
    not_before: float
    attempts: int
    last_error: str | None
    sending_wall: float | None
    delivered_wall: float | None
    result: dict[str, Any] | None


def _row(r: sqlite3.Row) -> OutboxRow:
    d = dict(r)
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return OutboxRow(**d)


class Outbox:
    """Thread-safe access to the SQLite file (one connection behind a lock; the detector thread
    writes events, the delivery thread reads and marks rows)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        # WAL + FULL: a committed row survives kill -9 and power loss.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writing ------------------------------------------------------------------------------

    @staticmethod
    def enqueue(conn: sqlite3.Connection, *, key: str, target: str, scope: str, action: str,
                incident_id: int | None, episode: str | None, now: float, not_before: float) -> bool:
        """Insert a notification unless one with this idempotency key exists. True if inserted."""
        cur = conn.execute(
            "INSERT OR IGNORE INTO outbox (key, target, scope, action, incident_id, episode, created_wall, not_before)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, target, scope, action, incident_id, episode, now, not_before))
        return cur.rowcount == 1

    def mark_sending(self, row_id: int, now: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='sending', sending_wall=?, attempts=attempts+1 WHERE id=?", (now, row_id))

    def mark_delivered(self, row_id: int, now: float, result: dict[str, Any] | None = None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='delivered', delivered_wall=?, result=?, last_error=NULL WHERE id=?",
                      (now, json.dumps(result) if result is not None else None, row_id))

    def mark_skipped(self, row_id: int, reason: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='skipped', last_error=? WHERE id=?", (reason, row_id))

    def mark_failed(self, row_id: int, error: str, retry_at: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='pending', last_error=?, not_before=? WHERE id=?",
                      (error[:500], retry_at, row_id))

    def defer(self, row_id: int, until: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET not_before=? WHERE id=? AND status='pending'", (until, row_id))

    # -- reading ------------------------------------------------------------------------------

    def due(self, targets: Sequence[str], now: float, limit: int = 100) -> list[OutboxRow]:
        """Pending rows whose time has come and whose earlier rows in the same scope are done."""
        if not targets:
            return []
        marks = ",".join("?" for _ in targets)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM outbox o WHERE o.status='pending' AND o.not_before<=? AND o.target IN ({marks})"
                " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.target=o.target AND p.scope=o.scope AND p.id<o.id"
                " AND p.status NOT IN ('delivered','skipped')) ORDER BY o.id LIMIT ?",
                (now, *targets, limit)).fetchall()
        return [_row(r) for r in rows]

    def rows(self, *, status: str | None = None, target: str | None = None) -> list[OutboxRow]:
        sql, args = "SELECT * FROM outbox WHERE 1=1", []
        if status:
            sql += " AND status=?"
            args.append(status)
        if target:
            sql += " AND target=?"
            args.append(target)
        with self._lock:
            return [_row(r) for r in self._conn.execute(sql + " ORDER BY id", args).fetchall()]

    def delivered_result(self, target: str, scope: str, action: str) -> dict[str, Any] | None:
        """What the target answered for the first delivered row of ``action`` in ``scope``."""
        with self._lock:
            r = self._conn.execute(
                "SELECT result FROM outbox WHERE target=? AND scope=? AND action=? AND status='delivered'"
                " ORDER BY id LIMIT 1", (target, scope, action)).fetchone()
        return json.loads(r["result"]) if r and r["result"] else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r["status"]: r["n"] for r in
                    self._conn.execute("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status").fetchall()}

    def next_due_time(self, targets: Sequence[str]) -> float | None:
        if not targets:
            return None
        marks = ",".join("?" for _ in targets)
        with self._lock:
            r = self._conn.execute(f"SELECT MIN(not_before) AS t FROM outbox WHERE status='pending' AND target IN ({marks})",
                                   tuple(targets)).fetchone()
        return r["t"] if r else None

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()
