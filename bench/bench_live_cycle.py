"""One live detector cycle for a 256-rank job, Prometheus queries included (target: <= 200 ms).

A simulated 256-rank job (8 tp x 4 pp x 8 dp on 32 nodes, 8 GPUs and 4 EFA devices each) from
rankwatch.sim.scenario is backfilled with promtool into a real Prometheus; the live path
(instant queries at an aligned time inside the data, snapshot, core evaluation, SQLite state
save) is then timed cycle by cycle, exactly as `rankwatch detector` runs it. Baselines in the
same run: the round trip of a trivial query (`vector(1)`), the same cycle with the queries
issued one after another instead of concurrently, and (``--baseline``) the same cycles through
the client as it was before the I/O tuning — gzip responses, the standard library's JSON
decoder, one request per query (EFA counters not merged) — timed alternately with the tuned
client on the same data.

    .venv/bin/python bench/bench_live_cycle.py [--layout 8x4x8] [--cycles 30] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used, from /proc: load-independent cost."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="8x4x8", help="tp x pp x dp (default 8x4x8 = 256 ranks)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of simulated job (default 900)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the pre-tuning client (gzip, stdlib json, unmerged), alternating with the tuned one")
    args = ap.parse_args(argv)

    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import DetectorService
    from rankwatch.detectors.source import PromSource
    from rankwatch.detectors.state import DetectorState
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    tp, pp, dp = (int(x) for x in args.layout.split("x"))
    lay = Layout(tp=tp, pp=pp, dp=dp)
    nodes = max(1, lay.world // 8)
    sc = Scenario("live-cycle", layout=lay, nodes=nodes, duration_s=args.duration,
                  faults=[Fault("slowdown", rank=lay.world // 3, start_s=args.duration / 3, magnitude=0.2)])
    cfg = DetectorConfig()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        t0 = time.perf_counter()
        om, _, samples = write_replay(sc, tmp)
        print(f"job: {lay.world} ranks on {nodes} nodes, {samples} samples over {args.duration:.0f} s "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        with ReplayDataset(om) as ds:
            print(f"backfill {ds.timings['backfill_s']:.2f} s, Prometheus start-up {ds.timings['startup_s']:.2f} s")
            client = PromClient(PromConnection(url=ds.url, timeout_s=30))
            src = PromSource(client, cfg.window_s, cfg.efa_error_counters)
            state = DetectorState(Path(tmp) / "state.sqlite")
            svc = DetectorService(src, DetectorCore(cfg), interval_s=cfg.interval_s, state=state)
            base = None
            if args.baseline:
                old = PromClient(PromConnection(url=ds.url, timeout_s=30, compress=True))
                old.loads = json.loads
                base_src = PromSource(old, cfg.window_s, cfg.efa_error_counters, merge_instant=False)
                base = DetectorService(base_src, DetectorCore(cfg), interval_s=cfg.interval_s,
                                       state=DetectorState(Path(tmp) / "state-baseline.sqlite"))
            first = (ds.min_time // cfg.interval_s + 1) * cfg.interval_s
            times = [first + cfg.interval_s * k for k in range(int((ds.max_time - first) // cfg.interval_s) + 1)]
            # warm the core past its warm-up with the first cycles (not timed), then time the rest
            warm = times[: len(times) // 3]
            for t in warm:
                svc.run_cycle(t)
                if base is not None:
                    base.run_cycle(t)
            timed = times[len(warm):][: args.cycles]
            cycle, snap_s, eval_s = [], [], []
            for t in timed:
                a = time.perf_counter()
                snap = src.snapshot(t)
                b = time.perf_counter()
                svc.core.evaluate(snap)
                c = time.perf_counter()
                snap_s.append(b - a)
                eval_s.append(c - b)
            prom_pid = ds.prometheus.proc.pid if ds.prometheus else None
            cpu_ours, cpu_prom = [], []
            b_cycle: list[float] = []
            b_ours: list[float] = []
            b_prom: list[float] = []
            for t in timed:
                runs = [(svc, cycle, cpu_ours, cpu_prom)]
                if base is not None:
                    runs.append((base, b_cycle, b_ours, b_prom))
                for s, wall, ours, prom in runs:
                    c0, p0 = time.process_time(), proc_cpu(prom_pid)
                    res = s.run_cycle(t + 0.0)  # the service path: snapshot + evaluate + SQLite save + publish
                    ours.append(time.process_time() - c0)
                    prom.append(proc_cpu(prom_pid) - p0)
                    assert not res.errors, res.errors
                    wall.append(res.duration_s)
            if base is not None:
                for t in timed[:5]:  # the tuning must not change what the core sees
                    assert src.snapshot(t) == base_src.snapshot(t)
            seq = []
            for t in timed[:10]:
                a = time.perf_counter()
                for q in src.instant_queries:
                    client.query(q.expr, t)
                seq.append(time.perf_counter() - a)
            rt = []
            for _ in range(50):
                a = time.perf_counter()
                client.query("vector(1)", timed[0])
                rt.append(time.perf_counter() - a)
            n_ranks = len(snap.ranks)
            src.close()
            state.close()
            if base is not None:
                base_src.close()
                base.close()

    def ms(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"median {statistics.median(xs) * 1e3:6.1f} ms  p90 {xs[int(0.9 * (len(xs) - 1))] * 1e3:6.1f} ms  "
                f"min {xs[0] * 1e3:6.1f} ms")

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{len(src.queries)} queries in {len(src.instant_queries)} requests per cycle, {n_ranks} ranks, {len(snap.gpus)} GPUs, {len(snap.nics)} NICs")
    print(f"live cycle (service: queries + snapshot + evaluate + state save): {ms(cycle)}")
    print(f"  snapshot (concurrent queries + join):                          {ms(snap_s)}")
    print(f"  core evaluate:                                                 {ms(eval_s)}")
    print(f"CPU per cycle (load-independent): detector {ms(cpu_ours)}")
    print(f"                                  Prometheus {ms(cpu_prom)}")
    print(f"baseline: the same requests one after another:                    {ms(seq)}")
    print(f"baseline: one trivial query round trip (vector(1)):               {ms(rt)}")
    if base is not None:
        print(f"baseline: pre-tuning client (gzip, stdlib json, 24 requests):     {ms(b_cycle)}")
        print(f"  its CPU per cycle: detector {ms(b_ours)}")
        print(f"                     Prometheus {ms(b_prom)}")
        print(f"  tuned/baseline median cycle: {statistics.median(cycle) / statistics.median(b_cycle):.2f}")
    med = statistics.median(cycle)
    print(f"target <= 200 ms: {'met' if med <= 0.2 else 'NOT met'} (median {med * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
