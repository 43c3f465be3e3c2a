"""Alerting: detector events → Slack, W&B and Alertmanager, through a durable SQLite outbox.

``build_sink(config, state_dir=...)`` is what the detector calls: it validates the [slack],
[wandb], [alertmanager], [notify] and [links] tables and returns an ``AlertSink`` (an
``EventSink``) or None when no target is configured.

``AlertSink.publish(events)`` only writes to SQLite and wakes the delivery thread, so it is fast
and never raises for delivery problems; the delivery thread sends what is due, retries failures
with backoff (honouring Retry-After), re-notifies long-lived incidents and re-posts firing
alerts to Alertmanager. Whatever is undelivered when the process ends — or is killed — is
delivered by the next process that opens the same state directory."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rankwatch.alerts.config import AlertingConfig, load_alerting_config
from rankwatch.alerts.delivery import DeliveryError
from rankwatch.alerts.lifecycle import Lifecycle
from rankwatch.alerts.outbox import Outbox, OutboxRow
from rankwatch.events import Event, EventSink

__all__ = ["AlertSink", "build_sink", "load_alerting_config"]

log = logging.getLogger(__name__)
OUTBOX_FILE = "alerts.sqlite"


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
                 start_thread: bool = True, targets: Sequence[Any] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.state_dir = Path(state_dir)
        self.outbox = Outbox(self.state_dir / OUTBOX_FILE)
        self.targets: dict[str, Any] = {t.name: t for t in (targets if targets is not None else _make_targets(cfg, self.state_dir))}
        self.lifecycle = Lifecycle(self.outbox, list(self.targets.values()), cfg.notify, clock)
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
        self._recover_in_flight()
        if start_thread:
            for name in self.targets:
                t = threading.Thread(target=self._loop, args=(name,), name=f"rankwatch-alerts-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    # -- EventSink ----------------------------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        try:
            if events:
                self._queue_event_scores(self.lifecycle.ingest(events))
        except Exception:  # the detector must keep cycling whatever happens here
            log.exception("alerting: could not record %d events in the outbox", len(events))
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
        included), leave the rest in the outbox for the next start."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake_all()
        for t in self._threads:
            t.join(timeout=60)
        try:
            self.lifecycle.release_held()
            if self.cfg.notify.close_timeout_s > 0:
                self.flush(timeout=self.cfg.notify.close_timeout_s)
        except Exception:
            log.exception("alerting: final delivery failed")
        left = self.outbox.counts().get("pending", 0)
        if left:
            log.warning("alerting: %d notifications left in %s for the next start", left, self.outbox.path)
        for t in self.targets.values():
            if hasattr(t, "close"):
                t.close()
        self.outbox.close()

    # -- delivery -----------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> int:
        """Deliver everything due now, waiting for rate limits and retries up to ``timeout``.
        Returns the number of rows still pending."""
        deadline = time.monotonic() + timeout
        while True:
            self.deliver_due()
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
                if not {"delivered", "skipped"} & set(outcomes):
                    break
            if "wandb" in names:
                self._drain_scores()  # after the alerts: scores must not delay them
            if "alertmanager" in names:
                self.targets["alertmanager"].resend(self.lifecycle.firing_episodes(), self.clock())
            return delivered
        finally:
            for lock in reversed(locks):
                lock.release()

    def _deliver(self, row: OutboxRow) -> str:
        """Try one row: 'delivered', 'skipped', 'deferred' (rate limit) or 'failed'."""
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
        # Rows of this scope stuck behind a rate limit would block it; others may still go.
        wait = self._limiters[row.target].wait_time(now)
        if wait > 0:
            self.outbox.defer(row.id, now + wait)
            return "deferred"
        if target.per_episode:
            view: Any = self.lifecycle.episode(str(row.episode))
        else:
            view = self.lifecycle.incident(int(row.incident_id or 0))
        prior = self.outbox.delivered_result(row.target, row.scope, "firing")
        self.outbox.mark_sending(row.id, now)
        self._limiters[row.target].record(now)
        try:
            result = target.deliver(row.action, view, prior, row.key)
        except DeliveryError as exc:
            self._failed(row, str(exc), exc.retry_after)
            return "failed"
        except Exception as exc:  # a bug in one target must not stop the others
            log.exception("alerting: %s %s failed unexpectedly", row.target, row.action)
            self._failed(row, f"{type(exc).__name__}: {exc}", None)
            return "failed"
        self.outbox.mark_delivered(row.id, self.clock(), result)
        if not target.per_episode:
            self.lifecycle.touch(int(row.incident_id or 0))
        log.info("alerting: delivered %s %s (%s)", row.target, row.action, row.key)
        return "delivered"

    def _failed(self, row: OutboxRow, error: str, retry_after: float | None) -> None:
        attempts = row.attempts + 1
        backoff = min(self.cfg.notify.retry_max_backoff_s, self.cfg.notify.retry_interval_s * 2 ** min(attempts - 1, 10))
        if retry_after is not None:
            backoff = max(retry_after, 0.0)
        self.outbox.mark_failed(row.id, error, self.clock() + backoff)
        log.warning("alerting: %s %s not delivered (attempt %d, next in %.0f s): %s",
                    row.target, row.action, attempts, backoff, error)

    def _recover_in_flight(self) -> None:
        """Rows left 'sending' by a crash: ask Slack whether the message made it (bot token:
        message metadata carries the idempotency key), else send again."""
        for row in self.outbox.rows(status="sending"):
            target = self.targets.get(row.target)
            found = None
            if target is not None and hasattr(target, "find_posted") and row.action == "firing":
                try:
                    found = target.find_posted(row.key, row.sending_wall or 0.0)
                except DeliveryError as exc:
                    log.warning("alerting: %s", exc)
            if found is not None:
                self.outbox.mark_delivered(row.id, self.clock(), found)
                log.info("alerting: %s was delivered before the restart; not sending it again", row.key)
            else:
                self.outbox.mark_failed(row.id, "interrupted", self.clock())

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
        while not self._stop.is_set():
            try:
                self.deliver_due([name])
            except Exception:  # keep the thread alive (e.g. a transient SQLite error)
                log.exception("alerting: %s delivery pass failed", name)
            nxt = self.outbox.next_due_time([name])
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
               environ: Mapping[str, str] | None = None) -> EventSink | None:
    """The detector's sink for a parsed TOML document, or None when nothing is configured.
    Raises ConfigError (naming the key) for an invalid [slack]/[wandb]/[alertmanager]/[notify]/
    [links] table."""
    cfg = load_alerting_config(config, source=source, environ=environ)
    if not cfg.any_target:
        return None
    return AlertSink(cfg, state_dir=Path(state_dir))
