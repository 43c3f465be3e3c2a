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
from rankwatch.detectors.state import DetectorState
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


def align_down(t: float, interval: float) -> float:
    return math.floor(t / interval + 1e-9) * interval


def align_up(t: float, interval: float) -> float:
    return math.ceil(t / interval - 1e-9) * interval


class EventWriter:
    """JSON lines to a stream (stdout) and/or appended to a file, flushed per event."""

    def __init__(self, stream: IO[str] | None = None, path: str | Path | None = None) -> None:
        self.stream = stream
        self.file: IO[str] | None = None
        if path is not None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.file = p.open("a", encoding="utf-8")

    def publish(self, events: Sequence[Event]) -> None:
        for e in events:
            line = e.to_json() + "\n"
            for out in (self.stream, self.file):
                if out is not None:
                    out.write(line)
                    out.flush()

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
    # what the evaluation saw out of what it knows (``Coverage.describe()`` is one log line)
    coverage: Coverage | None = None


class DetectorService:
    def __init__(self, source: SnapshotSource, core: Core, *, interval_s: float, writer: EventWriter | None = None,
                 sinks: Iterable[EventSink] = (), state: DetectorState | None = None,
                 metrics: DetectorMetrics | None = None, query_delay_s: float = 2.0, max_catchup_s: float = 3600.0,
                 clock: Callable[[], float] = time.time, cadence: Cadence | None = None) -> None:
        self.source = source
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
                    raise ConfigError(f"--state-db {state.path}: cannot resume from the stored state ({exc}); "
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
            except Exception:  # disk full, locked file: keep detecting, the events still go out
                log.exception("cannot save detector state at %.3f", t)
        self._emit(events)
        if self.state is not None and ids:
            try:
                self.state.mark_published(ids)
            except Exception:
                log.exception("cannot mark events published")
        duration = time.perf_counter() - started
        n_queries = len(getattr(self.source, "queries", ())) or None
        all_failed = bool(snap.errors) and n_queries is not None and len(snap.errors) >= n_queries
        if self.metrics is not None:
            self.metrics.observe_cycle(
                t=t, duration_s=duration, errors=snap.errors, events=events, scores=self.core.scores,
                flagged=self.core.flagged,
                counts={"ranks": len(snap.ranks), "gpus": len(snap.gpus), "nics": len(snap.nics),
                        "nodes": len(snap.nodes)})
        return CycleResult(t, events, list(snap.errors), duration, all_failed, cov)

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
            if t > due:
                stop.wait(max(0.0, t + self.query_delay_s - self.clock()))
                continue
            interval = self.interval_s
            res = self.run_cycle(t)
            if res.errors:
                log.warning("evaluation at %.0f: %d quer%s failed", t, len(res.errors),
                            "y" if len(res.errors) == 1 else "ies")
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
