"""`rankwatch detector` (live service) and `rankwatch detect` (replay file or backtest range).

Both read the same TOML config (thresholds for the core; the alerting tables go to
``rankwatch.alerts.build_sink``) and produce the same events: JSON lines on stdout and in
``--events-file``, or one readable line each on stdout with ``--format text``. The live
detector also logs a heartbeat every ``--heartbeat-every`` cycles (``heartbeat.py``)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from rankwatch.cliargs import DeprecatedAlias
from rankwatch.detectors.heartbeat import DEFAULT_HEARTBEAT_CYCLES
from rankwatch.errors import ConfigError

log = logging.getLogger("rankwatch.detector")

# Only Prometheus reads the detector's /metrics and /healthz: loopback unless a deployment
# says otherwise (compose, Kubernetes and the systemd unit pass the address they need).
DEFAULT_LISTEN = "127.0.0.1:9415"
DEFAULT_STATE_DIR = "rankwatch-state"
STATE_DB_FILE = "detector.sqlite"  # inside --state-dir, beside the alerts' outbox
ENV_URL = "RANKWATCH_PROMETHEUS_URL"
FORMATS = ("json", "text")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="detector TOML (thresholds; [slack]/[wandb]/... for alerting)")
    p.add_argument("--interval", type=float, metavar="S",
                   help="seconds between evaluations, at least; overrides interval_s (default: 15, raised to the "
                        "probes' scrape interval learned from the data)")
    p.add_argument("--window", type=float, metavar="S",
                   help="window of the rates, at least; overrides window_s (default: 15, raised to interval + scrape "
                        "interval and 3 samples of each source)")
    p.add_argument("--events-file", metavar="FILE", help="also append the JSON-lines events to FILE (always JSON)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="events on stdout as JSON lines for machines, or one readable line each (default: json)")
    p.add_argument("--quiet", action="store_true", help="do not print events on stdout")


def _add_connection(p: argparse.ArgumentParser, *, with_url: bool) -> None:
    g = p.add_argument_group("Prometheus connection (any server speaking the Prometheus query API)")
    if with_url:
        g.add_argument("--prometheus", metavar="URL", default=os.environ.get(ENV_URL),
                       help=f"base URL, e.g. http://prometheus:9090 or an AMP workspace URL (default: ${ENV_URL})")
    g.add_argument("--query-timeout", type=float, default=5.0, metavar="S",
                   help="timeout of each request and, live, the budget of one cycle's queries together; a timeout "
                        "is never retried (default: 5)")
    g.add_argument("--query-retries", type=int, default=2, metavar="N",
                   help="retries with backoff on refused or reset connections and 429/502/503/504, within the "
                        "cycle's budget (default: 2)")
    g.add_argument("--bearer-token-file", metavar="FILE",
                   help="file holding a bearer token, re-read per request (or env RANKWATCH_PROMETHEUS_TOKEN)")
    g.add_argument("--basic-auth-user", metavar="USER",
                   help="basic auth user; password from --basic-auth-password-file or env RANKWATCH_PROMETHEUS_PASSWORD")
    g.add_argument("--basic-auth-password-file", metavar="FILE", help="file holding the basic auth password")
    g.add_argument("--sigv4-region", metavar="REGION",
                   help="sign requests with AWS SigV4 for Amazon Managed Service for Prometheus; credentials come "
                        "from the default AWS chain")
    g.add_argument("--sigv4-profile", metavar="NAME", help="AWS profile for SigV4 credentials")
    g.add_argument("--sigv4-service", default="aps", help=argparse.SUPPRESS)
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify the server's certificate")
    g.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    g.add_argument("--client-key", metavar="FILE", help="client key (PEM) for --client-cert")
    g.add_argument("--insecure-skip-verify", action="store_true",
                   help="do not verify the server's certificate (warned at start-up; not with --ca-file)")
    g.add_argument("--allow-redirects", action="store_true",
                   help="follow redirects that leave HTTPS or go to another host (credentials are not sent there); "
                        "by default they are refused and logged")
    g.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header, e.g. 'X-Scope-OrgID: team-a' for Mimir (repeatable)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detector", help="run the detector service against Prometheus",
        description="Evaluate every interval with instant queries at the aligned time; serve /metrics and /healthz; "
                    "keep state in SQLite so that a restart neither repeats nor loses alerts.")
    _add_connection(p, with_url=True)
    _add_common(p)
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"directory for the detector's state ({STATE_DB_FILE}: episodes and baselines) and the "
                        f"alerts' outbox, created if missing (default: {DEFAULT_STATE_DIR})")
    p.add_argument("--state-db", dest="state_db", default=None, metavar="FILE", action=DeprecatedAlias,
                   new="--state-dir DIR (the database is DIR/" + STATE_DB_FILE + ")")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address of /metrics and /healthz: this host only by default; 0.0.0.0:9415 when "
                        f"Prometheus scrapes it from another host or container (default: {DEFAULT_LISTEN})")
    p.add_argument("--query-delay", type=float, default=2.0, metavar="S",
                   help="evaluate data time t at wall time t + S so its scrapes have landed; raise it for "
                        "remote-write stores such as AMP (default: 2)")
    p.add_argument("--max-catchup", type=float, default=3600.0, metavar="S",
                   help="after a restart, evaluate the missed intervals of at most the last S seconds (default: 3600)")
    p.add_argument("--heartbeat-every", type=int, default=DEFAULT_HEARTBEAT_CYCLES, metavar="N",
                   help="log a status line (ranks, GPUs and NICs with data, open episodes, worst score) on the "
                        "first cycle and every N cycles after it; 0 turns it off "
                        f"(default: {DEFAULT_HEARTBEAT_CYCLES}, once a minute at the 15 s default interval)")
    p.set_defaults(func=run_detector)

    d = subparsers.add_parser(
        "detect", help="replay an OpenMetrics file or backtest a past range",
        description="Print the JSON-lines events the live detector would have raised, evaluating at the same "
                    "cadence: on a replay file (OpenMetrics with timestamps) or on a past range of a Prometheus.")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--replay", metavar="FILE", help="OpenMetrics text with timestamps (as promtool backfills)")
    src.add_argument("--prometheus", metavar="URL", help="backtest against this server (with --start/--end)")
    _add_connection(d, with_url=False)
    d.add_argument("--start", metavar="TIME", help="backtest start: RFC3339 or Unix seconds")
    d.add_argument("--end", metavar="TIME", help="backtest end: RFC3339 or Unix seconds")
    _add_common(d)
    d.add_argument("--state-dir", metavar="DIR",
                   help="directory for the notifiers' outbox (default: a temporary directory)")
    d.add_argument("--alert-state-dir", dest="state_dir", metavar="DIR", action=DeprecatedAlias, new="--state-dir")
    d.set_defaults(func=run_detect)


def parse_time(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected RFC3339 (2026-11-27T04:00:00Z) or Unix seconds") from None
    if dt.tzinfo is None:
        raise ConfigError(f"{what} {text!r}: give a time zone (e.g. Z) so the time is unambiguous")
    return dt.timestamp()


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


def connection_from_args(args: argparse.Namespace, url: str) -> Any:
    from rankwatch.detectors.prom_client import ENV_BASIC_PASSWORD, ENV_BEARER_TOKEN, PromConnection

    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {h!r}: expected 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    token_env = None
    if not args.bearer_token_file and not args.basic_auth_user and not args.sigv4_region \
            and os.environ.get(ENV_BEARER_TOKEN):
        token_env = ENV_BEARER_TOKEN
    return PromConnection(
        url=url, timeout_s=args.query_timeout, retries=args.query_retries,
        bearer_token_file=args.bearer_token_file, bearer_token_env=token_env,
        basic_user=args.basic_auth_user, basic_password_file=args.basic_auth_password_file,
        basic_password_env=ENV_BASIC_PASSWORD if args.basic_auth_user and not args.basic_auth_password_file else None,
        ca_file=args.ca_file, client_cert=args.client_cert, client_key=args.client_key,
        insecure_skip_verify=args.insecure_skip_verify, allow_redirects=args.allow_redirects,
        sigv4_region=args.sigv4_region,
        sigv4_service=args.sigv4_service, sigv4_profile=args.sigv4_profile, headers=headers)


def load_settings(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(DetectorConfig with command-line overrides, raw TOML dict for the alerting sinks)."""
    import dataclasses
    import tomllib

    from rankwatch.detectors.config import load_config

    config = load_config(args.config)
    raw: dict[str, Any] = {}
    if args.config:
        raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    overrides = {}
    for flag, key in (("interval", "interval_s"), ("window", "window_s")):
        v = getattr(args, flag)
        if v is not None:
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"--{flag}: must be a positive number of seconds, got {v!r}")
            overrides[key] = float(v)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config, raw


