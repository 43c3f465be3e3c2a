"""`rankwatch demo`: a simulated 256-GPU training cluster watched end to end on loopback.

See ``runner`` for the processes it starts and ``scenario`` for the scripted timeline."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rankwatch.errors import ConfigError


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"environment variable {name}={raw!r} must be > 0")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from rankwatch.demo.scenario import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="run a simulated 32-node × 8-GPU job watched end to end (Prometheus, detector, Slack, W&B)",
        description=(
            "Start a simulated training cluster on loopback (node exporters with simulated GPUs and "
            "EFA devices, one probe per rank fed by a simulated training job), a real Prometheus with "
            "the project's alert rules, the detector, a local Slack-compatible server and W&B in "
            "offline mode; play a scripted timeline of incidents; show it live; write a report."),
    )
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=d.nodes, help=f"simulated nodes (default: {d.nodes})")
    g.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help=f"GPUs (= ranks) per node (default: {d.gpus_per_node})")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: min(8, GPUs per node))")
    g.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (default: 4 from 8 nodes on, else 2, or smaller to divide the ranks)")
    g.add_argument("--efa-per-node", type=int, default=d.efa_per_node, help=f"simulated EFA devices per node (default: {d.efa_per_node})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"random seed of the simulation (default: {d.seed})")
    g.add_argument("--address-prefix", default=d.address_prefix,
                   help=f"first two octets of the simulated nodes' loopback addresses (default: {d.address_prefix})")
    t = p.add_argument_group("time (seconds of wall time)")
    t.add_argument("--speed", type=float, default=None,
                   help="stretch (<1) or compress (>1) every duration and interval (default: $DEMO_SPEED, else 1)")
    t.add_argument("--incident-seconds", type=float, default=None,
                   help=f"how long each incident lasts (default: $DEMO_INCIDENT_SECONDS, else {d.incident_seconds:g})")
    t.add_argument("--recovery-seconds", type=float, default=None,
                   help=f"healthy time after each incident (default: {d.recovery_seconds:g})")
    t.add_argument("--step-seconds", type=float, default=None,
                   help=f"wall time of one simulated training step (default: {d.step_seconds:g})")
    t.add_argument("--scrape-interval", type=float, default=None,
                   help=f"Prometheus scrape interval of the rank probes, and rule interval (default: {d.scrape_interval:g})")
    t.add_argument("--node-scrape-interval", type=float, default=None,
                   help=f"Prometheus scrape interval of the node exporters (default: {d.node_scrape_interval:g})")
    t.add_argument("--eval-interval", type=float, default=None,
                   help=f"detector evaluation interval (default: {d.eval_interval:g})")
    t.add_argument("--window", type=float, default=None, help=f"detector window (default: {d.window:g})")
    o = p.add_argument_group("output")
    o.add_argument("--report-dir", type=Path, default=Path("demo-report"), help="where the report is written, replacing what is there (default: demo-report)")
    o.add_argument("--plain", action="store_true", help="plain log lines instead of the live view")
    p.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace):  # -> DemoConfig
    from rankwatch.demo.scenario import DemoConfig

    d = DemoConfig()
    speed = args.speed if args.speed is not None else _env_float("DEMO_SPEED", 1.0)
    if speed <= 0:
        raise ConfigError(f"demo: --speed must be > 0 (got {speed})")
    gpn = args.gpus_per_node
    tp = args.tp if args.tp is not None else min(8, gpn)
    if args.pp is not None:
        pp = args.pp
    else:
        world = args.nodes * gpn
        pp = next((p for p in ((4, 2, 1) if args.nodes >= 8 else (2, 1)) if tp > 0 and world % (tp * p) == 0), 1)

    def dur(value: float | None, default: float, env: str | None = None) -> float:
        if value is not None:
            return value
        if env and os.environ.get(env):
            return _env_float(env, default)
        return default / speed

    return DemoConfig(
        nodes=args.nodes, gpus_per_node=gpn, tp=tp, pp=pp, efa_per_node=args.efa_per_node, seed=args.seed,
        address_prefix=args.address_prefix,
        step_seconds=dur(args.step_seconds, d.step_seconds),
        scrape_interval=dur(args.scrape_interval, d.scrape_interval),
        node_scrape_interval=dur(args.node_scrape_interval, d.node_scrape_interval),
        eval_interval=dur(args.eval_interval, d.eval_interval),
        window=dur(args.window, d.window),
        warmup_seconds=d.warmup_seconds / speed,
        benign_seconds=d.benign_seconds / speed,
        incident_seconds=dur(args.incident_seconds, d.incident_seconds, "DEMO_INCIDENT_SECONDS"),
        recovery_seconds=dur(args.recovery_seconds, d.recovery_seconds),
        tail_seconds=d.tail_seconds / speed,
    )


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rankwatch.demo.report import print_summary
    from rankwatch.demo.runner import run_demo

    cfg = config_from_args(args)
    console = Console(highlight=False)
    result = run_demo(cfg, args.report_dir, live=False if args.plain else None, console=console)
    print_summary(result, console, result.t0)
    if result.leftover_pids:
        console.print(f"[red]processes still running after clean-up: {result.leftover_pids}[/red]")
        return 1
    if not result.verdict.all_correct:
        console.print("[bold red]the detector missed an incident or raised a false alarm: see the table above[/bold red]")
        return 1
    console.print("[bold green]every incident caught with the right kind and entity; nothing else fired[/bold green]")
    return 0
