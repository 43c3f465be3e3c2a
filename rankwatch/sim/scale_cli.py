"""`rankwatch sim scale …`: replay data for a large simulated job (thousands of ranks, nodes at
p5 density), written as a file or streamed straight into VictoriaMetrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rankwatch.errors import ConfigError


def register(sub: Any) -> None:
    s = sub.add_parser(
        "scale", help="replay data for a large simulated job (thousands of ranks, p5 nodes), streamed",
        description="Simulate a synchronous job of RANKS ranks (tp x pp x dp) on p5 nodes (8 GPUs, 32 EFA devices) "
                    "with at most one straggler, and write OUT/NAME.om (OpenMetrics with timestamps, for promtool "
                    "or `rankwatch detect --replay`) or OUT/NAME.prom (Prometheus text with millisecond timestamps) "
                    "and OUT/NAME.truth.json; or stream it into VictoriaMetrics with --victoria-url (no file). "
                    "The text is written as it is generated; --nodes-sample bounds the node side.")
    s.add_argument("--ranks", type=int, required=True, help="world size, a multiple of tp x pp and of 8 (required)")
    s.add_argument("--tp", type=int, default=8, help="tensor-parallel size (default: 8)")
    s.add_argument("--pp", type=int, default=4, help="pipeline stages (default: 4)")
    s.add_argument("--efa-per-node", type=int, default=32, help="EFA devices per node (default: 32, as a p5.48xlarge)")
    s.add_argument("--nodes-sample", type=int, default=None, metavar="N",
                   help="write GPU and EFA series for N nodes only, evenly spread, the straggler's node among them "
                        "(default: every node)")
    s.add_argument("--straggler", type=int, default=None, metavar="RANK",
                   help="rank whose compute slows down at --onset (default: none, a healthy job)")
    s.add_argument("--magnitude", type=float, default=0.2, help="straggler slowdown fraction (default: 0.2)")
    s.add_argument("--onset", type=float, default=240.0, help="straggler start, seconds into the job (default: 240)")
    s.add_argument("--duration", type=float, default=600.0, help="seconds of job time (default: 600)")
    s.add_argument("--scrape", type=float, default=15.0, help="scrape interval in seconds (default: 15)")
    s.add_argument("--step", type=float, default=2.0, help="nominal step time in seconds (default: 2)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--run", default="sim-run", help="run label (default: sim-run)")
    s.add_argument("--start-time", type=float, default=1_750_000_000.0,
                   help="Unix time of the job start (default: 1750000000)")
    s.add_argument("--format", choices=("openmetrics", "prometheus"), default="openmetrics",
                   help="openmetrics (seconds, for promtool) or prometheus (milliseconds, for VictoriaMetrics' "
                        "import API) (default: openmetrics)")
    s.add_argument("--out", default=".", help="output directory (default: current directory)")
    s.add_argument("--name", default=None, help="file name stem (default: scale-RANKS)")
    s.add_argument("--victoria-url", metavar="URL", default=None,
                   help="stream the samples into this VictoriaMetrics (/api/v1/import/prometheus) instead of "
                        "writing a data file; the truth JSON is still written (default: write a file)")
    s.set_defaults(func=_run)


def build(args: argparse.Namespace) -> Any:
    from rankwatch.sim.scale import ScaleJob

    try:
        return ScaleJob(ranks=args.ranks, tp=args.tp, pp=args.pp, efa_per_node=args.efa_per_node,
                        duration_s=args.duration, scrape_s=args.scrape, step_s=args.step, straggler=args.straggler,
                        magnitude=args.magnitude, onset_s=args.onset, nodes_sample=args.nodes_sample, seed=args.seed,
                        run=args.run, start_time=args.start_time)
    except ValueError as exc:
        raise ConfigError(f"sim scale: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    from rankwatch import promserver
    from rankwatch.sim.scale import iter_chunks, simulate, write_replay

    job = build(args)
    if job.straggler is not None and not 0 <= job.onset_s < job.duration_s:
        raise ConfigError(f"--onset: must be within the job (0 to {job.duration_s:g} s)")
    name = args.name or f"scale-{job.ranks}"
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.victoria_url:
        tel = simulate(job)
        n = [0]
        promserver.victoria_import(args.victoria_url, iter_chunks(tel, "prometheus", n))
        out.mkdir(parents=True, exist_ok=True)
        truth = out / f"{name}.truth.json"
        truth.write_text(json.dumps(job.ground_truth(n[0]), indent=2) + "\n", encoding="utf-8")
        print(f"imported {n[0]} samples ({job.ranks} ranks, {len(job.sampled_nodes())} of {job.nodes} nodes with "
              f"exporters) into {args.victoria_url} in {time.perf_counter() - t0:.1f} s; wrote {truth}")
        return 0
    path, truth, n = write_replay(job, out, name, args.format)
    size = os.path.getsize(path)
    print(f"wrote {path} ({n} samples, {size / 1e6:.1f} MB, {job.ranks} ranks, {len(job.sampled_nodes())} of "
          f"{job.nodes} nodes with exporters, {time.perf_counter() - t0:.1f} s) and {truth}")
    sys.stdout.flush()
    return 0
