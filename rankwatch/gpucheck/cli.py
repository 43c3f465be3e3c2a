"""`rankwatch gpu-check`: check the GPU collector and the probe against a real NVIDIA GPU."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gpu-check", help="check the GPU collector, XID events and the probe against a real NVIDIA GPU",
        description="Scrapes the GPU collector over the real NVML, compares it with nvidia-smi -q -x, "
                    "loads the GPUs with matmuls and checks the probe's CUDA-event timing. Prints a "
                    "pass/fail table and writes it as JSON. Without a GPU it exits 2 at once.")
    p.add_argument("--out", default="gpu-check.json", metavar="FILE",
                   help="write the results here as JSON (default: gpu-check.json)")
    p.add_argument("--nvidia-smi", default="nvidia-smi", metavar="PATH",
                   help="the nvidia-smi binary to compare with (default: nvidia-smi)")
    p.add_argument("--load-seconds", type=float, default=20.0, metavar="S",
                   help="how long the matmul load runs before the loaded scrape (default: 20)")
    p.add_argument("--probe-steps", type=int, default=50, metavar="N",
                   help="probed steps in the CUDA-event timing check (default: 50)")
    p.set_defaults(func=_run)


def print_report(report: object, file: object = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from rankwatch.gpucheck.runner import Report

    assert isinstance(report, Report)
    style = {"pass": "green", "fail": "bold red", "skip": "yellow", "info": "cyan"}
    table = Table(title=f"rankwatch gpu-check: {'PASS' if report.passed else 'FAIL'}", show_lines=False)
    for col in ("check", "GPU", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "" if c.gpu is None else str(c.gpu), f"[{style[c.status]}]{c.status}[/]", c.detail)
    Console(file=file, width=160).print(table)


def _run(args: argparse.Namespace) -> int:
    import pynvml

    from rankwatch.errors import ConfigError
    from rankwatch.gpucheck.runner import detect, real_edges, run_gpu_check

    if not args.load_seconds > 0 or args.probe_steps < 1:
        raise ConfigError("--load-seconds must be > 0 and --probe-steps ≥ 1")
    detect(pynvml)  # before importing torch: without a GPU, say so at once
    edges = real_edges(args.nvidia_smi, probe_steps=args.probe_steps)
    report = run_gpu_check(edges, load_s=args.load_seconds,
                           progress=lambda msg: print(f"gpu-check: {msg}", file=sys.stderr, flush=True))
    print_report(report)
    Path(args.out).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if report.passed else 1
