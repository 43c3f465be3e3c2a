"""Same-run A/B of the replay's detector side between two checkouts: one temporary Prometheus
holding the replay-speed export (bench/bench_replay.py's 64-rank, 30-minute job), and the query
+ join + evaluate phase run alternately by each checkout's code in its own process, several
times per round. Prints per checkout the median wall and CPU of snapshot building (range
queries, decoding, joins) and of the core's evaluations, and the events digest (must match).

    git archive 80e0905 | tar -x -C /tmp/replay-base
    .venv/bin/python bench/bench_replay_ab.py /tmp/replay-base . [--rounds 5] [--reps 3]

The backfill is not in it (promtool's, the same in both): bench_replay.py times the whole path."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(url: str, start: float, end: float, reps: int) -> None:
    """Runs in the checkout under test (PYTHONPATH): only APIs both checkouts have."""
    import hashlib

    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.source import PromSource

    cfg = DetectorConfig(interval_s=15.0, window_s=30.0)
    out = []
    for _ in range(reps):
        src = PromSource(PromClient(PromConnection(url=url, timeout_s=60)), cfg.window_s, cfg.efa_error_counters)
        core = DetectorCore(cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        snaps = list(src.snapshots(start, end, cfg.interval_s))
        w1, c1 = time.perf_counter(), time.process_time()
        events = [e.to_json() for s in snaps for e in core.evaluate(s)]
        w2, c2 = time.perf_counter(), time.process_time()
        src.close()
        digest = hashlib.sha256(json.dumps(events, sort_keys=True, default=str).encode()).hexdigest()[:16]
        out.append({"snap_wall": w1 - w0, "snap_cpu": c1 - c0, "eval_wall": w2 - w1, "eval_cpu": c2 - c1,
                    "events": len(events), "digest": digest})
        del snaps
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs=2, help="the two checkouts: before, after")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="replays per checkout and round")
    args = ap.parse_args(argv)

    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import align_down, align_up
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("replay-bench", layout=Layout(tp=8, pp=4, dp=2), nodes=8, duration_s=1800.0, scrape_s=15.0,
                  faults=[Fault("slowdown", rank=37, start_s=600, end_s=1200, magnitude=0.2)])
    trees = [str(Path(t).resolve()) for t in args.trees]
    res: dict[str, list[dict]] = {t: [] for t in trees}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-ab-") as tmp:
        om, _, samples = write_replay(sc, tmp)
        with ReplayDataset(om) as ds:
            start, end = align_up(ds.min_time, 15.0), align_down(ds.max_time, 15.0)
            for k in range(args.rounds):
                for tree in trees if k % 2 == 0 else trees[::-1]:  # alternate which goes first
                    loads.append(os.getloadavg()[0])
                    p = subprocess.run([sys.executable, __file__, "--worker", ds.url, str(start), str(end),
                                        str(args.reps)], env={**os.environ, "PYTHONPATH": tree},
                                       capture_output=True, text=True, check=True)
                    res[tree] += json.loads(p.stdout.strip().splitlines()[-1])
    loads.append(os.getloadavg()[0])
    print(f"{samples} samples, 120 evaluations; {args.rounds} rounds x {args.reps} replays per checkout; "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    med = statistics.median
    cols = ("snap_wall", "snap_cpu", "eval_wall", "eval_cpu")
    print(f"{'checkout':40s} " + " ".join(f"{c:>10s}" for c in cols) + "  q+e CPU  events digest")
    for tree in trees:
        r = res[tree]
        print(f"{tree:40s} " + " ".join(f"{med(x[c] for x in r):9.3f}s" for c in cols)
              + f"  {med(x['snap_cpu'] + x['eval_cpu'] for x in r):6.3f}s  {r[0]['events']} "
              + " ".join(sorted({x['digest'] for x in r})))
    a, b = (res[t] for t in trees)
    for c in (*cols, "q+e CPU"):
        def val(x: dict, c: str = c) -> float:
            return x["snap_cpu"] + x["eval_cpu"] if c == "q+e CPU" else x[c]
        print(f"ratio after/before, {c}: {med(val(x) for x in b) / med(val(x) for x in a):.2f}")
    same = {x["digest"] for x in a} == {x["digest"] for x in b} and len({x["digest"] for x in a}) == 1
    print("same events in both checkouts:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
