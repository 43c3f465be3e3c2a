"""Run collectors with a deadline and report on them, as prometheus.io's exporter guidelines
ask: per-collector scrape duration and success, so that a broken collector shows up as a
series instead of as a failed scrape.

Each collector gets its own daemon thread; they run one after another. A collector that raises reports success 0 and
costs nothing else; one that hangs (an NVML call stuck in the driver) is given up on after
the timeout, and while its call is still stuck later scrapes report it failed at once
instead of starting a second call behind the first.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from rankwatch import __version__
from rankwatch.daemonpool import DaemonPool
from rankwatch.exporters.base import Collector

log = logging.getLogger(__name__)


@dataclass
class CollectorRun:
    """The outcome of one collector in one scrape."""

    name: str
    families: list[Metric]
    duration: float
    success: bool


class CollectorRunner:
    """Runs every collector once per scrape, each given at most ``timeout`` seconds."""

    def __init__(self, collectors: Sequence[Collector], timeout: float = 4.0) -> None:
        names = [c.name for c in collectors]
        if len(set(names)) != len(names):
            raise ValueError(f"collector names must be unique, got {names}")
        if not (math.isfinite(timeout) and timeout > 0):  # NaN fails every comparison
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.collectors = list(collectors)
        self.timeout = timeout
        # one daemon thread per collector (a call stuck in the kernel or driver must not keep
        # the process from exiting, nor queue a second call behind it on another thread)
        self._workers = {c.name: DaemonPool(1, f"rankwatch-collector-{c.name}") for c in collectors}
        self._stuck: dict[str, tuple[Future, float]] = {}
        self._logged: dict[str, str] = {}

    def run(self) -> list[CollectorRun]:
        # One collector after another, each on its own thread with its own deadline. Not in
        # parallel: the collectors are Python code holding the GIL, so threads gain nothing
        # (BENCHMARKS.md, node exporter internals), and a thread doing sysfs reads can wait up
        # to the interpreter's 5 ms switch interval after a syscall while another computes.
        runs: list[CollectorRun] = []
        for c in self.collectors:
            stuck = self._stuck.get(c.name)
            if stuck is not None and not stuck[0].done():
                self._note(c.name, f"still stuck in a collect() call started {time.perf_counter() - stuck[1]:.0f}s ago")
                runs.append(CollectorRun(c.name, [], 0.0, False))
                continue
            self._stuck.pop(c.name, None)
            t0 = time.perf_counter()
            fut = self._workers[c.name].submit(lambda c=c: _timed(c))
            try:
                families, duration = fut.result(timeout=self.timeout)
            except FutureTimeout:
                self._stuck[c.name] = (fut, t0)
                self._note(c.name, f"no answer within {self.timeout:g}s")
                runs.append(CollectorRun(c.name, [], time.perf_counter() - t0, False))
                continue
            except Exception as exc:
                self._note(c.name, f"{type(exc).__name__}: {exc}", exc)
                runs.append(CollectorRun(c.name, [], time.perf_counter() - t0, False))
                continue
            if self._logged.pop(c.name, None) is not None:
                log.warning("collector %s works again", c.name)
            runs.append(CollectorRun(c.name, families, duration, True))
        return runs

    def _note(self, name: str, message: str, exc: BaseException | None = None) -> None:
        # Log a failure when it starts or changes, not on every scrape.
        if self._logged.get(name) != message:
            self._logged[name] = message
            log.error("collector %s failed: %s", name, message, exc_info=exc)

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        for c in self.collectors:
            try:
                c.close()
            except Exception:
                log.exception("closing collector %s", c.name)


def _timed(collector: Collector) -> tuple[list[Metric], float]:
    t0 = time.perf_counter()
    families = list(collector.collect())  # materialised here: a lazy generator could fail later
    return families, time.perf_counter() - t0


def exporter_families(runs: Sequence[CollectorRun], hostname: str) -> list[Metric]:
    """The exporter's own series: per-collector duration and success, the host join series."""
    duration = GaugeMetricFamily("rankwatch_exporter_collector_duration_seconds",
                                 "Time the collector took in this scrape.", labels=["collector"])
    success = GaugeMetricFamily("rankwatch_exporter_collector_success",
                                "1 if the collector finished this scrape without error and in time, else 0.",
                                labels=["collector"])
    for run in runs:
        duration.add_metric([run.name], run.duration)
        success.add_metric([run.name], 1 if run.success else 0)
    node = GaugeMetricFamily("rankwatch_node_info",
                             "The host this exporter runs on (always 1): joins every series of the target, "
                             "through the instance label, to the node name.", labels=["Hostname"])
    node.add_metric([hostname], 1)
    build = GaugeMetricFamily("rankwatch_exporter_build_info", "rankwatch version of the exporter (always 1).",
                              labels=["version"])
    build.add_metric([__version__], 1)
    return [duration, success, node, build]


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = resource.getpagesize()
_boot_time: float | None = None


def _btime() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    _boot_time = float(line.split()[1])
                    break
            else:
                _boot_time = 0.0
    return _boot_time


def process_families() -> list[Metric]:
    """The standard ``process_*`` series from one read of /proc/self/stat.

    Not prometheus_client's ProcessCollector: its process_open_fds lists /proc/self/fd on
    every scrape, and the EFA collector keeps ~1 200 counter files open (see
    rankwatch_efa_open_files), which made that listing cost more than reading the counters.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return []  # not Linux
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    vsize, rss_pages = int(fields[20]), int(fields[21])
    cpu = CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")
    cpu.add_metric([], (utime + stime) / _CLK_TCK)
    out: list[Metric] = [cpu]
    for name, doc, value in (
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", vsize),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", rss_pages * _PAGE),
        ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
         _btime() + start / _CLK_TCK),
        ("process_max_fds", "Maximum number of open file descriptors.",
         resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    ):
        g = GaugeMetricFamily(name, doc)
        g.add_metric([], value)
        out.append(g)
    return out
