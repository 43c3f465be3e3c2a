"""The detector loop: every interval, a Snapshot at the aligned data time → ``core.evaluate`` →
state saved → events written and handed to the sinks.

Nothing outside the loop's control stops it: failed queries are in the Snapshot (missing data,
counted in /metrics), a sink that raises is logged and counted, an unexpected error in a cycle
is logged and the next cycle runs. Live mode evaluates at multiples of the interval (data time),
a few seconds after they pass so the scrapes have landed; after a restart it first catches up
on the evaluations it missed (bounded by ``max_catchup_s``).

With a ``Cadence`` the loop follows the data: the sample spacing is learned at the first cycle
and re-learned regularly, the source's windows and the evaluation interval follow it, and the
log says what is watched (a summary per run, one line per coverage change)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from rankwatch.detectors.cadence import Cadence
from rankwatch.detectors.coverage import Coverage
from rankwatch.detectors.coverage_log import CoverageLog
from rankwatch.detectors.metrics import DetectorMetrics
from rankwatch.detectors.model import Snapshot
from rankwatch.detectors.state import DetectorState, StateError
from rankwatch.errors import ConfigError
from rankwatch.events import Event, EventSink

log = logging.getLogger(__name__)


class Core(Protocol):
    scores: dict[tuple[str, int], float]
    flagged: set[tuple[str, int]]

    def evaluate(self, snapshot: Snapshot) -> list[Event]: ...

    def export_state(self) -> dict[str, Any]: ...

    def import_state(self, state: dict[str, Any]) -> None: ...


class SnapshotSource(Protocol):
    def snapshot(self, t: float) -> Snapshot: ...


def summarize_errors(errors: Sequence[str], n_queries: int | None = None) -> str:
    """One line for a cycle's failed queries (``"<query>: <reason>"`` each): how many failed and
    their distinct reasons, the queries skipped after the server failed folded into the first."""
    reasons: list[str] = []
    for e in errors:
        reason = e.split(": ", 1)[-1]
        if not reason.startswith("skipped, ") and reason not in reasons:
            reasons.append(reason)
    if not reasons:  # only skips (cannot happen: something failed first)
        reasons = [errors[0].split(": ", 1)[-1]] if errors else []
    of = f" of {n_queries}" if n_queries else ""
    noun = "query" if (n_queries or len(errors)) == 1 else "queries"
    text = f"{len(errors)}{of} {noun} failed, their quantities are missing: "
    text += "; ".join(reasons[:2])
    return text + (f" (+{len(reasons) - 2} other reasons)" if len(reasons) > 2 else "")


def align_down(t: float, interval: float) -> float:
    return math.floor(t / interval + 1e-9) * interval


def align_up(t: float, interval: float) -> float:
    return math.ceil(t / interval - 1e-9) * interval


class EventWriter:
    """JSON lines to a stream (stdout) and/or appended to a file, flushed per event. ``render``
    formats the stream's lines instead (``--format text``); the file stays JSON lines."""

    def __init__(self, stream: IO[str] | None = None, path: str | Path | None = None,
                 render: Callable[[Event], str] | None = None) -> None:
        self.stream = stream
        self.render = render
        self.file: IO[str] | None = None
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.file = p.open("a", encoding="utf-8")

    def publish(self, events: Sequence[Event]) -> None:
        for e in events:
            line = e.to_json() + "\n"
            if self.file is not None:
                self.file.write(line)
                self.file.flush()
            if self.stream is not None:
                self.stream.write(line if self.render is None else self.render(e) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass
class CycleResult:
    time: float
    events: list[Event]
    errors: list[str]
    duration_s: float
    all_failed: bool
    snapshot: Snapshot | None = None  # what was evaluated (None when the cycle failed)
    # what the evaluation saw out of what it knows (``Coverage.describe()`` is one log line)
    coverage: Coverage | None = None


class DetectorService:
    def __init__(self, source: SnapshotSource, core: Core, *, interval_s: float, writer: EventWriter | None = None,
                 sinks: Iterable[EventSink] = (), state: DetectorState | None = None,
                 metrics: DetectorMetrics | None = None, query_delay_s: float = 2.0, max_catchup_s: float = 3600.0,
                 clock: Callable[[], float] = time.time,
                 on_cycle: Callable[[CycleResult], None] | None = None, cadence: Cadence | None = None) -> None:
        self.source = source
        self.on_cycle = on_cycle  # after every live cycle (the CLI's heartbeat)
        self.core = core
        self._interval_s = float(interval_s)
        self.cadence = cadence
        self.coverage_log = CoverageLog()
        self.writer = writer
        self.sinks = list(sinks)
        self.state = state
        self.metrics = metrics
        self.query_delay_s = query_delay_s
        self.max_catchup_s = max_catchup_s
        self.clock = clock
        self.last_time: float | None = None
        self.cycles = 0
        if state is not None:
            saved, last = state.load()
            if saved is not None:
                try:
                    core.import_state(saved)
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"state database {state.path}: cannot resume from the stored state ({exc}); "
                                      "move the file away to start afresh") from None
                self.last_time = last
                log.info("resumed detector state: last evaluation at %.0f", last)
            self._publish_pending()

    @property
    def interval_s(self) -> float:
        """Seconds between evaluations: the cadence's (following the data) when there is one."""
        return self.cadence.plan.interval_s if self.cadence is not None else self._interval_s

    def _follow_data(self, t: float) -> None:
        """Re-learn the sample spacing when due; the source's windows follow the plan."""
        if self.cadence is None:
            return
        changed = self.cadence.update(t)
        plan = self.cadence.plan
        set_windows = getattr(self.source, "set_windows", None)
        if changed and set_windows is not None:
            set_windows(plan.window_s, plan.node_window_s)
        if self.metrics is not None and (changed or self.cycles == 0):
            self.metrics.observe_plan(plan)

    def _report_coverage(self, t: float) -> Coverage | None:
        cov = self.coverage_log.observe_core(self.core, t, self.cadence.plan if self.cadence is not None else None)
        if cov is not None and self.metrics is not None:
            self.metrics.observe_coverage(cov, len(getattr(self.source, "queries", ())) or None)
        return cov

    def _publish_pending(self) -> None:
        assert self.state is not None
        pending = self.state.pending()
        if pending:
            log.info("publishing %d event(s) saved before the last shutdown", len(pending))
            self._emit([e for _, e in pending])
            self.state.mark_published([i for i, _ in pending])

    def _emit(self, events: list[Event]) -> None:
        if self.writer is not None:
            try:
                self.writer.publish(events)
            except OSError as exc:
                log.error("cannot write events: %s", exc)
        for sink in self.sinks:
            try:
                sink.publish(events)
            except Exception:  # a notifier must never stop detection
                log.exception("event sink %s failed", type(sink).__name__)
                if self.metrics is not None:
                    self.metrics.sink_errors.labels(type(sink).__name__).inc()

    def run_cycle(self, t: float) -> CycleResult:
        """Evaluate data time ``t``: snapshot, evaluate, save, publish. Never raises."""
        started = time.perf_counter()
        try:
            self._follow_data(t)
            snap = self.source.snapshot(t)
            events = self.core.evaluate(snap)
        except Exception:
            log.exception("evaluation at %.3f failed", t)
            if self.metrics is not None:
                self.metrics.cycle_failures.inc()
            return CycleResult(t, [], ["cycle: unexpected error"], time.perf_counter() - started, True)
        self.last_time = t
        self.cycles += 1
        cov = self._report_coverage(t)
        ids: list[int] = []
        if self.state is not None:
            try:
                ids = self.state.save(t, self.core.export_state(), events)
            except StateError as exc:  # locked, disk full: keep detecting, the events still go out
                log.warning("detector state at %.0f not saved: %s; its %d event(s) are published anyway",
                            t, exc, len(events))
            except Exception:
                log.exception("cannot save detector state at %.3f", t)
        self._emit(events)
        if self.state is not None and ids:
            try:
                self.state.mark_published(ids)
            except StateError as exc:
                log.warning("events published but not marked so: %s (a restart publishes them again)", exc)
            except Exception:
                log.exception("cannot mark events published")
        duration = time.perf_counter() - started
        n_queries = len(getattr(self.source, "queries", ())) or None
        all_failed = bool(snap.errors) and n_queries is not None and len(snap.errors) >= n_queries
        if snap.errors:
            log.warning("evaluation at %.0f: %s", t, summarize_errors(snap.errors, n_queries))
        if self.metrics is not None:
            self.metrics.observe_cycle(
                t=t, duration_s=duration, errors=snap.errors, events=events, scores=self.core.scores,
                flagged=self.core.flagged,
                counts={"ranks": len(snap.ranks), "gpus": len(snap.gpus), "nics": len(snap.nics),
                        "nodes": len(snap.nodes)})
        return CycleResult(t, events, list(snap.errors), duration, all_failed, snap, cov)

    def first_time(self) -> float:
        """The first data time to evaluate: right after the saved one (catching up at most
        ``max_catchup_s``), else the latest aligned time whose data has landed."""
        due = align_down(self.clock() - self.query_delay_s, self.interval_s)
        if self.last_time is None:
            return due
        nxt = self.last_time + self.interval_s
        return max(nxt, align_down(due - self.max_catchup_s, self.interval_s))

    def run(self, stop: threading.Event) -> None:
        """Cycle until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""
        t = self.first_time()
        while not stop.is_set():
            due = align_down(self.clock() - self.query_delay_s, self.interval_s)
            if t > due + self.interval_s:
                # Only a clock set back puts the next evaluation more than an interval ahead:
                # waiting for it would leave the detector blind until then.
                log.warning("the clock went back: the next evaluation (data time %.0f) is %.0f s ahead of now; "
                            "evaluating from now on (%.0f)", t, t - due, due)
                t = due
            elif due - t > self.max_catchup_s:
                t = align_down(due - self.max_catchup_s, self.interval_s)
                log.warning("the clock jumped forward: skipping to data time %.0f (at most --max-catchup %.0f s "
                            "of missed evaluations)", t, self.max_catchup_s)
            if t > due:
                stop.wait(max(0.0, t + self.query_delay_s - self.clock()))
                continue
            interval = self.interval_s
            res = self.run_cycle(t)
            if self.on_cycle is not None:
                try:
                    self.on_cycle(res)
                except Exception:
                    log.exception("cycle hook failed")
            t += self.interval_s
            if self.interval_s != interval:
                t = align_up(t, self.interval_s)  # the data's spacing changed the grid
            if res.all_failed:
                # Nothing answered: do not replay a backlog into an unreachable server.
                t = max(t, align_down(self.clock() - self.query_delay_s, self.interval_s))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing event sink %s failed", type(sink).__name__)
        if self.writer is not None:
            self.writer.close()
        if self.state is not None:
            self.state.close()


@dataclass
class RangeResult:
    evaluations: int
    events: int
    first: float | None
    last: float | None


def evaluate_range(snapshots: Iterable[Snapshot], core: Core, *, writer: EventWriter | None = None,
                   sinks: Iterable[EventSink] = (), coverage_log: CoverageLog | None = None,
                   cadence: Cadence | None = None) -> RangeResult:
    """Replay and backtest: evaluate a sequence of Snapshots (data time) and publish the events
    of each evaluation before the next, exactly as the live loop would have (and log the same
    coverage lines with ``coverage_log``)."""
    sinks = list(sinks)
    n = n_events = 0
    first = last = None
    for snap in snapshots:
        events = core.evaluate(snap)
        if coverage_log is not None:
            coverage_log.observe_core(core, snap.time, cadence.plan if cadence is not None else None)
        n += 1
        n_events += len(events)
        first = snap.time if first is None else first
        last = snap.time
        if writer is not None:
            writer.publish(events)
        for sink in sinks:
            try:
                sink.publish(events)
            except Exception:
                log.exception("event sink %s failed", type(sink).__name__)
    return RangeResult(n, n_events, first, last)
