"""The detector's own metrics and its HTTP endpoint (``/metrics``, ``/healthz``).

Per-rank score and flagged state are rebuilt from the core after every cycle (a rank that left
the job disappears from /metrics instead of lingering); counters count query errors per query,
events per kind and state, and sink failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from rankwatch.detectors.cadence import WindowPlan
from rankwatch.detectors.coverage import SOURCES, Coverage
from rankwatch.errors import ConfigError
from rankwatch.events import Event
from rankwatch.httpserver import HttpServer, Limits, parse_listen_address


class _RankCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scores: dict[tuple[str, int], float] = {}
        self._flagged: set[tuple[str, int]] = set()

    def update(self, scores: Mapping[tuple[str, int], float], flagged: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            self._scores = dict(scores)
            self._flagged = set(flagged)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            scores, flagged = dict(self._scores), set(self._flagged)
        score = GaugeMetricFamily("rankwatch_detector_rank_score",
                                  "Straggler score of the rank at the last evaluation (robust z within its peer group).",
                                  labels=["run", "rank"])
        flag = GaugeMetricFamily("rankwatch_detector_rank_flagged",
                                 "1 while the rank has an open straggler episode.", labels=["run", "rank"])
        for run, rank in sorted(set(scores) | flagged):
            if (run, rank) in scores:
                score.add_metric([run, str(rank)], scores[(run, rank)])
            flag.add_metric([run, str(rank)], 1.0 if (run, rank) in flagged else 0.0)
        yield score
        yield flag


class DetectorMetrics:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ranks = _RankCollector()
        r.register(self.ranks)
        self.cycle_duration = Gauge("rankwatch_detector_cycle_duration_seconds",
                                    "Wall time of the last evaluation cycle, queries included.", registry=r)
        self.cycles = Counter("rankwatch_detector_cycles", "Evaluation cycles run.", registry=r)
        self.cycle_failures = Counter("rankwatch_detector_cycle_failures",
                                      "Cycles that raised an unexpected error (logged) and evaluated nothing.",
                                      registry=r)
        self.query_errors = Counter("rankwatch_detector_query_errors", "Queries that failed, by query.",
                                    ["query"], registry=r)
        self.events = Counter("rankwatch_detector_events", "Events emitted, by kind and state.",
                              ["kind", "state"], registry=r)
        self.sink_errors = Counter("rankwatch_detector_sink_errors", "Exceptions raised by an event sink.",
                                   ["sink"], registry=r)
        self.last_cycle = Gauge("rankwatch_detector_last_cycle_timestamp_seconds",
                                "Unix time (wall clock) the last cycle finished.", registry=r)
        self.last_evaluated = Gauge("rankwatch_detector_last_evaluated_timestamp_seconds",
                                    "Data time of the last evaluation.", registry=r)
        self.observed = Gauge("rankwatch_detector_observed", "Objects in the last snapshot, by kind.",
                              ["kind"], registry=r)
        self.interval = Gauge("rankwatch_detector_interval_seconds",
                              "Evaluation interval in use (the configured one, raised to the probes' scrape interval).",
                              registry=r)
        self.interval.set(interval_s)
        # Coverage: what the detector sees out of what it knows (RankwatchDetectorBlind and
        # RankwatchDetectorPartialCoverage alert on these).
        self.coverage_known = Gauge(
            "rankwatch_detector_coverage_known",
            "Objects the detector knows, by source: ranks of live runs (world_size where stated), GPUs, EFA NICs, "
            "node exporters.", ["source"], registry=r)
        self.coverage_with_data = Gauge(
            "rankwatch_detector_coverage_with_data",
            "Objects with data in the last evaluation's window, by source (ranks, gpus, nics, nodes).", ["source"],
            registry=r)
        self.run_ranks_expected = Gauge("rankwatch_detector_run_ranks_expected",
                                        "Ranks of a live run (world_size where the probes state it).", ["run"], registry=r)
        self.run_ranks_with_data = Gauge("rankwatch_detector_run_ranks_with_data",
                                         "Ranks of a live run with data in the last evaluation's window.", ["run"],
                                         registry=r)
        self.failed_queries = Gauge("rankwatch_detector_last_cycle_failed_queries",
                                    "Queries that failed in the last cycle.", registry=r)
        self.queries = Gauge("rankwatch_detector_last_cycle_queries", "Queries the last cycle sent.", registry=r)
        self.spacing = Gauge("rankwatch_detector_sample_spacing_seconds",
                             "Sample spacing learned from the data, by source (probe, node); absent while unknown.",
                             ["source"], registry=r)
        self.window = Gauge("rankwatch_detector_window_seconds", "Window of the rates in use, by source (probe, node).",
                            ["source"], registry=r)
        self.started = time.time()
        self._last_ok_wall: float | None = None
        self._last_errors = 0
        self._last_t: float | None = None

    def observe_plan(self, plan: WindowPlan) -> None:
        self.interval_s = plan.interval_s
        self.interval.set(plan.interval_s)
        for source, spacing, window in (("probe", plan.spacing.probe_s, plan.window_s),
                                        ("node", plan.spacing.node_s, plan.node_window_s)):
            if spacing is None:
                try:
                    self.spacing.remove(source)
                except KeyError:
                    pass
            else:
                self.spacing.labels(source).set(spacing)
            self.window.labels(source).set(window)

    def observe_coverage(self, cov: Coverage, n_queries: int | None = None) -> None:
        for source in SOURCES:
            self.coverage_known.labels(source).set(cov.known[source])
            self.coverage_with_data.labels(source).set(cov.with_data[source])
        # runs come and go: rebuilt every cycle so an ended run does not linger
        self.run_ranks_expected.clear()
        self.run_ranks_with_data.clear()
        for run, c in cov.runs.items():
            self.run_ranks_expected.labels(run).set(c.expected)
            self.run_ranks_with_data.labels(run).set(c.with_data)
        self.failed_queries.set(len(cov.failed_queries))
        if n_queries is not None:
            self.queries.set(n_queries)

    def observe_cycle(self, *, t: float, duration_s: float, errors: list[str], events: list[Event],
                      scores: Mapping[tuple[str, int], float], flagged: Iterable[tuple[str, int]],
                      counts: Mapping[str, int]) -> None:
        self.cycles.inc()
        self.cycle_duration.set(duration_s)
        for e in errors:
            self.query_errors.labels(e.split(":", 1)[0] if ":" in e else "unknown").inc()
        for ev in events:
            self.events.labels(ev.kind, ev.state).inc()
        self.ranks.update(scores, flagged)
        for kind, n in counts.items():
            self.observed.labels(kind).set(n)
        now = time.time()
        self.last_cycle.set(now)
        self.last_evaluated.set(t)
        self._last_ok_wall = now
        self._last_errors = len(errors)
        self._last_t = t

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the loop keeps cycling (Prometheus failures are reported, not fatal)."""
        now = time.time()
        budget = max(3 * self.interval_s, 60.0)
        last = self._last_ok_wall
        ok = (now - self.started < budget) if last is None else (now - last < budget)
        return ok, {"status": "ok" if ok else "stalled", "last_cycle_wall_time": last,
                    "last_evaluated_time": self._last_t, "query_errors_last_cycle": self._last_errors}


# Prometheus scrapes the detector; nothing else needs it. Two workers are plenty.
SERVER_LIMITS = Limits(workers=2, max_connections=64)


class _Handler(BaseHTTPRequestHandler):
    server: Any  # the HttpServer, with .metrics attached
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        m: DetectorMetrics = self.server.metrics
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, ctype, encoder(m.registry))
        elif path == "/healthz":
            ok, body = m.health()
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class MetricsServer:
    """``/metrics`` (Prometheus text or OpenMetrics by Accept header) and ``/healthz`` (JSON; 503
    once no cycle has finished for three intervals), served by :mod:`rankwatch.httpserver`:
    bounded workers, and idle or half-open clients dropped after its timeouts."""

    def __init__(self, metrics: DetectorMetrics, listen: str, limits: Limits = SERVER_LIMITS) -> None:
        try:
            host, port = parse_listen_address(listen, "--listen")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.httpd = HttpServer(host, port, _Handler, limits=limits, name="rankwatch-detector")
        except OSError as exc:
            raise ConfigError(f"--listen {listen}: cannot listen ({exc.strerror or exc})") from None
        self.httpd.metrics = metrics  # type: ignore[attr-defined]
        self.port = self.httpd.port

    def close(self) -> None:
        self.httpd.stop()
