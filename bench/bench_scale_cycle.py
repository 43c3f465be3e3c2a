"""The detector's live cycle at 256, 2 048 and 16 384 ranks, queries included, against a real
Prometheus and a real VictoriaMetrics holding the job's data (targets at 16 384 ranks on this
2-core machine: <= 3 s per cycle, detector RSS <= 1 GiB).

Per size, one simulated job (``rankwatch sim scale``: tp 8, pp 4/8/16, p5 nodes with 8 GPUs and
32 EFA devices each, one straggler) is backfilled into Prometheus with promtool and imported into
VictoriaMetrics (``bench/scale_stores.py``). Then, for each store, a fresh process runs the
detector service — snapshot (its queries and joins), core evaluation, state save — cycle after
cycle over the job's time, as ``rankwatch detector`` does live, and reports per cycle:

* the cycle's wall time and the detector's CPU;
* the bytes of the query responses and the number of requests;
* the store's CPU during the cycle (its process' CPU counters in /proc);
* the detector process' RSS (peak and at the end);
* the events raised (the straggler must be named, nothing else).

    .venv/bin/python bench/bench_scale_cycle.py [--sizes 256 2048 16384] [--nodes-sample N]   # ~25 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PP = {256: 4, 2048: 8, 4096: 8, 16384: 16}
SCRAPE_S = 15.0
VICTORIA_ARGS = ["-search.maxUniqueTimeseries=2000000", "-maxInsertRequestSize=268435456"]
INTERVAL_S = 30.0  # windows of two scrape intervals, evaluations that do not overlap


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int | str = "self") -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024.0
    return out


# ---- child: the detector's cycles against one store -------------------------------------------

def child(args: argparse.Namespace) -> int:
    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.service import DetectorService, EventWriter
    from rankwatch.detectors.source import PromSource
    from rankwatch.detectors.state import DetectorState

    config = DetectorConfig(interval_s=args.interval, window_s=args.interval)
    client = PromClient(PromConnection(url=args.url, timeout_s=120))
    seen = {"bytes": 0, "requests": 0}

    def count(r: requests.Response, *a: object, **k: object) -> None:
        seen["bytes"] += len(r.content)
        seen["requests"] += 1

    client.session.hooks["response"].append(count)
    src = PromSource(client, config.window_s, config.efa_error_counters)
    tmp = Path(args.workdir)
    events_file = tmp / "events.jsonl"
    state = DetectorState(tmp / "state.sqlite")
    svc = DetectorService(src, DetectorCore(config), interval_s=config.interval_s, state=state,
                          writer=EventWriter(path=events_file))
    cycles = []
    t = args.start
    try:
        while t <= args.end + 1e-6:
            b0, r0 = seen["bytes"], seen["requests"]
            s0, c0 = proc_cpu(args.server_pid), time.process_time()
            res = svc.run_cycle(t)
            cycles.append({"t": t, "wall": res.duration_s, "cpu": time.process_time() - c0,
                           "server_cpu": proc_cpu(args.server_pid) - s0, "bytes": seen["bytes"] - b0,
                           "requests": seen["requests"] - r0, "errors": res.errors[:3],
                           "ranks": len(res.snapshot.ranks) if res.snapshot else 0,
                           "gpus": len(res.snapshot.gpus) if res.snapshot else 0,
                           "nics": len(res.snapshot.nics) if res.snapshot else 0,
                           "rss": proc_mem()["VmRSS"], "path": src.path})
            t += config.interval_s
    finally:
        svc.close()
    events = [json.loads(x) for x in events_file.read_text().splitlines()] if events_file.exists() else []
    mem = proc_mem()
    print(json.dumps({"cycles": cycles, "rss_peak": mem["VmHWM"], "rss_end": mem["VmRSS"],
                      "events": [{k: e.get(k) for k in ("time", "kind", "state", "rank", "node")} for e in events]}))
    return 0


# ---- parent: data, stores, children ------------------------------------------------------------

def wait_compacted(url: str, quiet_s: float = 75.0, limit_s: float = 1800.0) -> float:
    """Wait until Prometheus has merged the overlapping backfilled blocks (its compaction loop
    runs every minute): no compaction and the same blocks for ``quiet_s``. Returns the wait."""
    t0 = time.monotonic()

    def state() -> tuple[float, float]:
        m = requests.get(url + "/metrics", timeout=30).text
        vals = {}
        for line in m.splitlines():
            for name in ("prometheus_tsdb_blocks_loaded", "prometheus_tsdb_compactions_total"):
                if line.startswith(name + " "):
                    vals[name] = float(line.split()[1])
        return vals.get("prometheus_tsdb_blocks_loaded", 0.0), vals.get("prometheus_tsdb_compactions_total", 0.0)

    last, since = state(), time.monotonic()
    while time.monotonic() - t0 < limit_s:
        time.sleep(5)
        now = state()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return time.monotonic() - t0


def run_child(url: str, server_pid: int, start: float, end: float, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", "--url", url, "--server-pid", str(server_pid), "--start", str(start),
           "--end", str(end), "--interval", str(INTERVAL_S), "--workdir", str(workdir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"detector child failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 2048, 16384], help="ranks (default: 256 2048 16384)")
    ap.add_argument("--nodes-sample", type=int, default=None,
                    help="node exporters written per job (default: every node, p5 density)")
    ap.add_argument("--duration", type=float, default=330.0, help="seconds of job (default: 330)")
    ap.add_argument("--timed", type=int, default=5, help="last cycles reported as steady state (default: 5)")
    ap.add_argument("--stores", nargs="+", default=["prometheus", "victoria"], help="(default: prometheus victoria)")
    ap.add_argument("--paths", nargs="+", default=["raw", "rules"],
                    help="raw: the stores hold the scraped series only; rules: the detector's recording rules "
                         "evaluated over the data too (default: raw rules)")
    ap.add_argument("--tail", type=int, default=6,
                    help="from --tail-from ranks on, run only the last N cycles, not the whole job (default: 6)")
    ap.add_argument("--tail-from", type=int, default=4096, help="size in ranks from which --tail applies (default: 4096)")
    ap.add_argument("--keep-state", type=Path, default=None, metavar="DIR",
                    help="copy each run's detector state database into DIR, for bench/bench_state_save.py "
                         "(default: not kept)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--end", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=INTERVAL_S, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from scale_stores import backfill_rules_prometheus, load, replay_rules_victoria

    from rankwatch.sim.scale import ScaleJob

    la = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    for ranks in args.sizes:
        job = ScaleJob(ranks=ranks, pp=PP.get(ranks, 8), duration_s=args.duration, scrape_s=SCRAPE_S,
                       straggler=ranks // 3, magnitude=0.25, onset_s=60.0, nodes_sample=args.nodes_sample, seed=5)
        end = job.start_time + job.duration_s
        first = job.start_time + INTERVAL_S if args.tail <= 0 or ranks < args.tail_from else \
            end - (args.tail - 1) * INTERVAL_S
        with tempfile.TemporaryDirectory(prefix="bench-scale-cycle-") as tmp_s:
            tmp = Path(tmp_s)
            # vmalert's query over the EFA error counters touches 5 series per EFA device: 327 680
            # at 16 384 ranks, past VictoriaMetrics' default limit of 300 000 per query; and its
            # writes of one rule's results, 65 536 series, exceed the default 32 MB request
            loaded = load(job, tmp, prometheus="prometheus" in args.stores, victoria="victoria" in args.stores,
                          victoria_args=VICTORIA_ARGS)
            try:
                waited = wait_compacted(loaded.prometheus.url) if loaded.prometheus else 0.0
                print(f"{ranks} ranks: {loaded.samples:,} samples loaded ({loaded.timings}); "
                      f"Prometheus compaction settled after {waited:.0f} s", flush=True)
                for path in args.paths:
                    if path == "rules":
                        if loaded.prometheus is not None:
                            loaded.prometheus, took = backfill_rules_prometheus(
                                loaded.prometheus, tmp / "tsdb", job.start_time, end, tmp)
                            waited = wait_compacted(loaded.prometheus.url)
                            print(f"  rules backfilled into Prometheus in {took:.0f} s (+{waited:.0f} s compaction)",
                                  flush=True)
                        if loaded.victoria is not None:
                            took = replay_rules_victoria(loaded.victoria, job.start_time, end, tmp)
                            print(f"  rules replayed into VictoriaMetrics in {took:.0f} s", flush=True)
                    for store in args.stores:
                        server = loaded.prometheus if store == "prometheus" else loaded.victoria
                        assert server is not None
                        out = run_child(server.url, server.proc.pid, first, end, tmp / f"child-{store}-{path}")
                        if args.keep_state is not None:
                            args.keep_state.mkdir(parents=True, exist_ok=True)
                            shutil.copy(tmp / f"child-{store}-{path}" / "state.sqlite",
                                        args.keep_state / f"state-{ranks}-{store}-{path}.sqlite")
                        # the first cycle learns the store (which path, how many NICs): not steady
                        steady = out["cycles"][1:][-args.timed:]
                        row = {"ranks": ranks, "store": store, "path": steady[-1]["path"], "samples": loaded.samples,
                               "wall": statistics.median(c["wall"] for c in steady),
                               "wall_max": max(c["wall"] for c in steady),
                               "cpu": statistics.median(c["cpu"] for c in steady),
                               "server_cpu": statistics.median(c["server_cpu"] for c in steady),
                               "bytes": statistics.median(c["bytes"] for c in steady),
                               "requests": steady[-1]["requests"], "rss_peak": out["rss_peak"],
                               "errors": sorted({e for c in out["cycles"] for e in c["errors"]})[:3],
                               "entities": (steady[-1]["ranks"], steady[-1]["gpus"], steady[-1]["nics"]),
                               "cycles": len(out["cycles"]),
                               "events": [(e["kind"], e["state"], e["rank"]) for e in out["events"]],
                               "straggler": job.straggler}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
            finally:
                loaded.close()
    la = os.getloadavg()
    print(f"\nload average at the end {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}")
    print(f"{'ranks':>6} {'store':<10} {'path':<16} {'cycle (median/max)':>19} {'detector CPU':>12} {'store CPU':>9} "
          f"{'bytes read':>11} {'requests':>8} {'detector RSS peak':>17}  events")
    for r in rows:
        print(f"{r['ranks']:>6} {r['store']:<10} {r['path']:<16} {r['wall']:>8.2f} / {r['wall_max']:>5.2f} s {r['cpu']:>10.2f} s "
              f"{r['server_cpu']:>7.2f} s {r['bytes'] / 1e6:>8.1f} MB {r['requests']:>8} "
              f"{r['rss_peak'] / (1 << 20):>13.0f} MiB  {r['events']} (straggler {r['straggler']})"
              + (f" ERRORS {r['errors']}" if r["errors"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
