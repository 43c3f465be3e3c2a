"""`rankwatch node-exporter`: one daemon per compute node serving GPU and EFA metrics.

Collectors run on every scrape (nothing polls in the background except the GPU collector's
XID event listener). Scrapes that arrive while a collection is running wait for it and get
the same body, so a burst of scrapers costs one collection, never a pile-up.

Library use (the demo runs many simulated nodes in one process this way)::

    exporter = NodeExporter([GpuCollector(...), EfaCollector("/sys")], hostname="node-7")
    server = exporter.serve("127.0.0.1", 0)     # returns at once; server.port, server.url
    ...
    server.stop(); exporter.close()

and :class:`rankwatch.sim.node.SimulatedNode` bundles simulated hardware with both.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.metrics_core import Metric

from rankwatch import __version__, httpserver
from rankwatch.errors import ConfigError, RankwatchError
from rankwatch.exporters.base import Collector
from rankwatch.exporters.exposition import CONTENT_TYPE, Renderer
from rankwatch.exporters.selfmetrics import CollectorRunner, exporter_families, process_families
from rankwatch.httpserver import HttpServer, Limits, join_host_port
from rankwatch.sim.faults import NODE_FAULTS, Injection, parse_injection

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "0.0.0.0:9410"
# Scrapes coalesce into one collection (NodeExporter.scrape), so a few workers serve any burst.
SERVER_LIMITS = Limits(workers=8)
_LANDING = b"""<html><head><title>rankwatch node exporter</title></head><body>
<h1>rankwatch node exporter</h1><p><a href="/metrics">Metrics</a> &middot; <a href="/healthz">Health</a></p>
</body></html>
"""


class NodeExporter:
    """Collectors plus the exporter's own series, rendered in Prometheus text format 0.0.4.

    ``before_collect`` runs at the start of every collection (simulated hardware advances its
    counters there). ``process_metrics`` adds the standard ``process_*`` series.
    """

    def __init__(self, collectors: Sequence[Collector], hostname: str | None = None, *,
                 collector_timeout: float = 4.0, before_collect: Callable[[], None] | None = None,
                 process_metrics: bool = True) -> None:
        self.hostname = hostname or default_hostname()
        self.runner = CollectorRunner(collectors, timeout=collector_timeout)
        self._before_collect = before_collect
        self._process_metrics = process_metrics
        self._renderer = Renderer()
        self._cond = threading.Condition()
        self._running = False
        self._generation = 0
        self._last: bytes | BaseException = b""
        self.collections = 0  # how many collections ran (scrapes coalesce into fewer)

    @property
    def collectors(self) -> list[Collector]:
        return self.runner.collectors

    def collect(self) -> list[Metric]:
        """One collection: every collector's families, then the exporter's own."""
        if self._before_collect is not None:
            try:
                self._before_collect()
            except Exception:
                log.exception("before_collect hook failed")
        runs = self.runner.run()
        families: list[Metric] = [f for run in runs for f in run.families]
        families += exporter_families(runs, self.hostname)
        if self._process_metrics:
            families += process_families()
        return families

    def scrape(self) -> bytes:
        """The body of ``/metrics``. Concurrent callers share one collection."""
        with self._cond:
            if self._running:
                generation = self._generation
                while self._generation == generation:
                    self._cond.wait()
                result = self._last
            else:
                self._running = True
                result = None
        if result is None:
            try:
                result = self._renderer.render(self.collect())
            except BaseException as exc:  # delivered to every waiting scrape, then raised
                result = exc
            with self._cond:
                self.collections += 1
                self._last = result
                self._running = False
                self._generation += 1
                self._cond.notify_all()
        if isinstance(result, BaseException):
            raise result
        return result

    def serve(self, host: str = "0.0.0.0", port: int = 9410, limits: Limits = SERVER_LIMITS) -> ExporterServer:
        """Start serving in a background thread; returns at once. Port 0 picks a free port."""
        return ExporterServer(self, host, port, limits)

    def close(self) -> None:
        self.runner.close()


class _Handler(BaseHTTPRequestHandler):
    server: Any  # the HttpServer, with .exporter attached
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection
    server_version = f"rankwatch-node-exporter/{__version__}"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        status, ctype = 200, "text/plain; charset=utf-8"
        if path == "/metrics":
            try:
                body, ctype = self.server.exporter.scrape(), CONTENT_TYPE
            except Exception as exc:
                log.exception("scrape failed")
                status, body = 500, f"scrape failed: {type(exc).__name__}: {exc}\n".encode()
        elif path in ("/healthz", "/health"):
            body = b"ok\n"
        elif path == "/":
            body, ctype = _LANDING, "text/html; charset=utf-8"
        else:
            status, body = 404, b"not found; try /metrics\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class ExporterServer:
    """An HTTP server for one NodeExporter (:mod:`rankwatch.httpserver`: backlog 1024, a
    bounded pool of 8 workers, idle and slow clients dropped), running until stop().

    The event loop blocks in select() without a timeout while no connection is open: an idle
    exporter uses no CPU at all.
    """

    def __init__(self, exporter: NodeExporter, host: str, port: int, limits: Limits = SERVER_LIMITS) -> None:
        try:
            self._httpd = HttpServer(host, port, _Handler, limits=limits, name="rankwatch-node-exporter")
        except OSError as exc:
            raise RankwatchError(f"cannot listen on {join_host_port(host, port)}: {exc.strerror or exc}") from None
        self._httpd.exporter = exporter  # type: ignore[attr-defined]
        self.host = self._httpd.host
        self.port = self._httpd.port

    @property
    def url(self) -> str:
        return self._httpd.url

    @property
    def http(self) -> HttpServer:
        """The underlying server (connection and worker counts)."""
        return self._httpd

    def stop(self) -> None:
        """Stop accepting connections, end open ones (a stopped exporter must look down to
        Prometheus, not keep answering on a kept-alive connection). Idempotent."""
        self._httpd.stop()

    def __enter__(self) -> ExporterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_hostname() -> str:
    """The host label, as dcgm-exporter picks it: $NODE_NAME (a DaemonSet sets it), else the
    system host name."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    try:
        return httpserver.parse_listen_address(text, "--web.listen-address")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "node-exporter",
        help="serve GPU (dcgm-exporter names) and EFA metrics of this node",
        description="Serve /metrics and /healthz with the GPU collector (NVML, dcgm-exporter 4.8.2 "
                    "names) and the EFA collector (sysfs hw_counters, node_amazonefa_* names).",
    )
    p.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default: {DEFAULT_LISTEN})")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys", metavar="DIR",
                   help="sysfs mount point, as node_exporter's flag (default: /sys)")
    p.add_argument("--collector.gpu", dest="collector_gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU metrics from NVML (default: on)")
    p.add_argument("--collector.efa", dest="collector_efa", action=argparse.BooleanOptionalAction, default=True,
                   help="EFA metrics from sysfs (default: on)")
    p.add_argument("--collector.efa.timeout", dest="efa_timeout", type=float, default=1.0, metavar="SECONDS",
                   help="give up on an EFA device that has not answered after this long (default: 1)")
    p.add_argument("--collector.timeout", dest="collector_timeout", type=float, default=4.0, metavar="SECONDS",
                   help="give up on a whole collector after this long (default: 4)")
    p.add_argument("--hostname", default=None,
                   help="value of the Hostname label (default: $NODE_NAME, else the host name)")
    p.add_argument("--job-mapping-dir", default=os.environ.get("DCGM_HPC_JOB_MAPPING_DIR"), metavar="DIR",
                   help="dcgm-style job mapping directory, one file per GPU index holding job ids "
                        "(default: $DCGM_HPC_JOB_MAPPING_DIR)")
    sim = p.add_argument_group("simulated hardware")
    sim.add_argument("--simulate", action="store_true",
                     help="serve a simulated p5.48xlarge node: simulated NVML GPUs and a fake EFA sysfs tree")
    sim.add_argument("--simulate-gpus", type=int, default=8, metavar="N", help="simulated GPUs (default: 8)")
    sim.add_argument("--simulate-efa", type=int, default=32, metavar="N",
                     help="simulated EFA devices in a temporary sysfs tree; 0 reads --path.sysfs (default: 32)")
    sim.add_argument("--simulate-seed", type=int, default=0, metavar="N", help="seed of the simulation (default: 0)")
    sim.add_argument("--simulate-clock", type=float, default=None, metavar="UNIX_TIME",
                     help="freeze simulated time at this Unix time (reproducible output, for golden tests)")
    sim.add_argument("--inject", action="append", default=[], type=_injection, metavar="KIND@SECONDS[:GPU|NIC]",
                     help="with --simulate: start a fault SECONDS after start-up on GPU or EFA device index "
                          f"GPU|NIC, 0 if not given; KIND is one of {', '.join(NODE_FAULTS)}; repeatable, "
                          "e.g. --inject thermal@30:3 --inject efa@60:1")
    p.set_defaults(func=_run)


