"""The detector's persistent state in SQLite: the core's state (open episodes, baselines), the
last evaluated data time, and an outbox of the events each cycle produced.

One transaction per cycle stores the core state *and* that cycle's events (unpublished); the
service then publishes them and marks them published. A restart therefore resumes after the
last saved evaluation (no episode fires twice) and re-publishes only events that a crash
caught between saving and publishing (none is lost)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rankwatch.errors import ConfigError
from rankwatch.events import Event

SCHEMA_VERSION = 1
# Published events kept for inspection (`sqlite3 state.db 'select body from events'`).
KEEP_PUBLISHED = 10_000


class DetectorState:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"--state-db {self.path}: not a usable SQLite database ({exc})") from None

    def _migrate(self) -> None:
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(f"--state-db {self.path}: schema version {row[0]}, this rankwatch uses "
                                  f"{SCHEMA_VERSION}; move the file away to start afresh")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self.db.execute("""CREATE TABLE IF NOT EXISTS core_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                last_time REAL NOT NULL,
                state TEXT NOT NULL,
                saved_at REAL NOT NULL)""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                time REAL NOT NULL,
                kind TEXT NOT NULL,
                state TEXT NOT NULL,
                episode TEXT NOT NULL,
                body TEXT NOT NULL,
                published INTEGER NOT NULL DEFAULT 0)""")
            self.db.execute("CREATE INDEX IF NOT EXISTS events_unpublished ON events (published) WHERE published = 0")

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)

    def load(self) -> tuple[dict[str, Any] | None, float | None]:
        """(core state, last evaluated data time), or (None, None) on a fresh database."""
        row = self.db.execute("SELECT state, last_time FROM core_state WHERE id = 1").fetchone()
        if row is None:
            return None, None
        try:
            return json.loads(row[0]), float(row[1])
        except ValueError as exc:
            raise ConfigError(f"--state-db {self.path}: stored state is not valid JSON ({exc})") from None

    def save(self, t: float, core_state: dict[str, Any], events: Sequence[Event]) -> list[int]:
        """Atomically store the state after evaluating ``t`` and that evaluation's events; returns
        the events' outbox ids (for ``mark_published``)."""
        body = json.dumps(core_state, separators=(",", ":"), default=_json_default)
        ids: list[int] = []
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO core_state VALUES (1, ?, ?, ?)", (t, body, time.time()))
            for e in events:
                cur = self.db.execute(
                    "INSERT INTO events (time, kind, state, episode, body) VALUES (?, ?, ?, ?, ?)",
                    (e.time, e.kind, e.state, e.episode, e.to_json()))
                ids.append(int(cur.lastrowid or 0))
        return ids

    def pending(self) -> list[tuple[int, Event]]:
        """Events saved but never published (a crash between save and publish)."""
        rows = self.db.execute("SELECT id, body FROM events WHERE published = 0 ORDER BY id").fetchall()
        return [(int(i), Event.from_json(b)) for i, b in rows]

    def mark_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._tx():
            self.db.executemany("UPDATE events SET published = 1 WHERE id = ?", [(i,) for i in ids])
            self.db.execute("DELETE FROM events WHERE published = 1 AND id <= "
                            "(SELECT MAX(id) FROM events) - ?", (KEEP_PUBLISHED,))

    def events(self) -> list[Event]:
        """Every stored event, oldest first (published or not)."""
        return [Event.from_json(b) for (b,) in self.db.execute("SELECT body FROM events ORDER BY id")]

    def close(self) -> None:
        self.db.close()


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
