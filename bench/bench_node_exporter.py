"""Benchmark: the node side at p5.48xlarge density, like for like.

One run, on one fake sysfs tree with 32 EFA devices (rankwatch.sim.sysfs, in the kernel's
formats, plus the Mellanox-style files node_exporter 1.5 needs before it exports anything):

1. **EFA, like for like**: `rankwatch node-exporter --no-collector.gpu` (the EFA collector
   alone) against Debian's prometheus-node-exporter with only its infiniband collector, both
   reading the same tree. node_exporter is scraped twice per block: with Prometheus' headers
   (it gzips) and without gzip (its collection alone); rankwatch never gzips.
2. **GPU collector** alone on 8 simulated H100 (`--simulate --no-collector.efa`).
3. **Full p5 scrape**: 8 simulated GPUs + the 32 EFA devices.

Every target is a separate process scraped over HTTP by one keep-alive client, in blocks that
rotate through the targets, so that the shared machine's load hits all alike. CPU per scrape is
the exporter process's CPU (all threads, /proc/<pid>/task/*/schedstat) during its blocks; the
rankwatch/node_exporter ratio is computed per block and its median reported, so a load swing
during the run moves both sides of each ratio. Then in-process: where rankwatch's time goes
(EFA read, families, render; cProfile of the EFA collector's read path).

    .venv/bin/python bench/bench_node_exporter.py                  # 2 000 scrapes per target (~5-10 min)
    .venv/bin/python bench/bench_node_exporter.py --scrapes 300    # quicker
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import http.client
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankwatch import promserver  # noqa: E402
from rankwatch.sim.sysfs import FakeEfaSysfs  # noqa: E402

PROMETHEUS_HEADERS = {
    # what Prometheus sends, minus OpenMetrics (neither exporter serves it by default)
    "Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
}
NO_GZIP = {**PROMETHEUS_HEADERS, "Accept-Encoding": "identity"}


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of the process in ns (schedstat: finer than clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # thread exited meanwhile
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Target:
    name: str
    proc: subprocess.Popen
    port: int
    headers: dict[str, str]
    latencies: list[float] = field(default_factory=list)
    block_cpu: list[float] = field(default_factory=list)  # CPU seconds per scrape, per block
    series: int = 0
    body_bytes: int = 0
    wire_bytes: int = 0
    rss: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def scrape(self) -> bytes:
        t0 = time.perf_counter()
        self.conn.request("GET", "/metrics", headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        self.latencies.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}")
        self.wire_bytes = len(data)
        if resp.getheader("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        return data

    def block(self, n: int) -> None:
        c0 = cpu_ns(self.proc.pid)
        for _ in range(n):
            body = self.scrape()
        self.block_cpu.append((cpu_ns(self.proc.pid) - c0) / 1e9 / n)
        self.rss.append(rss_mb(self.proc.pid))
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        self.body_bytes = len(body)

    @property
    def cpu(self) -> float:
        return statistics.median(self.block_cpu)


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    promserver.wait_http_ok(f"http://127.0.0.1:{port}/metrics", timeout=60, proc=proc)
    return proc


def idle_cpu(procs: dict[str, subprocess.Popen], seconds: float) -> dict[str, float]:
    before = {name: cpu_ns(p.pid) for name, p in procs.items()}
    time.sleep(seconds)
    return {name: (cpu_ns(p.pid) - before[name]) / 1e9 for name, p in procs.items()}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def breakdown(sysfs: Path, iterations: int) -> tuple[dict[str, float], str]:
    """In-process CPU medians of each part of an EFA-only scrape, and a profile of the EFA
    collector's read path (run in this thread, where cProfile sees it)."""
    from rankwatch.exporters.efa import EfaCollector
    from rankwatch.exporters.exposition import Renderer
    from rankwatch.exporters.node import NodeExporter

    efa = EfaCollector(sysfs)
    exporter = NodeExporter([efa], "bench-node")
    renderer = Renderer()
    cpu: dict[str, list[float]] = {}

    def timed(part: str, fn: Callable[[], object]) -> object:
        c0 = time.process_time()
        out = fn()
        cpu.setdefault(part, []).append(time.process_time() - c0)
        return out

    try:
        for _ in range(20):
            exporter.scrape()
        devices = sorted(d for d, ident in efa._identities.items() if ident is not None)
        for _ in range(iterations):
            reads = timed("EFA: read 32 devices (sysfs)", lambda: [efa._read_device(d, efa._identities[d]) for d in devices])
            families = timed("EFA: build families", lambda reads=reads: efa._families(reads, []))
            timed("render (text format)", lambda families=families: renderer.render(families))
            timed("whole EFA-only scrape, in-process (threads included)", exporter.scrape)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iterations):
            efa._families([efa._read_device(d, efa._identities[d]) for d in devices], [])
        prof.disable()
    finally:
        exporter.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(10)
    return {k: statistics.median(v) for k, v in cpu.items()}, out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=2000, help="scrapes of each target (default: 2000)")
    parser.add_argument("--block", type=int, default=50, help="scrapes per block (default: 50)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="idle window for CPU between scrapes (default: 10)")
    parser.add_argument("--profile-iterations", type=int, default=200, help="in-process iterations (default: 200)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rankwatch-bench-"))
    sysfs = work / "sys"
    FakeEfaSysfs(sysfs, devices=32, seed=0, node_exporter_compat=True)
    ports = {name: promserver.free_port() for name in ("efa", "ne", "gpu", "full")}
    rw = [sys.executable, "-m", "rankwatch", "node-exporter", "--hostname", "bench-node"]
    load_start = os.getloadavg()
    procs = {
        "efa": start([*rw, "--no-collector.gpu", "--path.sysfs", str(sysfs),
                      "--web.listen-address", f"127.0.0.1:{ports['efa']}"], ports["efa"], work / "efa.log"),
        "ne": start([promserver.find_binary("node_exporter"), "--collector.disable-defaults", "--collector.infiniband",
                     f"--path.sysfs={sysfs}", f"--web.listen-address=127.0.0.1:{ports['ne']}"], ports["ne"],
                    work / "node_exporter.log"),
        "gpu": start([*rw, "--simulate", "--simulate-gpus", "8", "--no-collector.efa",
                      "--web.listen-address", f"127.0.0.1:{ports['gpu']}"], ports["gpu"], work / "gpu.log"),
        "full": start([*rw, "--simulate", "--simulate-gpus", "8", "--simulate-efa", "0", "--path.sysfs", str(sysfs),
                       "--web.listen-address", f"127.0.0.1:{ports['full']}"], ports["full"], work / "full.log"),
    }
    efa = Target("rankwatch, EFA collector alone", procs["efa"], ports["efa"], PROMETHEUS_HEADERS)
    ne = Target("node_exporter 1.5, infiniband alone (gzip)", procs["ne"], ports["ne"], PROMETHEUS_HEADERS)
    ne_plain = Target("node_exporter 1.5, infiniband alone (no gzip)", procs["ne"], ports["ne"], NO_GZIP)
    gpu = Target("rankwatch, GPU collector alone (8 simulated H100)", procs["gpu"], ports["gpu"], PROMETHEUS_HEADERS)
    full = Target("rankwatch, full p5 (8 GPUs + 32 EFA)", procs["full"], ports["full"], PROMETHEUS_HEADERS)
    targets = [efa, ne, ne_plain, gpu, full]
    ratios: list[float] = []
    ratios_plain: list[float] = []
    try:
        for t in targets:  # warm-up, not counted
            for _ in range(20):
                t.scrape()
            t.latencies.clear()
        idle = idle_cpu(procs, args.idle_seconds)
        t_start = time.monotonic()
        done = 0
        while done < args.scrapes:
            n = min(args.block, args.scrapes - done)
            for t in targets:
                t.block(n)
            ratios.append(efa.block_cpu[-1] / ne.block_cpu[-1])
            ratios_plain.append(efa.block_cpu[-1] / ne_plain.block_cpu[-1])
            done += n
            if done % 500 == 0 or done == args.scrapes:
                print(f"  {done}/{args.scrapes} scrapes per target ({time.monotonic() - t_start:.0f} s, "
                      f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        load_end = os.getloadavg()
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    try:
        parts, profile = breakdown(sysfs, args.profile_iterations)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{args.scrapes} scrapes per target in blocks of {args.block}, one keep-alive client, sequential; "
          f"{os.cpu_count()} CPUs; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    print()
    print("| target | series | body / on the wire (bytes) | CPU per scrape (ms, median of blocks) "
          "| latency median / p99 (ms) | RSS end (MB) |")
    print("|---|---|---|---|---|---|")
    for t in targets:
        print(f"| {t.name} | {t.series} | {t.body_bytes:,} / {t.wire_bytes:,} | {t.cpu * 1e3:.2f} "
              f"| {statistics.median(t.latencies) * 1e3:.2f} / {pct(t.latencies, 0.99) * 1e3:.2f} | {t.rss[-1]:.1f} |")
    print()
    med = statistics.median(ratios)
    med_plain = statistics.median(ratios_plain)
    print(f"EFA scrape CPU, rankwatch / node_exporter, median of {len(ratios)} per-block ratios: "
          f"**{med:.2f}** against node_exporter with gzip (p10-p90 {pct(ratios, 0.1):.2f}-{pct(ratios, 0.9):.2f}), "
          f"{med_plain:.2f} against node_exporter without gzip "
          f"(p10-p90 {pct(ratios_plain, 0.1):.2f}-{pct(ratios_plain, 0.9):.2f}); target <= 1.")
    print(f"CPU per exported series: rankwatch EFA {efa.cpu * 1e6 / efa.series:.2f} us, "
          f"node_exporter {ne.cpu * 1e6 / ne.series:.2f} us (gzip), {ne_plain.cpu * 1e6 / ne_plain.series:.2f} us (no gzip)")
    print(f"CPU while idle for {args.idle_seconds:g} s: " +
          ", ".join(f"{name} {cpu * 1e3:.1f} ms" for name, cpu in idle.items()))
    print()
    print(f"Where rankwatch's EFA-only scrape goes (in-process CPU, median of {args.profile_iterations}):")
    for name, c in parts.items():
        print(f"  {name}: {c * 1e3:.2f} ms")
    print()
    print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
