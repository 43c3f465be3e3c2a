"""The demo's figures: wall time (target < 5 min on 2 cores), Prometheus resource use for the
256-rank cluster (head series, samples/s, scrape duration, memory, CPU), CPU of every demo
process, and the detection delay of each scripted incident.

    .venv/bin/python bench/bench_demo.py                 # the full 32 × 8 demo, ~5 min
    .venv/bin/python bench/bench_demo.py --nodes 8       # smaller
    .venv/bin/python bench/bench_demo.py --json out.json

It runs exactly what `make demo` runs (``rankwatch.demo.runner.run_demo``) and prints the
figures as markdown rows for BENCHMARKS.md. The machine's load average is printed with them:
on a shared machine every latency figure depends on it."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from rankwatch.demo.runner import run_demo
from rankwatch.demo.scenario import DemoConfig
from rankwatch.demo.scoring import entity_of


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=DemoConfig.nodes)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    ap.add_argument("--report-dir", type=Path, help="keep the demo's report there (default: discarded)")
    args = ap.parse_args()
    cfg = DemoConfig(nodes=args.nodes)
    load_before = os.getloadavg()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rankwatch-bench-demo-") as tmp:
        report = args.report_dir or Path(tmp) / "report"
        result = run_demo(cfg, report, live=False, console=Console(file=io.StringIO(), width=200))
    wall = time.monotonic() - began
    load_after = os.getloadavg()
    res = result.resources
    figures = {
        "cluster": f"{cfg.nodes} nodes x {cfg.gpus_per_node} GPUs = {cfg.world_size} ranks",
        "wall_s": round(wall, 1),
        "phases_s": {k: round(v, 1) for k, v in result.phases.items()},
        "report_steps_s": {k: round(v, 1) for k, v in result.laps.items()},
        "load_average_before_after": [round(load_before[0], 1), round(load_after[0], 1)],
        "all_correct": result.verdict.all_correct,
        "false_alarms": [f"{e.kind} {entity_of(e)} at t+{e.time - result.t0:.0f}s"
                         for e in result.verdict.false_alarms],
        "detection_delay_s": {r.incident.name: None if r.delay is None else round(r.delay, 1)
                              for r in result.verdict.results if not r.incident.benign},
        "prometheus": res.__dict__ if res else None,
        "cpu_cores_avg": {k: round(v / max(result.wall_seconds, 1.0), 2) for k, v in result.cpu_seconds.items()},
        "leftover_processes": result.leftover_pids,
    }
    print(json.dumps(figures, indent=2, default=str))
    if res:
        print("\n| figure | value |\n|---|---|")
        for k, v in res.rows():
            print(f"| {k} | {v} |")
    print("\n| process | CPU cores (avg over the timeline) |\n|---|---|")
    for k, v in figures["cpu_cores_avg"].items():
        print(f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0 if result.verdict.all_correct and not result.leftover_pids else 1


if __name__ == "__main__":
    sys.exit(main())
