"""`rankwatch sim scenario …`: write a replay file (OpenMetrics with timestamps) and its
ground-truth JSON for a simulated job with one injected fault. `rankwatch sim slack`: run the
local Slack-compatible server (rankwatch.sim.slack) until interrupted."""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from rankwatch.errors import ConfigError

SCENARIO_KINDS = ("healthy", "slowdown", "spike", "thermal", "dataloader", "xid79", "dbe", "efa", "hang", "job_slowdown")
SLACK_PORT = 9416
SLACK_CHANNEL = "C0RANKWATCH"
SLACK_SIM_TOKEN = "xoxb-rankwatch-sim"  # a fake server's token: what clients must present to it
DEFAULT_MAGNITUDE = {"slowdown": 0.2, "spike": 0.5, "thermal": 0.15, "dataloader": 0.3, "dbe": 2.0, "efa": 0.3,
                     "job_slowdown": 0.25}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("sim", help="simulated training jobs and replay files")
    sub = p.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    s = sub.add_parser(
        "scenario", help="write a replay file (OpenMetrics) and ground truth for a simulated job",
        description="Simulate a synchronous training job with one labelled fault and write OUT/NAME.om "
                    "(OpenMetrics with timestamps, for promtool tsdb create-blocks-from openmetrics or "
                    "`rankwatch detect --replay`) and OUT/NAME.truth.json.")
    s.add_argument("kind", choices=SCENARIO_KINDS, help="fault to inject (healthy = none)")
    s.add_argument("--out", default=".", help="output directory (default: current directory)")
    s.add_argument("--name", help="file name stem (default: the kind)")
    s.add_argument("--layout", default="8x4x2", help="tp x pp x dp, e.g. 8x4x8 for 256 ranks (default: 8x4x2)")
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per simulated node (default: 8)")
    s.add_argument("--duration", type=float, default=900.0, help="seconds of job time (default: 900)")
    s.add_argument("--onset", type=float, default=240.0, help="fault start, seconds into the job (default: 240)")
    s.add_argument("--fault-duration", type=float, default=None, help="seconds the fault lasts (default: to the end)")
    s.add_argument("--magnitude", type=float, default=None,
                   help="fault size: slowdown fraction, … (default: per kind, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MAGNITUDE.items()) + ")")
    s.add_argument("--rank", type=int, default=None, help="target rank for rank/GPU faults (default: last rank of node 1)")
    s.add_argument("--node", type=int, default=None, help="target node index for efa faults (default: 1)")
    s.add_argument("--step", type=float, default=1.0, help="nominal step time in seconds (default: 1.0)")
    s.add_argument("--scrape", type=float, default=5.0, help="scrape interval in seconds (default: 5)")
    s.add_argument("--node-scrape", type=float, default=None, metavar="S",
                   help="scrape interval of the node exporters, a multiple of --scrape (default: --scrape)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default: 0)")
    s.add_argument("--start-time", type=float, default=1_750_000_000.0,
                   help="Unix time of the job start (default: 1750000000)")
    s.add_argument("--run", default="sim-run", help="run label (default: sim-run)")
    s.add_argument("--no-layout-labels", action="store_true", help="omit pp/tp/dp labels from rankwatch_rank_info")
    s.set_defaults(func=_scenario)

    sl = sub.add_parser(
        "slack", help="run a local Slack-compatible server until interrupted",
        description="Serve the parts of Slack's Web API (auth.test, chat.postMessage, chat.update, "
                    "conversations.history, file uploads) and an incoming webhook that rankwatch uses, on "
                    "loopback, so that the detector's Slack alerts can be tried without a workspace. Each "
                    "message received is printed; --dump keeps a JSON file of all of them up to date. The bot "
                    f"token it accepts is $SLACK_BOT_TOKEN, or {SLACK_SIM_TOKEN} when that is not set.")
    sl.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sl.add_argument("--port", type=int, default=SLACK_PORT, metavar="P",
                    help=f"port to listen on; 0 picks a free one (default: {SLACK_PORT})")
    sl.add_argument("--dump", metavar="FILE",
                    help="keep FILE up to date with every message received, as a JSON list (default: none)")
    sl.add_argument("--channel", default=SLACK_CHANNEL,
                    help=f"the one channel ID it knows (default: {SLACK_CHANNEL})")
    sl.set_defaults(func=_slack)
    from rankwatch.sim import scale_cli

    scale_cli.register(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def parse_layout(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m or 0 in (vals := tuple(int(g) for g in m.groups())):
        raise ConfigError(f"--layout: expected TPxPPxDP with positive integers, e.g. 8x4x2, got {text!r}")
    return vals  # type: ignore[return-value]


def build(args: argparse.Namespace) -> Any:
    from rankwatch.sim.scenario import Scenario
    from rankwatch.sim.training import Fault, Layout

    tp, pp, dp = parse_layout(args.layout)
    lay = Layout(tp=tp, pp=pp, dp=dp)
    gpn = args.gpus_per_node
    if gpn < 1:
        raise ConfigError("--gpus-per-node: must be at least 1")
    nodes = -(-lay.world // gpn)
    if args.duration <= 0 or args.scrape <= 0 or args.step <= 0:
        raise ConfigError("--duration, --scrape and --step must be positive")
    if args.node_scrape is not None:
        ratio = args.node_scrape / args.scrape
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise ConfigError(f"--node-scrape: must be a multiple of --scrape ({args.scrape:g} s), got {args.node_scrape:g}")
    if not 0 <= args.onset < args.duration:
        raise ConfigError(f"--onset: must be within the scenario (0 to {args.duration:g} s)")
    rank = args.rank if args.rank is not None else min(2 * gpn - 1, lay.world - 1)
    if not 0 <= rank < lay.world:
        raise ConfigError(f"--rank: must be between 0 and {lay.world - 1}")
    node = args.node if args.node is not None else min(1, nodes - 1)
    if not 0 <= node < nodes:
        raise ConfigError(f"--node: must be between 0 and {nodes - 1}")
    end = None if args.fault_duration is None else args.onset + args.fault_duration
    kind = args.kind
    mag = args.magnitude if args.magnitude is not None else DEFAULT_MAGNITUDE.get(kind, 0.0)
    faults = []
    if kind in ("slowdown", "dataloader"):
        faults.append(Fault(kind, rank=rank, start_s=args.onset, end_s=end, magnitude=mag))
    elif kind == "spike":
        faults.append(Fault(kind, rank=rank, start_s=args.onset, end_s=args.onset + (args.fault_duration or 15.0),
                            magnitude=mag))
    elif kind in ("thermal", "xid79", "dbe"):
        faults.append(Fault(kind, node=rank // gpn, gpu=rank % gpn, start_s=args.onset, end_s=end, magnitude=mag))
    elif kind == "efa":
        faults.append(Fault(kind, node=node, start_s=args.onset, end_s=end, magnitude=mag))
    elif kind in ("hang", "job_slowdown"):
        faults.append(Fault(kind, start_s=args.onset, end_s=end, magnitude=mag))
    return Scenario(args.name or kind, layout=lay, nodes=nodes, gpus_per_node=gpn, base_step_s=args.step,
                    duration_s=args.duration, seed=args.seed, faults=faults, scrape_s=args.scrape, run=args.run,
                    start_time=args.start_time, pp_labels=not args.no_layout_labels, node_scrape_s=args.node_scrape)


def _scenario(args: argparse.Namespace) -> int:
    from rankwatch.sim.scenario import write_replay

    sc = build(args)
    om, truth, n = write_replay(sc, args.out)
    print(f"wrote {om} ({n} samples, {sc.layout.world} ranks, {sc.duration_s:g} s) and {truth}")
    return 0


def _write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _slack(args: argparse.Namespace) -> int:
    import signal
    from dataclasses import asdict

    from rankwatch.errors import RankwatchError
    from rankwatch.sim.slack import RecordedRequest, SlackServer

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected 0-65535, got {args.port}")
    dump = Path(args.dump) if args.dump else None
    if dump is not None and not dump.parent.is_dir():
        raise ConfigError(f"--dump {dump}: directory {dump.parent} does not exist")
    token = os.environ.get("SLACK_BOT_TOKEN") or SLACK_SIM_TOKEN
    server = SlackServer(token=token, channel=args.channel, host=args.host, port=args.port)
    try:
        server.start()
    except OSError as exc:
        raise RankwatchError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    lock = threading.Lock()
    shown = 0

    def on_request(req: RecordedRequest) -> None:
        nonlocal shown
        with lock:  # one writer at a time; messages printed in the order they were stored
            with server._lock:
                messages = [asdict(m) for m in server.messages]
            if dump is not None:
                _write_json(dump, messages)
            for m in messages[shown:]:
                when = time.strftime("%H:%M:%S", time.localtime(float(m["ts"].split(".")[0])))
                where = f"thread {m['thread_ts']}" if m["thread_ts"] else m["channel"]
                text = " ".join((m["text"] or "").split())
                print(f"{when} {m['via']} message {m['ts']} in {where}: {text[:300]}", flush=True)
            shown = len(messages)
            now = time.strftime("%H:%M:%S")
            if req.error or req.status != 200:
                print(f"{now} {req.method} {req.path} answered {req.status} {req.error or ''}".rstrip(), flush=True)
            elif req.api_method == "chat.update":
                print(f"{now} chat.update of message {req.params.get('ts')}", flush=True)

    server.on_request = on_request
    if dump is not None:
        _write_json(dump, [])
    token_note = "$SLACK_BOT_TOKEN" if os.environ.get("SLACK_BOT_TOKEN") else f"{SLACK_SIM_TOKEN} (set SLACK_BOT_TOKEN to choose)"
    print(f"local Slack on {server.url}\n"
          f"  Web API:  {server.api_url}  channel {args.channel}, bot token {token_note}\n"
          f"  webhook:  {server.webhook_url}  (plain http: for clients other than the detector, which wants https)\n"
          f"detector TOML, with SLACK_BOT_TOKEN set to the same token in the detector's environment:\n"
          f"  [slack]\n  channel = \"{args.channel}\"\n  api_url = \"{server.api_url}\"\n"
          + (f"messages are written to {dump}\n" if dump is not None else ""), end="", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.stop()
    n = len(server.messages)
    print(f"stopped after {len(server.requests)} requests, {n} message{'' if n == 1 else 's'}"
          + (f"; dump in {dump}" if dump is not None else ""), flush=True)
    return 0