def explicit_settings(args: argparse.Namespace, raw: dict[str, Any]) -> frozenset[str]:
    """The cadence settings the user gave (command line or config file): only those get a
    warning when the data makes them too short."""
    table = raw.get("detector") if isinstance(raw.get("detector"), dict) else {}
    given = set()
    for flag, key in (("interval", "interval_s"), ("window", "window_s")):
        if getattr(args, flag, None) is not None or key in raw or key in table:
            given.add(key)
    return frozenset(given)


def build_sinks(raw: dict[str, Any], state_dir: Path, source: str, *, ephemeral: bool = False) -> list[Any]:
    """The alerting sink for the config's [slack]/[wandb]/[alertmanager]/... tables, if any.
    ``ephemeral``: ``state_dir`` is deleted at exit."""
    try:
        from rankwatch.alerts import build_sink
    except ImportError:
        return []
    sink = build_sink(raw, state_dir=state_dir, source=source, ephemeral=ephemeral)
    return [sink] if sink is not None else []


def event_writer(args: argparse.Namespace) -> Any:
    """stdout (JSON lines or ``--format text``, nothing with ``--quiet``) and ``--events-file``."""
    from rankwatch.detectors.console import text_renderer
    from rankwatch.detectors.service import EventWriter

    stream = None if args.quiet else sys.stdout
    render = text_renderer(stream) if args.format == "text" else None
    return EventWriter(stream, args.events_file, render=render)