def _injection(text: str) -> Injection:
    try:
        return parse_injection(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--collector.efa.timeout", args.efa_timeout), ("--collector.timeout", args.collector_timeout)):
        # `not value > 0` also catches NaN, which compares false with everything
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a finite number of seconds > 0, got {value:g}")
    if args.simulate and (args.simulate_gpus < 0 or args.simulate_efa < 0):
        raise ConfigError("--simulate-gpus and --simulate-efa must be >= 0")
    # A missing mapping directory is "no job yet" (Slurm's prolog creates it under /run, a
    # tmpfs, at the first job after each boot); the GPU collector says so and reads it again
    # at every scrape. Something else in its place is a mistake.
    if args.job_mapping_dir and os.path.exists(args.job_mapping_dir) and not os.path.isdir(args.job_mapping_dir):
        raise ConfigError(f"--job-mapping-dir {args.job_mapping_dir}: exists but is not a directory")
    if not args.collector_gpu and not args.collector_efa:
        raise ConfigError("every collector is disabled: enable --collector.gpu or --collector.efa")
    for inj in args.inject:
        spec = f"--inject {inj.kind}@{inj.at_s:g}:{inj.target}"
        if not args.simulate:
            raise ConfigError(f"{spec}: faults are injected into simulated hardware only; add --simulate")
        count = args.simulate_gpus if inj.on_gpu else args.simulate_efa
        if not 0 <= inj.target < count:
            what = "GPU" if inj.on_gpu else "EFA device"
            raise ConfigError(f"{spec}: no {what} {inj.target}; the simulated node has {count} "
                              f"({'--simulate-gpus' if inj.on_gpu else '--simulate-efa'})")


def build_collectors(args: argparse.Namespace, hostname: str) -> list[Collector]:
    """The real-hardware collectors the flags ask for."""
    collectors: list[Collector] = []
    if args.collector_gpu:
        import pynvml

        from rankwatch.exporters.gpu import GpuCollector

        collectors.append(GpuCollector(nvml=pynvml, hostname=hostname, job_mapping_dir=args.job_mapping_dir))
    if args.collector_efa:
        from rankwatch.exporters.efa import EfaCollector

        collectors.append(EfaCollector(args.sysfs, timeout=args.efa_timeout))
    return collectors


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard limit (best effort)."""
    # As Go programs (node_exporter) do at start: the EFA collector keeps its counter files
    # open between scrapes, within a budget derived from this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open files limit: %s", exc)


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    raise_open_files_limit()
    host, port = parse_listen_address(args.listen)
    hostname = args.hostname or default_hostname()
    node = None
    timers: list[threading.Timer] = []
    if args.simulate:
        from rankwatch.sim.node import SimulatedNode

        node = SimulatedNode(
            hostname, gpus=args.simulate_gpus, efa=args.simulate_efa, seed=args.simulate_seed,
            sysfs_root=None if args.simulate_efa else args.sysfs, frozen_at=args.simulate_clock,
            collect_gpu=args.collector_gpu, collect_efa=args.collector_efa, efa_timeout=args.efa_timeout,
            collector_timeout=args.collector_timeout, job_mapping_dir=args.job_mapping_dir,
        )
        exporter = node.exporter
        log.info("simulating %d GPUs and %d EFA devices (sysfs tree %s)", args.simulate_gpus,
                 args.simulate_efa, node.sysfs_root)
        timers = schedule_injections(node, args.inject)
    else:
        exporter = NodeExporter(build_collectors(args, hostname), hostname,
                                collector_timeout=args.collector_timeout)
    try:
        server = exporter.serve(host, port)
    except RankwatchError:
        for timer in timers:
            timer.cancel()
        (node or exporter).close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("rankwatch node exporter %s serving %s/metrics (collectors: %s, Hostname=%s)", __version__,
             server.url, ", ".join(c.name for c in exporter.collectors), hostname)
    try:
        stop.wait()
    finally:
        for timer in timers:
            timer.cancel()
        server.stop()
        (node or exporter).close()
    return 0


def schedule_injections(node: Any, injections: Sequence[Injection]) -> list[threading.Timer]:
    """Start each fault on the simulated node at its time (now for 0 s); returns the timers
    still to fire, for cancelling at shutdown."""
    from rankwatch.sim import faults

    def fire(inj: Injection) -> None:
        try:
            faults.inject(node.nvml, node.efa, inj.kind, inj.target)
        except Exception:  # a simulator refusal must not stop the exporter
            log.exception("cannot inject %s", inj.describe())
            return
        log.warning("injected %s (simulated hardware)", inj.describe())

    timers = []
    for inj in injections:
        if inj.at_s <= 0:
            fire(inj)
        else:
            timer = threading.Timer(inj.at_s, fire, args=(inj,))
            timer.daemon = True
            timer.start()
            timers.append(timer)
    return timers
