"""How long the failure paths take: the numbers the tests used to bound with wall-clock limits
(they now check the behaviour by data: the scrape returns and reports the error, the publish
returns while Slack hangs, ...). Each row is measured against the configured limit that bounds
it, in the same run.

    .venv/bin/python bench/bench_failure_latency.py [--repeat 5]

Rows (median and max of --repeat runs, milliseconds):

* EFA collector, one device wedged (its counter file blocks open()), timeout 0.5 s: the first
  scrape (waits the timeout) and the next one (the stuck read is not repeated).
* Node exporter, one collector hung, collector timeout 0.5 s: the same two scrapes.
* AlertSink.publish of 20 incidents while Slack accepts and never answers (timeout 3 s each).
* XID listener (wait timeout 1.5 s): from the injected XID to the exporter showing it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.events import Event
from rankwatch.exporters.efa import EfaCollector
from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.exporters.node import NodeExporter
from rankwatch.sim.nvml import SimulatedNVML
from rankwatch.sim.sysfs import FakeEfaSysfs


def ms(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def wedged_efa(tmp: Path) -> tuple[float, float]:
    sim = FakeEfaSysfs(tmp / "sys", devices=4, seed=1)
    c = EfaCollector(sim.root, timeout=0.5)
    try:
        render(c.collect())
        sim.inject(sim.devices[1], "wedged", counter="tx_bytes")
        return ms(lambda: render(c.collect())), ms(lambda: render(c.collect()))
    finally:
        sim.close()
        c.close()


class Hanging:
    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()

    def collect(self) -> Iterable[Metric]:
        self.release.wait()
        return [GaugeMetricFamily("bench_answer", "answered after release", value=1)]

    def close(self) -> None:
        self.release.set()


def hanging_collector() -> tuple[float, float]:
    hanging = Hanging()
    exporter = NodeExporter([hanging], "bench", collector_timeout=0.5, process_metrics=False)
    try:
        return ms(exporter.scrape), ms(exporter.scrape)
    finally:
        exporter.close()


def publish_while_slack_hangs(tmp: Path) -> float:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # accepts (in the kernel) and never answers
    doc = {"slack": {"channel": "C1", "api_url": f"http://127.0.0.1:{server.getsockname()[1]}/api/",
                     "max_retries": 0, "timeout_s": 3},
           "notify": {"group_wait_s": 0, "close_timeout_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": "xoxb-bench"}), state_dir=tmp)
    try:
        events = [Event(time=1.8e9, kind="straggler", state="firing", run=f"run{i}", rank=i, node="n", gpu="0",
                        score=5.0, summary="slow", episode=f"e{i}") for i in range(20)]
        return ms(lambda: [sink.publish([e]) for e in events])
    finally:
        server.close()
        sink.close()


def xid_wake() -> float:
    sim = SimulatedNVML("bench", seed=1)
    collector = GpuCollector(nvml=sim, xid_wait_ms=1500)
    try:
        time.sleep(0.2)  # the listener is in its wait
        t0 = time.perf_counter()
        sim.inject(4, "xid", xid=119)
        while b'xid="119"' not in render(collector.collect()):
            time.sleep(0.001)
        return (time.perf_counter() - t0) * 1e3
    finally:
        collector.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs of each measurement (default: 5)")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            first, second = wedged_efa(Path(tmp))
            rows.setdefault("EFA, device wedged: first scrape (timeout 500 ms)", []).append(first)
            rows.setdefault("EFA, device wedged: next scrape", []).append(second)
            first, second = hanging_collector()
            rows.setdefault("node exporter, collector hung: first scrape (timeout 500 ms)", []).append(first)
            rows.setdefault("node exporter, collector hung: next scrape", []).append(second)
            rows.setdefault("20 × AlertSink.publish while Slack hangs (request timeout 3000 ms)", []).append(
                publish_while_slack_hangs(Path(tmp)))
            rows.setdefault("XID injected → shown by the exporter (listener wait 1500 ms)", []).append(xid_wake())
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {args.repeat} runs each")
    print()
    print("| path | median ms | max ms |")
    print("|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} | {max(values):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
