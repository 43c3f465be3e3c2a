"""Node exporter internals: the figures behind its design choices, each against its alternative
in the same run (interleaved, so that the shared machine's load hits both alike).

* sysfs reads: open/read/close of a counter file against ``os.pread`` on a descriptor kept
  open (what the EFA collector does), on this machine's real sysfs (``/sys/class/net/*/
  statistics/*``) and on the fake EFA tree of a simulated p5 node (32 devices);
* collectors one after another (what ``CollectorRunner`` does) against both in parallel threads,
  on a simulated p5 node (8 GPUs, 32 EFA devices);
* rendering the same families with the exporter's ``Renderer`` against prometheus_client's
  ``generate_latest``;
* memory: tracemalloc growth over ``--memory-scrapes`` in-process scrapes of the GPU collector
  at a simulated 16 scrapes/s (a manual clock: no waiting), and the longest health-history
  deque it then holds (bounded by the health window, not by the scrape rate).

    .venv/bin/python bench/bench_exporter_internals.py [--rounds 200] [--memory-scrapes 4000]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwatch.exporters.exposition import Renderer  # noqa: E402
from rankwatch.sim.node import SimulatedNode  # noqa: E402
from rankwatch.sim.nvml import ManualClock, SimulatedNVML  # noqa: E402


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}), {os.cpu_count()} CPUs"


def interleaved(a, b, rounds: int) -> tuple[list[float], list[float]]:
    """Wall seconds of ``a()`` and ``b()``, alternating which goes first."""
    ta, tb = [], []
    for k in range(rounds):
        for fn, out in ((a, ta), (b, tb)) if k % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return ta, tb


def sysfs_reads(files: list[str], rounds: int) -> tuple[float, float]:
    """(µs per file with open/read/close, µs per file with pread on an open descriptor)."""
    fds = [os.open(f, os.O_RDONLY) for f in files]

    def reopen() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.read(64)

    def pread() -> None:
        for fd in fds:
            os.pread(fd, 64, 0)

    try:
        ta, tb = interleaved(reopen, pread, rounds)
    finally:
        for fd in fds:
            os.close(fd)
    n = len(files)
    return statistics.median(ta) / n * 1e6, statistics.median(tb) / n * 1e6


def collectors_parallel(node: SimulatedNode, rounds: int) -> tuple[float, float]:
    """(ms per collection one after another, ms per collection in parallel threads)."""
    cols = node.exporter.collectors
    pool = ThreadPoolExecutor(max_workers=len(cols))

    def sequential() -> None:
        for c in cols:
            list(c.collect())

    def parallel() -> None:
        for fut in [pool.submit(lambda c=c: list(c.collect())) for c in cols]:
            fut.result()

    try:
        sequential()
        parallel()  # warm both paths
        ta, tb = interleaved(sequential, parallel, rounds)
    finally:
        pool.shutdown()
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def render_vs_client(node: SimulatedNode, rounds: int) -> tuple[float, float, int]:
    """(ms Renderer, ms prometheus_client generate_latest, bytes) on the same families."""
    from prometheus_client import CollectorRegistry, generate_latest

    families = node.exporter.collect()

    class Fixed:
        def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    renderer = Renderer()
    body = renderer.render(families)  # warm its label cache, as after the first scrape
    ta, tb = interleaved(lambda: renderer.render(families), lambda: generate_latest(registry), rounds)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, len(body)


def memory(scrapes: int, rate_hz: float = 16.0) -> tuple[float, int, int]:
    """(MB traced growth, longest health deque, scrapes) for the GPU collector of 8 simulated
    GPUs scraped ``scrapes`` times at ``rate_hz`` of simulated time, after a warm-up of a full
    health window (300 s) so that the deques have reached their steady size."""
    from rankwatch.exporters.gpu import GpuCollector

    clock = ManualClock()
    nvml = SimulatedNVML("mem-node", gpu_count=8, clock=clock)
    col = GpuCollector(nvml=nvml, hostname="mem-node", listen_xid_events=False, clock=clock)
    try:
        for _ in range(int(300 * rate_hz)):
            clock.advance(1 / rate_hz)
            list(col.collect())
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(scrapes):
            clock.advance(1 / rate_hz)
            list(col.collect())
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        longest = max((len(h) for g in col._gpus for h in g.history.values()), default=0)
    finally:
        col.close()
    return grown / 1e6, longest, scrapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds per comparison (default: 200)")
    ap.add_argument("--memory-scrapes", type=int, default=4000,
                    help="scrapes measured by tracemalloc after the warm-up (default: 4000)")
    args = ap.parse_args(argv)
    print(f"machine: {load()}, Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    real = sorted(glob.glob("/sys/class/net/*/statistics/*"))
    if real:
        a, b = sysfs_reads(real, args.rounds)
        print(f"sysfs read, real /sys ({len(real)} files): open/read/close {a:.1f} µs per file, "
              f"pread {b:.1f} µs ({a / b:.1f}x)")
    with tempfile.TemporaryDirectory(prefix="bench-internals-") as tmp:
        node = SimulatedNode("bench-node", gpus=8, efa=32, sysfs_root=Path(tmp) / "sys")
        try:
            fake = sorted(glob.glob(f"{tmp}/sys/class/infiniband/*/ports/1/hw_counters/*"))
            a, b = sysfs_reads(fake, args.rounds)
            print(f"sysfs read, fake EFA tree ({len(fake)} files on {_fs_type(tmp)}): open/read/close {a:.1f} µs "
                  f"per file, pread {b:.1f} µs ({a / b:.1f}x)")
            seq, par = collectors_parallel(node, args.rounds)
            print(f"collection of 8 GPUs + 32 EFA devices: one after another {seq:.1f} ms, in parallel threads "
                  f"{par:.1f} ms (parallel/sequential {par / seq:.2f})")
            ours, client, size = render_vs_client(node, args.rounds)
            print(f"rendering {size / 1e3:.0f} kB: rankwatch Renderer {ours:.2f} ms, prometheus_client "
                  f"generate_latest {client:.2f} ms ({ours / client:.2f})")
        finally:
            node.close()
    grown, longest, n = memory(args.memory_scrapes)
    print(f"GPU collector memory over {n} scrapes at a simulated 16/s (after a 300 s warm-up): "
          f"+{grown:.2f} MB traced, longest health history {longest} entries")
    print(f"machine at the end: {load()}")
    return 0


def _fs_type(path: str) -> str:
    best = ("", "?")
    with open("/proc/mounts") as fh:
        for line in fh:
            dev, mnt, fs = line.split()[:3]
            if path.startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, fs)
    return best[1]


if __name__ == "__main__":
    raise SystemExit(main())
