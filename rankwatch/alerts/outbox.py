"""The durable outbox: one SQLite file holding every notification the detector decided to send,
the episodes and incidents they describe, and what each target answered.

A notification is written here (in the same transaction as the episode state change that caused
it) before any delivery is tried, so a crash, a kill -9 or a Slack outage loses nothing: the next
process delivers what is still pending. Each row has a unique idempotency key (target, incident or
episode, action), so replaying the same events enqueues nothing new, and a row is marked delivered
in one transaction with the target's answer (e.g. Slack's message ts), so it is never sent twice.

Rows of one scope (an incident for Slack and W&B, an episode for Alertmanager) are delivered in
order: a "resolved" never overtakes its "firing". A row the target refused for good (HTTP 400: it
will never be accepted) ends as ``failed`` and no longer holds up its scope.

A row whose last attempt may have reached the target (a timeout after the request was sent, or
a crash while ``sending``) is marked ``unsure``: before sending it again, the sink asks the target
whether it arrived (Slack: the channel history, by the idempotency key in message metadata).

Opening never waits long or fails for good: a file that is not a database, or a damaged one, is
moved aside (``alerts.sqlite.corrupt-<time>``) with an error naming both paths, and a fresh outbox
is started; a lock held by another process is waited for ``LOCK_WAIT_S`` at most, then
``OutboxUnavailable`` is raised (the sink keeps events in memory and tries again later)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwatch.secrets import redact

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
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | sending | delivered | skipped | failed
    created_wall REAL NOT NULL,
    not_before REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sending_wall REAL,
    delivered_wall REAL,
    result TEXT,                      -- JSON the target answered (Slack channel + ts, …)
    unsure INTEGER NOT NULL DEFAULT 0 -- 1: the last attempt may have been delivered
);
CREATE INDEX IF NOT EXISTS outbox_status ON outbox(status, target, not_before);
CREATE INDEX IF NOT EXISTS outbox_scope ON outbox(target, scope, id);
"""

log = logging.getLogger(__name__)

# Longest wait for another process's lock on the file. The detector publishes from its
# evaluation loop: a stuck lock may cost it this much per cycle, never more.
LOCK_WAIT_S = 2.0
# Statuses that no longer hold up the later rows of their scope.
DONE = ("delivered", "skipped", "failed")
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


class OutboxUnavailable(Exception):
    """The outbox file cannot be used right now (locked by another process, unreadable
    directory); the message says which file and why."""


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and (
        getattr(exc, "sqlite_errorname", "") in _CORRUPT or "malformed" in str(exc) or "not a database" in str(exc))


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
    unsure: int = 0


def _row(r: sqlite3.Row) -> OutboxRow:
    d = dict(r)
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return OutboxRow(**d)


class Outbox:
    """Thread-safe access to the SQLite file (one connection behind a lock; the detector thread
    writes events, the delivery thread reads and marks rows)."""

    def __init__(self, path: str | Path, *, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxUnavailable(f"{self.path.parent}: cannot create the outbox directory: {exc.strerror}") from None
        try:
            self._conn = self._open(lock_wait_s)
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise OutboxUnavailable(f"{self.path}: {_why(exc, lock_wait_s)}") from None
            aside = self._move_aside()
            log.error("alerting: %s is not a usable SQLite database (%s); moved it to %s and started a new, "
                      "empty outbox: notifications that were pending in it are not sent", self.path, exc, aside)
            try:
                self._conn = self._open(lock_wait_s)
            except sqlite3.DatabaseError as exc2:
                raise OutboxUnavailable(f"{self.path}: {_why(exc2, lock_wait_s)}") from None

    def _open(self, lock_wait_s: float) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=lock_wait_s)
        try:
            conn.row_factory = sqlite3.Row
            # WAL + FULL: a committed row survives kill -9 and power loss.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # quick_check finds damage that the first query would not touch (the file is small).
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            conn.executescript(SCHEMA)
            cols = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
            if "unsure" not in cols:  # an outbox written by an older rankwatch
                conn.execute("ALTER TABLE outbox ADD COLUMN unsure INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        return aside

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

    def requeue_interrupted(self, now: float) -> int:
        """Rows a crash left ``sending`` may or may not have arrived: pending and unsure."""
        with self.transaction() as c:
            return c.execute("UPDATE outbox SET status='pending', unsure=1, not_before=?, last_error='interrupted'"
                             " WHERE status='sending'", (now,)).rowcount

    def mark_sending(self, row_id: int, now: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='sending', sending_wall=?, attempts=attempts+1 WHERE id=?", (now, row_id))

    def mark_delivered(self, row_id: int, now: float, result: dict[str, Any] | None = None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='delivered', delivered_wall=?, result=?, last_error=NULL, unsure=0"
                      " WHERE id=?",
                      (now, json.dumps(result) if result is not None else None, row_id))

    def mark_skipped(self, row_id: int, reason: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='skipped', last_error=?, unsure=0 WHERE id=?", (reason, row_id))

    def mark_failed(self, row_id: int, error: str, retry_at: float, *, unsure: bool = False) -> None:
        """Back to pending, to be tried at ``retry_at``. ``unsure``: the attempt may have been
        delivered (look before sending again)."""
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='pending', last_error=?, not_before=?, unsure=? WHERE id=?",
                      (redact(error)[:500], retry_at, int(unsure), row_id))

    def mark_given_up(self, row_id: int, error: str) -> None:
        """The target refused this notification for good: it no longer blocks its scope."""
        with self.transaction() as c:
            c.execute("UPDATE outbox SET status='failed', last_error=?, unsure=0 WHERE id=?",
                      (redact(error)[:500], row_id))

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
                " AND p.status NOT IN ('delivered','skipped','failed')) ORDER BY o.id LIMIT ?",
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


def _why(exc: sqlite3.Error, waited_s: float) -> str:
    if "locked" in str(exc) or "busy" in str(exc):
        return f"locked by another process (waited {waited_s:g} s)"
    return str(exc)