def state_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(state directory, state database): ``--state-dir DIR`` holds DIR/detector.sqlite and the
    alerts' outbox; the deprecated ``--state-db FILE`` names the database, its directory the rest."""
    if args.state_db:
        db = Path(args.state_db)
        return (db.parent if str(db.parent) else Path(".")), db
    state_dir = Path(args.state_dir)
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"--state-dir {state_dir}: not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: cannot create it ({exc.strerror or exc})") from None
    return state_dir, state_dir / STATE_DB_FILE


def run_detector(args: argparse.Namespace) -> int:
    import signal
    import threading

    from rankwatch.detectors.cadence import Cadence
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.heartbeat import HeartbeatLog
    from rankwatch.detectors.metrics import DetectorMetrics, MetricsServer
    from rankwatch.detectors.prom_client import PromClient
    from rankwatch.detectors.service import DetectorService
    from rankwatch.detectors.source import PromSource
    from rankwatch.detectors.state import DetectorState

    if not args.prometheus:
        raise ConfigError(f"--prometheus URL is required (or set {ENV_URL})")
    if args.heartbeat_every < 0:
        raise ConfigError(f"--heartbeat-every: must be 0 (off) or a number of cycles, got {args.heartbeat_every}")
    config, raw = load_settings(args)
    conn = connection_from_args(args, args.prometheus)
    state_dir, state_db = state_paths(args)
    sinks = build_sinks(raw, state_dir, args.config or "<config>")
    metrics = DetectorMetrics(config.interval_s)
    server = MetricsServer(metrics, args.listen)
    state = DetectorState(state_db)
    source = PromSource(PromClient(conn), config.window_s, config.efa_error_counters)
    cadence = Cadence(config, source.sample_spacing, explicit_settings(args, raw))
    writer = event_writer(args)
    core = DetectorCore(config)
    service = DetectorService(source, core, interval_s=config.interval_s, writer=writer,
                              sinks=sinks, state=state, metrics=metrics, query_delay_s=args.query_delay,
                              max_catchup_s=args.max_catchup, on_cycle=HeartbeatLog(core, args.heartbeat_every),
                              cadence=cadence)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing the current cycle and shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("detector: %s every %gs or more (window %gs or more: both follow the data's sample spacing); "
             "/metrics and /healthz on port %d; state in %s",
             _redact(conn.url), config.interval_s, config.window_s, server.port, state_db)
    try:
        service.run(stop)
    finally:
        server.close()
        service.close()
        source.close()
    log.info("detector stopped")
    return 0


