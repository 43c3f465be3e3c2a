"""The detector's persistent state in SQLite: the core's state (open episodes, baselines), the
last evaluated data time, and an outbox of the events each cycle produced.

One transaction per cycle stores the core state *and* that cycle's events (unpublished); the
service then publishes them and marks them published. A restart therefore resumes after the
last saved evaluation (no episode fires twice) and re-publishes only events that a crash
caught between saving and publishing (none is lost).

The file is someone else's to break, and detection must go on whatever they do:
- deleted or replaced while running (checked by inode before every save): recreated, or
  reopened, with a warning; the state in memory is saved into it at once;
- corrupt (at start-up or on a save): moved aside to ``<file>.corrupt-<time>`` with a warning
  naming both files, and started afresh;
- locked by another process: each transaction waits at most ``lock_timeout_s``, then the save
  fails with a ``StateError`` (the service warns and publishes the events anyway)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from rankwatch.errors import ConfigError, RankwatchError
from rankwatch.events import Event

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Published events kept for inspection (`sqlite3 state.db 'select body from events'`).
KEEP_PUBLISHED = 10_000
# How long a transaction waits for another process' lock before the cycle gives up saving.
LOCK_TIMEOUT_S = 2.0

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
_T = TypeVar("_T")


class StateError(RankwatchError):
    """The state DB could not be written this time (locked, disk full): the cycle's events are
    still published."""


def _code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _is_busy(exc: sqlite3.Error) -> bool:
    return _code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(exc)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class DetectorState:
    def __init__(self, path: str | Path, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = str(path)
        self.lock_timeout_s = lock_timeout_s
        self._file: tuple[int, int] | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._open(check=True)

    # --- opening, and the file's accidents ---------------------------------------------------

    def _connect(self, check: bool) -> None:
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                  timeout=self.lock_timeout_s)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if check:
                row = self.db.execute("PRAGMA quick_check").fetchone()
                if row is None or row[0] != "ok":
                    err = sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")
                    err.sqlite_errorcode = _SQLITE_CORRUPT  # type: ignore[attr-defined]
                    raise err
            self._migrate()
        except BaseException:
            self.db.close()
            raise
        self._file = _file_id(self.path) if self.path != ":memory:" else None

    def _open(self, check: bool) -> None:
        try:
            self._connect(check)
        except sqlite3.DatabaseError as exc:
            if _is_busy(exc):
                raise ConfigError(f"state database {self.path}: locked by another process (waited "
                                  f"{self.lock_timeout_s:g}s: {exc}); stop it or use another file") from None
            if not _is_corrupt(exc) or self.path == ":memory:":
                raise ConfigError(f"state database {self.path}: not a usable SQLite database ({exc})") from None
            self._move_aside(str(exc))
            self._connect(check=False)

    def _move_aside(self, reason: str) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        log.warning("state database %s is not a usable SQLite database (%s): moved it aside to %s and started a "
                    "fresh state (open episodes are forgotten; they may fire again)", self.path, reason, aside)

    def _check_file(self) -> None:
        """Reopen the file if it was deleted or replaced under us (the inode changed)."""
        if self.path == ":memory:":
            return
        now = _file_id(self.path)
        if now == self._file:
            return
        self.db.close()
        # The -wal and -shm files left by the name belong to the old file: SQLite would replay
        # that WAL into the new one (measured: a garbage file then passes its integrity check).
        for suffix in ("-wal", "-shm"):
            Path(self.path + suffix).unlink(missing_ok=True)
        log.warning("state database %s was %s while the detector was running: %s", self.path,
                    "deleted" if now is None else "replaced by another file",
                    "recreating it; the state in memory is saved into it" if now is None else "reopening it")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._open(check=True)

    def _write(self, fn: Callable[[], _T]) -> _T:
        """Run a write transaction: after checking the file, recovering from corruption once."""
        try:
            self._check_file()
            try:
                return fn()
            except sqlite3.DatabaseError as exc:
                if not _is_corrupt(exc) or self.path == ":memory:":
                    raise
                self.db.close()
                self._move_aside(str(exc))
                self._open(check=False)
                return fn()
        except sqlite3.DatabaseError as exc:
            if _is_busy(exc):
                raise StateError(f"state database {self.path}: locked by another process for more than "
                                 f"{self.lock_timeout_s:g}s") from None
            raise StateError(f"state database {self.path}: {exc}") from None
        except (OSError, ConfigError) as exc:
            raise StateError(f"state database {self.path}: {exc}") from None

    def _migrate(self) -> None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            row = None  # no meta table: a new file
        if row is not None and row[0] == str(SCHEMA_VERSION):
            return  # up to date: nothing to write (and no write lock to wait for)
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(f"state database {self.path}: schema version {row[0]}, this rankwatch uses "
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
            raise ConfigError(f"state database {self.path}: stored state is not valid JSON ({exc})") from None

    def save(self, t: float, core_state: dict[str, Any], events: Sequence[Event]) -> list[int]:
        """Atomically store the state after evaluating ``t`` and that evaluation's events; returns
        the events' outbox ids (for ``mark_published``). Raises ``StateError`` when the file
        cannot be written (locked past ``lock_timeout_s``, disk full)."""
        body = json.dumps(core_state, separators=(",", ":"), default=_json_default)

        def write() -> list[int]:
            ids: list[int] = []
            with self._tx():
                self.db.execute("INSERT OR REPLACE INTO core_state VALUES (1, ?, ?, ?)", (t, body, time.time()))
                for e in events:
                    cur = self.db.execute(
                        "INSERT INTO events (time, kind, state, episode, body) VALUES (?, ?, ?, ?, ?)",
                        (e.time, e.kind, e.state, e.episode, e.to_json()))
                    ids.append(int(cur.lastrowid or 0))
            return ids

        return self._write(write)

    def pending(self) -> list[tuple[int, Event]]:
        """Events saved but never published (a crash between save and publish)."""
        rows = self.db.execute("SELECT id, body FROM events WHERE published = 0 ORDER BY id").fetchall()
        return [(int(i), Event.from_json(b)) for i, b in rows]

    def mark_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return

        def write() -> None:
            with self._tx():
                self.db.executemany("UPDATE events SET published = 1 WHERE id = ?", [(i,) for i in ids])
                self.db.execute("DELETE FROM events WHERE published = 1 AND id <= "
                                "(SELECT MAX(id) FROM events) - ?", (KEEP_PUBLISHED,))

        self._write(write)

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
