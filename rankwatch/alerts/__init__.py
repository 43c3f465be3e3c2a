"""Alerting: detector events → Slack, W&B and Alertmanager, through a durable SQLite outbox.

``build_sink(config, state_dir=...)`` is what the detector calls: it validates the [slack],
[wandb], [alertmanager], [notify] and [links] tables and returns an ``AlertSink`` (an
``EventSink``) or None when no target is configured.

``AlertSink.publish(events)`` only writes to SQLite and wakes the delivery thread, so it is fast
and never raises for delivery problems; the delivery thread sends what is due, retries failures
with backoff (honouring Retry-After), re-notifies long-lived incidents and re-posts firing
alerts to Alertmanager. Whatever is undelivered when the process ends — or is killed — is
delivered by the next process that opens the same state directory.

The outbox never takes the detector down: a corrupt file is moved aside (see ``outbox``), and
while the file is locked by another process or cannot be opened, events wait in memory (bounded)
and are recorded as soon as it can be used; each wait on the lock is at most
``outbox.LOCK_WAIT_S``. Every error text is passed through ``rankwatch.secrets.redact`` before
it is logged or stored."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rankwatch.alerts.config import AlertingConfig, load_alerting_config
from rankwatch.alerts.delivery import DeliveryError
from rankwatch.alerts.lifecycle import Lifecycle
from rankwatch.alerts.outbox import Outbox, OutboxRow, OutboxUnavailable
from rankwatch.events import Event, EventSink
from rankwatch.secrets import redact

__all__ = ["AlertSink", "build_sink", "load_alerting_config"]

log = logging.getLogger(__name__)
OUTBOX_FILE = "alerts.sqlite"
# Events kept in memory while the outbox cannot be written; beyond this the oldest are dropped
# (with an error): a detector cut off from its outbox for days must not grow without bound.
MAX_BACKLOG = 10_000


class _RateLimiter:
    """At most ``per_minute`` sends per sliding minute and ``min_interval`` s between sends."""

    def __init__(self, per_minute: int, min_interval: float) -> None:
        self.per_minute = per_minute
        self.min_interval = min_interval
        self.sent: deque[float] = deque()

    def wait_time(self, now: float) -> float:
        while self.sent and now - self.sent[0] >= 60.0:
            self.sent.popleft()
        wait = 0.0
        if self.sent:
            wait = max(wait, self.sent[-1] + self.min_interval - now)
        if len(self.sent) >= self.per_minute:
            wait = max(wait, self.sent[0] + 60.0 - now)
        return wait

    def record(self, now: float) -> None:
        self.sent.append(now)


class AlertSink:
    """The EventSink the detector publishes to. See the module docstring."""

    def __init__(self, cfg: AlertingConfig, *, state_dir: Path, clock: Callable[[], float] = time.time,
                 start_thread: bool = True, targets: Sequence[Any] | None = None, ephemeral: bool = False,
                 require_outbox: bool = False) -> None:
        """``ephemeral``: ``state_dir`` is deleted when the process ends (what is left undelivered
        is lost, and close() says so). ``require_outbox``: raise OutboxUnavailable instead of
        waiting in memory for the outbox (the CLI's one-shot commands)."""
        self.cfg = cfg
        self.clock = clock
        self.state_dir = Path(state_dir)
        self.ephemeral = ephemeral
        self.targets: dict[str, Any] = {t.name: t for t in (targets if targets is not None else _make_targets(cfg, self.state_dir))}
        self.outbox: Outbox | None = None
        self.lifecycle: Lifecycle | None = None  # both set once the outbox opens
        self._backlog: deque[Event] = deque()
        self._outbox_lock = threading.Lock()  # opening the outbox and recording the backlog
        self._outage: str | None = None  # why the outbox cannot be used, while it cannot
        self._next_try = 0.0  # monotonic time of the next attempt during an outage
        self._limiters = {name: _RateLimiter(cfg.notify.max_per_minute,
                                             cfg.notify.min_interval_s if name == "slack" else 0.0)
                          for name in self.targets}
        self._scores: deque[tuple[str | None, float, dict[Any, float]]] = deque(maxlen=1000)
        # One delivery thread per target, so a slow W&B never holds up Slack.
        self._locks = {name: threading.Lock() for name in self.targets}
        self._wakes = {name: threading.Event() for name in self.targets}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False
        if require_outbox:
            self._open_outbox()
        else:
            self._ensure_outbox()
        if start_thread:
            for name in self.targets:
                t = threading.Thread(target=self._loop, args=(name,), name=f"rankwatch-alerts-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    # -- the outbox ---------------------------------------------------------------------------

    def _open_outbox(self) -> None:
        self.outbox = Outbox(self.state_dir / OUTBOX_FILE)
        self.lifecycle = Lifecycle(self.outbox, list(self.targets.values()), self.cfg.notify, self.clock)
        n = self.outbox.requeue_interrupted(self.clock())
        if n:
            log.info("alerting: %d notification(s) were being sent when the last process stopped; "
                     "checking whether they arrived before sending them again", n)

    def _ensure_outbox(self, *, force: bool = False) -> bool:
        """Open the outbox if it is not open yet; record the events waiting in memory. False
        while it cannot be used (warned once per outage). During an outage it is tried again
        at most every ``retry_interval_s`` (each try may wait ``LOCK_WAIT_S`` on the lock), so a
        detector publishing every cycle is not slowed down by each one."""
        if self._outage is not None and not force and time.monotonic() < self._next_try:
            return False
        with self._outbox_lock:
            try:
                if self.outbox is None:
                    self._open_outbox()
                if self._backlog:
                    assert self.lifecycle is not None
                    batch = list(self._backlog)
                    self._queue_event_scores(self.lifecycle.ingest(batch))
                    for _ in batch:  # publish() may have appended more meanwhile: keep those
                        self._backlog.popleft()
                    if self._outage:
                        log.warning("alerting: the outbox can be used again; recorded %d event(s) kept in memory",
                                    len(batch))
            except (OutboxUnavailable, sqlite3.OperationalError) as exc:
                why = str(exc) if isinstance(exc, OutboxUnavailable) else f"{self.state_dir / OUTBOX_FILE}: {exc}"
                if self._outage is None:
                    log.warning("alerting: cannot write the outbox (%s); events wait in memory and notifications "
                                "are delayed until it can be written", why)
                self._outage = why
                self._next_try = time.monotonic() + min(self.cfg.notify.retry_interval_s, 30.0)
                return False
            self._outage = None
            return True

    # -- EventSink ----------------------------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        try:
            if events:
                self._backlog.extend(events)
                while len(self._backlog) > MAX_BACKLOG:
                    lost = self._backlog.popleft()
                    log.error("alerting: more than %d events wait for the outbox; dropped the oldest (%s %s, run %s)",
                              MAX_BACKLOG, lost.kind, lost.state, lost.run)
                self._ensure_outbox()
        except Exception:  # the detector must keep cycling whatever happens here
            log.error("alerting: could not record %d events in the outbox:\n%s", len(events),
                      redact(traceback.format_exc()))
            self._backlog.clear()
        self._wake_all()

    def _wake_all(self) -> None:
        for ev in self._wakes.values():
            ev.set()

    def log_scores(self, run: str | None, data_time: float, scores: Mapping[Any, float]) -> None:
        """Optional: the detector's per-rank scores of one evaluation, for W&B (best effort)."""
        if "wandb" in self.targets:
            self._scores.append((run, float(data_time), dict(scores)))
            self._wakes["wandb"].set()

    def close(self) -> None:
        """Stop the thread, send what can be sent within ``notify.close_timeout_s`` (held firings
        included), leave the rest in the outbox for the next start (or say that it is lost)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake_all()
        for t in self._threads:
            t.join(timeout=60)
        if not self._ensure_outbox(force=True) or self.outbox is None or self.lifecycle is None:
            if self._backlog:
                log.error("alerting: %d event(s) could not be recorded in the outbox (%s): their notifications are "
                          "dropped", len(self._backlog), self._outage)
            self._close_targets()
            if self.outbox is not None:
                self.outbox.close()
            return
        try:
            self.lifecycle.release_held()
            if self.cfg.notify.close_timeout_s > 0:
                self.flush(timeout=self.cfg.notify.close_timeout_s)
        except Exception:
            log.error("alerting: final delivery failed:\n%s", redact(traceback.format_exc()))
        try:
            left = self.outbox.counts().get("pending", 0)
        except sqlite3.Error:
            left = 0
        if left and self.ephemeral:
            log.warning("alerting: %d notification(s) not delivered are dropped: %s is a temporary directory, "
                        "deleted at exit", left, self.state_dir)
        elif left:
            log.warning("alerting: %d notification(s) left in %s for the next start (or `rankwatch alerts flush`)",
                        left, self.outbox.path)
        self._close_targets()
        self.outbox.close()

    def _close_targets(self) -> None:
        for t in self.targets.values():
            if hasattr(t, "close"):
                t.close()

    # -- delivery -----------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> int:
        """Deliver everything due now, waiting for rate limits and retries up to ``timeout``.
        Returns the number of rows still pending."""
        deadline = time.monotonic() + timeout
        self._ensure_outbox(force=True)
        while True:
            self.deliver_due()
            if self.outbox is None:
                return len(self._backlog)
            nxt = self.outbox.next_due_time(list(self.targets))
            if nxt is None:
                return 0
            wait = nxt - self.clock()
            if time.monotonic() + max(wait, 0) > deadline:
                return self.outbox.counts().get("pending", 0)
            if wait > 0:
                time.sleep(min(wait, 1.0))

    def deliver_due(self, targets: Sequence[str] | None = None) -> int:
        """One pass over the due rows of ``targets`` (default: all). Returns how many were
        delivered."""
        if not self._ensure_outbox():
            return 0
        assert self.outbox is not None and self.lifecycle is not None
        names = sorted(self.targets if targets is None else targets)
        locks = [self._locks[n] for n in names]
        for lock in locks:
            lock.acquire()
        try:
            self.lifecycle.renotify()
            delivered = 0
            # A row done (or skipped) unblocks the next row of its scope: go round again.
            for _ in range(20):
                outcomes = [self._deliver(row) for row in self.outbox.due(names, self.clock())]
                delivered += outcomes.count("delivered")
                if not {"delivered", "skipped", "refused"} & set(outcomes):
                    break
            if "wandb" in names:
                self._drain_scores()  # after the alerts: scores must not delay them
            if "alertmanager" in names:
                refused = {r["episode"] for r in self.outbox.query(
                    "SELECT episode FROM outbox WHERE target='alertmanager' AND action='firing' AND status='failed'")}
                self.targets["alertmanager"].resend(
                    [e for e in self.lifecycle.firing_episodes() if e.episode not in refused], self.clock())
            return delivered
        finally:
            for lock in reversed(locks):
                lock.release()

    def _deliver(self, row: OutboxRow) -> str:
        """Try one row: 'delivered', 'skipped', 'refused' (for good), 'deferred' (rate limit) or
        'failed'."""
        assert self.outbox is not None and self.lifecycle is not None
        target = self.targets[row.target]
        now = self.clock()
        if not target.wants(row.action):
            self.outbox.mark_skipped(row.id, f"{row.target} does not do {row.action}")
            return "skipped"
        if row.action == "update" and self.outbox.query(
                "SELECT 1 FROM outbox WHERE target=? AND scope=? AND id>? AND action='resolved'",
                (row.target, row.scope, row.id)):
            self.outbox.mark_skipped(row.id, "superseded by resolved")
            return "skipped"
        prior = self.outbox.delivered_result(row.target, row.scope, "firing")
        if row.unsure and hasattr(target, "find_posted"):
            # The last attempt may have arrived (timeout after sending, or a crash): look first.
            thread_ts = prior.get("ts") if prior and row.action != "firing" else None
            try:
                found = target.find_posted(row.key, row.sending_wall or row.created_wall, thread_ts=thread_ts)
            except DeliveryError as exc:
                if not exc.permanent:
                    self._failed(row, f"cannot tell whether the last attempt arrived: {exc}", exc.retry_after,
                                 unsure=True)
                    return "failed"
                log.warning("alerting: %s: %s; sending %s again, which may post it twice", row.target,
                            redact(str(exc)), row.key)
                found = None
            if found is not None:
                self.outbox.mark_delivered(row.id, self.clock(), found)
                if not target.per_episode:
                    self.lifecycle.touch(int(row.incident_id or 0))
                log.info("alerting: %s %s (%s) had arrived; not sending it again", row.target, row.action, row.key)
                return "delivered"
        # Rows of this scope stuck behind a rate limit would block it; others may still go.
        wait = self._limiters[row.target].wait_time(now)
        if wait > 0:
            self.outbox.defer(row.id, now + wait)
            return "deferred"
        if target.per_episode:
            view: Any = self.lifecycle.episode(str(row.episode))
        else:
            view = self.lifecycle.incident(int(row.incident_id or 0))
        self.outbox.mark_sending(row.id, now)
        self._limiters[row.target].record(now)
        try:
            result = target.deliver(row.action, view, prior, row.key)
        except DeliveryError as exc:
            if exc.permanent:
                self.outbox.mark_given_up(row.id, str(exc))
                log.error("alerting: %s refused %s %s for good, not retrying it: %s", row.target, row.action,
                          row.key, redact(str(exc)))
                return "refused"
            self._failed(row, str(exc), exc.retry_after, unsure=exc.unsure)
            return "failed"
        except Exception as exc:  # a bug in one target must not stop the others
            log.error("alerting: %s %s failed unexpectedly:\n%s", row.target, row.action,
                      redact(traceback.format_exc()))
            self._failed(row, f"{type(exc).__name__}: {exc}", None)
            return "failed"
        self.outbox.mark_delivered(row.id, self.clock(), result)
        if not target.per_episode:
            self.lifecycle.touch(int(row.incident_id or 0))
        log.info("alerting: delivered %s %s (%s)", row.target, row.action, row.key)
        return "delivered"

    def _failed(self, row: OutboxRow, error: str, retry_after: float | None, *, unsure: bool = False) -> None:
        assert self.outbox is not None
        attempts = row.attempts + 1
        backoff = min(self.cfg.notify.retry_max_backoff_s, self.cfg.notify.retry_interval_s * 2 ** min(attempts - 1, 10))
        if retry_after is not None:
            backoff = max(retry_after, 0.0)
        error = redact(error)
        self.outbox.mark_failed(row.id, error, self.clock() + backoff, unsure=unsure)
        log.warning("alerting: %s %s not delivered (attempt %d, next in %.0f s%s): %s", row.target, row.action,
                    attempts, backoff, "; it may have arrived: checked before the next attempt" if unsure else "",
                    error)

    def _queue_event_scores(self, events: Sequence[Event]) -> None:
        if "wandb" not in self.targets:
            return
        by_run: dict[tuple[str | None, float], dict[Any, float]] = {}
        for ev in events:
            if ev.rank is not None:
                by_run.setdefault((ev.run, ev.time), {})[ev.rank] = ev.score
        for (run, t), scores in by_run.items():
            self._scores.append((run, t, scores))

    def _drain_scores(self) -> None:
        wb = self.targets.get("wandb")
        while self._scores:
            run, t, scores = self._scores.popleft()
            try:
                wb.log_scores(run, t, scores)
            except Exception as exc:  # scores are best effort
                log.warning("alerting: W&B score logging failed: %s", exc)
                return

    def _loop(self, name: str) -> None:
        wake = self._wakes[name]
        busy = False
        while not self._stop.is_set():
            nxt = None
            try:
                self.deliver_due([name])
                nxt = self.outbox.next_due_time([name]) if self.outbox is not None else None
                if busy:
                    log.info("alerting: %s delivery: the outbox can be used again", name)
                busy = False
            except sqlite3.OperationalError as exc:  # locked by another process: bounded wait, next pass
                if not busy:
                    log.warning("alerting: %s delivery paused: outbox busy (%s); trying again every %g s", name, exc,
                                self.cfg.notify.retry_interval_s)
                busy = True
            except Exception:  # keep the thread alive (e.g. a transient SQLite error)
                log.error("alerting: %s delivery pass failed:\n%s", name, redact(traceback.format_exc()))
            timeout = self.cfg.notify.retry_interval_s
            if nxt is not None:
                timeout = min(timeout, max(0.05, nxt - self.clock()))
            wake.wait(timeout)
            wake.clear()


def _make_targets(cfg: AlertingConfig, state_dir: Path) -> list[Any]:
    targets: list[Any] = []
    if cfg.slack is not None:
        from rankwatch.alerts.slack import SlackNotifier

        targets.append(SlackNotifier(cfg.slack, cfg.links))
    if cfg.wandb is not None:
        from rankwatch.alerts.wandb_notifier import WandbNotifier

        targets.append(WandbNotifier(cfg.wandb, cfg.links, state_dir))
    if cfg.alertmanager is not None:
        from rankwatch.alerts.alertmanager import AlertmanagerNotifier

        targets.append(AlertmanagerNotifier(cfg.alertmanager, cfg.links))
    return targets


def build_sink(config: Mapping[str, Any], *, state_dir: Path, source: str = "<config>",
               environ: Mapping[str, str] | None = None, ephemeral: bool = False) -> EventSink | None:
    """The detector's sink for a parsed TOML document, or None when nothing is configured.
    Raises ConfigError (naming the key) for an invalid [slack]/[wandb]/[alertmanager]/[notify]/
    [links] table. ``ephemeral``: ``state_dir`` is a temporary directory deleted at exit."""
    cfg = load_alerting_config(config, source=source, environ=environ)
    if not cfg.any_target:
        return None
    return AlertSink(cfg, state_dir=Path(state_dir), ephemeral=ephemeral)