def run_detect(args: argparse.Namespace) -> int:
    import time

    from rankwatch.detectors.cadence import Cadence
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.coverage_log import CoverageLog
    from rankwatch.detectors.prom_client import PromClient
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import align_down, align_up, evaluate_range
    from rankwatch.detectors.source import PromSource

    config, raw = load_settings(args)
    if args.replay and (args.start or args.end):
        raise ConfigError("--start/--end go with --prometheus (a replay covers its whole file)")
    if args.prometheus and not (args.start and args.end):
        raise ConfigError("a backtest needs --start and --end")
    with tempfile.TemporaryDirectory(prefix="rankwatch-detect-") as tmp:
        state_dir = Path(args.state_dir) if args.state_dir else Path(tmp)
        sinks = build_sinks(raw, state_dir, args.config or "<config>", ephemeral=not args.state_dir)
        writer = event_writer(args)
        dataset = None
        try:
            if args.replay:
                dataset = ReplayDataset(args.replay)
                dataset.open()
                conn = connection_from_args(args, dataset.url)
                t_min, t_max = dataset.min_time, dataset.max_time
                log.info("replay %s: %d samples from %.0f to %.0f; backfill %.2fs, Prometheus start-up %.2fs",
                         args.replay, dataset.samples, t_min, t_max, dataset.timings["backfill_s"],
                         dataset.timings["startup_s"])
            else:
                conn = connection_from_args(args, args.prometheus)
                t_min, t_max = parse_time(args.start, "--start"), parse_time(args.end, "--end")
                if t_max <= t_min:
                    raise ConfigError(f"--end must be after --start ({args.start} .. {args.end})")
            source = PromSource(PromClient(conn), config.window_s, config.efa_error_counters)
            began = time.perf_counter()
            try:
                # the whole range is known up front: learn its sample spacing once, then evaluate
                # on the grid the live loop would have used for the same data
                cadence = Cadence(config, explicit=explicit_settings(args, raw))
                cadence.fix(source.sample_spacing_range(t_min, t_max))
                plan = cadence.plan
                source.set_windows(plan.window_s, plan.node_window_s)
                interval = plan.interval_s
                # from the first evaluation whose windows the data covers (before it, every rank would
                # count as a rank without data)
                start = align_up(t_min + max(plan.window_s, plan.node_window_s), interval)
                end = align_down(t_max, interval)
                res = evaluate_range(source.snapshots(start, end, interval), DetectorCore(config), writer=writer,
                                     sinks=sinks, coverage_log=CoverageLog(), cadence=cadence) if end >= start else None
            finally:
                source.close()
            took = time.perf_counter() - began
            if res is None or res.evaluations == 0:
                log.warning("no evaluation time in %.0f..%.0f (interval %gs)", t_min, t_max, interval)
            else:
                log.info("%d evaluations from %.0f to %.0f (every %gs) in %.2fs: %d events", res.evaluations,
                         res.first, res.last, interval, took, res.events)
        finally:
            if dataset is not None:
                dataset.close()
            writer.close()
            for sink in sinks:
                try:
                    sink.close()
                except Exception:
                    log.exception("closing event sink failed")
    return 0
