"""Benchmark: `rankwatch node-exporter` on a simulated p5.48xlarge (8 GPUs + 32 EFA devices)
against Debian's prometheus-node-exporter (infiniband collector only) on the same fake sysfs.

Measures, for both exporters, in the same run and interleaved in blocks so that the shared
machine's noise hits both alike:

* scrape latency (median, p99) as a Prometheus-like client sees it (keep-alive connection,
  Prometheus' Accept and Accept-Encoding headers);
* CPU time of the exporter process per scrape (from /proc/<pid>/stat);
* CPU used between scrapes: the exporter process idle for --idle-seconds;
* RSS after every block of scrapes (is it flat?);
* series per scrape, hence cost per exported series;
* where rankwatch's time goes (per-collector and render time in-process, and cProfile).

    .venv/bin/python bench/bench_node_exporter.py                 # 10 000 scrapes each
    .venv/bin/python bench/bench_node_exporter.py --scrapes 1000  # quicker
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankwatch import promserver  # noqa: E402
from rankwatch.sim.sysfs import FakeEfaSysfs  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMETHEUS_HEADERS = {
    # what Prometheus 2.42 sends, minus OpenMetrics (neither exporter serves it by default)
    "Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


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
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0
    scrapes: int = 0
    rss: list[tuple[int, float]] = field(default_factory=list)
    series: int = 0
    body_bytes: int = 0
    wire_bytes: int = 0

    def __post_init__(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def scrape(self) -> bytes:
        t0 = time.perf_counter()
        self.conn.request("GET", "/metrics", headers=PROMETHEUS_HEADERS)
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
        c0 = cpu_seconds(self.proc.pid)
        for _ in range(n):
            body = self.scrape()
        self.cpu += cpu_seconds(self.proc.pid) - c0
        self.scrapes += n
        self.rss.append((self.scrapes, rss_mb(self.proc.pid)))
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        self.body_bytes = len(body)


def start(args: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    out.close()
    promserver.wait_http_ok(f"http://127.0.0.1:{port}/metrics", timeout=60, proc=proc)
    return proc


def idle_cpu(targets: list[Target], seconds: float) -> dict[str, float]:
    before = {t.name: cpu_ns(t.proc.pid) for t in targets}
    time.sleep(seconds)
    return {t.name: (cpu_ns(t.proc.pid) - before[t.name]) / 1e9 for t in targets}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_slope(points: list[tuple[int, float]]) -> float:
    """MB per 1000 scrapes over the second half of the run (after warm-up), least squares."""
    half = points[len(points) // 2:]
    if len(half) < 2:
        return 0.0
    xs = [p[0] / 1000 for p in half]
    ys = [p[1] for p in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def breakdown(sysfs: Path, iterations: int) -> tuple[dict[str, tuple[float, float]], str]:
    """In-process, one part after another: (CPU, wall) medians of each collector and of
    rendering, and the top of a profile. CPU is process time: nothing else runs meanwhile, so
    it includes the EFA reader thread's work and is less distorted by a busy machine."""
    from rankwatch.exporters.exposition import render
    from rankwatch.sim.node import SimulatedNode

    node = SimulatedNode("bench-node", gpus=8, efa=0, sysfs_root=sysfs)
    exporter = node.exporter
    cpu: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}

    def timed(part: str, fn):  # noqa: ANN001, ANN202
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.setdefault(part, []).append(time.process_time() - c0)
        wall.setdefault(part, []).append(time.perf_counter() - w0)
        return out

    try:
        for _ in range(20):
            exporter.scrape()
        for _ in range(iterations):
            families = []
            for c in exporter.collectors:
                families += timed(f"collect {c.name}", lambda c=c: list(c.collect()))
            timed("render", lambda families=families: render(families))
            timed("whole scrape (in-process)", exporter.scrape)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iterations):
            exporter.scrape()
        prof.disable()
    finally:
        node.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in cpu}, out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=10_000, help="scrapes of each exporter (default 10000)")
    parser.add_argument("--block", type=int, default=100, help="scrapes per interleaved block (default 100)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle window for CPU between scrapes")
    parser.add_argument("--profile-iterations", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rankwatch-bench-"))
    sysfs = work / "sys"
    FakeEfaSysfs(sysfs, devices=32, seed=0, node_exporter_compat=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rw_port, ne_port = promserver.free_port(), promserver.free_port()
    rw = start([sys.executable, "-m", "rankwatch", "node-exporter", "--simulate", "--simulate-gpus", "8",
                "--simulate-efa", "0", "--path.sysfs", str(sysfs), "--web.listen-address", f"127.0.0.1:{rw_port}",
                "--hostname", "bench-node"], rw_port, work / "rankwatch.log", env)
    ne = start([promserver.find_binary("node_exporter"), "--collector.disable-defaults", "--collector.infiniband",
                f"--path.sysfs={sysfs}", f"--web.listen-address=127.0.0.1:{ne_port}"], ne_port,
               work / "node_exporter.log")
    targets = [Target("rankwatch", rw, rw_port), Target("node_exporter", ne, ne_port)]
    try:
        for t in targets:  # warm-up, not counted
            for _ in range(20):
                t.scrape()
            t.latencies.clear()
        idle = idle_cpu(targets, args.idle_seconds)
        start_rss = {t.name: rss_mb(t.proc.pid) for t in targets}
        t_start = time.monotonic()
        done = 0
        while done < args.scrapes:
            n = min(args.block, args.scrapes - done)
            for t in targets:
                t.block(n)
            done += n
            if done % 1000 == 0 or done == args.scrapes:
                print(f"  {done}/{args.scrapes} scrapes each ({time.monotonic() - t_start:.0f} s)",
                      file=sys.stderr, flush=True)
        idle_after = idle_cpu(targets, args.idle_seconds)
    finally:
        for t in targets:
            t.proc.terminate()
            t.proc.wait(timeout=30)
    try:
        parts, profile = breakdown(sysfs, args.profile_iterations)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for t in targets:
        med, p99 = statistics.median(t.latencies), pct(t.latencies, 0.99)
        cpu = t.cpu / t.scrapes
        rows.append((t, med, p99, cpu))
    print()
    print(f"rankwatch node-exporter vs prometheus-node-exporter 1.5 (infiniband), {args.scrapes} scrapes each,")
    print(f"sequential, keep-alive, Prometheus headers; 32 fake EFA devices (+8 simulated GPUs for rankwatch); "
          f"{os.cpu_count()} CPUs; load average at end {os.getloadavg()[0]:.1f}")
    print()
    print("| | rankwatch | node_exporter |")
    print("|---|---|---|")

    def row(label: str, fmt: str, values: list[float]) -> None:
        print(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")

    row("series per scrape", "{:.0f}", [t.series for t, *_ in rows])
    row("body (bytes, uncompressed)", "{:.0f}", [t.body_bytes for t, *_ in rows])
    row("on the wire (bytes)", "{:.0f}", [t.wire_bytes for t, *_ in rows])
    row("scrape latency median (ms)", "{:.2f}", [m * 1e3 for _, m, _, _ in rows])
    row("scrape latency p99 (ms)", "{:.2f}", [p * 1e3 for _, _, p, _ in rows])
    row("CPU per scrape (ms)", "{:.2f}", [c * 1e3 for *_, c in rows])
    row("latency per series (µs)", "{:.2f}", [m * 1e6 / t.series for t, m, _, _ in rows])
    row("CPU per series (µs)", "{:.2f}", [c * 1e6 / t.series for t, *_, c in rows])
    row(f"CPU idle {args.idle_seconds:g} s before the run (ms)", "{:.1f}", [idle[t.name] * 1e3 for t, *_ in rows])
    row(f"CPU idle {args.idle_seconds:g} s after the run (ms)", "{:.1f}",
        [idle_after[t.name] * 1e3 for t, *_ in rows])
    row("RSS after warm-up (MB)", "{:.1f}", [start_rss[t.name] for t, *_ in rows])
    row("RSS at the end (MB)", "{:.1f}", [t.rss[-1][1] for t, *_ in rows])
    row("RSS max (MB)", "{:.1f}", [max(r for _, r in t.rss) for t, *_ in rows])
    row("RSS slope, 2nd half (MB / 1000 scrapes)", "{:+.3f}", [rss_slope(t.rss) for t, *_ in rows])
    print()
    rss = targets[0].rss
    marks = [p for p in rss if p[0] % max(1, args.scrapes // 10) == 0] or rss
    print("rankwatch RSS (MB) by scrape: " + ", ".join(f"{n}: {r:.1f}" for n, r in marks))
    print()
    print(f"Where rankwatch's time goes (in-process, median of {args.profile_iterations}):")
    for name, (c, w) in parts.items():
        print(f"  {name}: CPU {c * 1e3:.2f} ms, wall {w * 1e3:.2f} ms")
    print()
    print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
