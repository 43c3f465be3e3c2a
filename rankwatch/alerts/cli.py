"""`rankwatch alerts …`: preview a notification, send a test alert, deliver or inspect the outbox."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("alerts", help="Slack / W&B / Alertmanager notifications and their outbox")
    sub = p.add_subparsers(dest="alerts_command", metavar="ACTION")

    pv = sub.add_parser("preview", help="print the Slack Block Kit JSON and plain text of an event")
    pv.add_argument("--event", type=Path, metavar="FILE",
                    help="a JSON-lines file of detector events, grouped into incidents as the live path does "
                         "(default: a sample straggler)")
    pv.add_argument("--config", type=Path, metavar="FILE",
                    help="detector TOML whose [links] and [notify] tables shape the message (default: no links, "
                         "default grouping)")
    pv.add_argument("--format", choices=["both", "blocks", "text"], default="both",
                    help="Block Kit JSON and plain text, only the JSON (one object per incident and line), or only "
                         "the text (default: both)")
    pv.set_defaults(func=_preview)

    t = sub.add_parser("send-test", help="send a sample firing + resolved alert through every configured target")
    t.add_argument("--config", type=Path, required=True, metavar="FILE",
                   help="detector TOML config ([slack], [wandb], [alertmanager])")
    t.add_argument("--run", default="rankwatch-test", help="run label of the sample event (default: rankwatch-test)")
    t.set_defaults(func=_send_test)

    f = sub.add_parser("flush", help="deliver what is pending in a detector's outbox, then exit")
    f.add_argument("--config", type=Path, required=True, metavar="FILE",
                   help="detector TOML config ([slack], [wandb], [alertmanager])")
    f.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="the detector's --state-dir")
    f.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up after this many seconds, leaving the rest queued (default: 60)")
    f.set_defaults(func=_flush)

    o = sub.add_parser("outbox", help="list the notifications in a detector's outbox")
    o.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="the detector's --state-dir")
    o.add_argument("--status", choices=["pending", "sending", "delivered", "skipped", "failed"],
                   help="list only the notifications in this state; failed: refused by the target for good "
                        "(default: all)")
    o.set_defaults(func=_outbox)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _load_toml(path: Path) -> dict[str, Any]:
    import tomllib

    from rankwatch.errors import ConfigError

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def sample_events(run: str = "llama70b-cpt", t0: float | None = None) -> list[Any]:
    """A straggler episode (firing and resolved) as the detector reports it."""
    from rankwatch.events import Event

    t0 = float(int(t0 if t0 is not None else time.time()))
    # The keys the detector's straggler evidence carries.
    evidence = {"cause": "compute", "compute_s": 1.452, "peer_compute_s": 1.2, "compute_slowdown": 0.21,
                "comm_wait_s": 0.08, "peer_comm_wait_s": 0.33, "step_s": 1.61, "est_job_speedup": 0.16,
                "peer_group": f"{run}|pp=2", "peer_group_size": 64,
                "explanation": ["its GPU 3 is thermally throttled (SM clock 1410 MHz, -28 %; hw_thermal)"]}
    firing = Event(time=t0, kind="straggler", state="firing", run=run, rank=37, node="p5-012", gpu="3", score=8.4,
                   summary="Rank 37 spends 21 % more time computing per step than its 63 peers in pipeline stage 2; "
                           "its GPU 3 is thermally throttled (SM clock −28 %).",
                   evidence=evidence, episode=f"{run}/straggler/37/{int(t0)}", severity="warning", since=t0 - 45)
    resolved = Event(**{**firing.__dict__, "state": "resolved", "time": t0 + 720,
                        "summary": "Rank 37 is back within 2 % of its peers."})
    return [firing, resolved]


def read_events(path: Path) -> list[Any]:
    """The events of a JSON-lines file (as the detector writes them); an error names the line."""
    from rankwatch.errors import InputError
    from rankwatch.events import Event

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (expected JSON lines of detector events)") from None
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            events.append(Event.from_dict(data))
        except (ValueError, TypeError) as exc:
            raise InputError(f"{path}:{n}: not a detector event ({exc})") from None
    return events


class _PreviewTarget:
    """A per-incident target that wants everything: what Slack gets."""

    name = "preview"
    per_episode = False

    def wants(self, action: str) -> bool:
        return True


def preview_incidents(events: list[Any], notify: Any) -> list[Any]:
    """The incidents the live path would make of ``events``: the same lifecycle (grouping per
    run within ``notify.group_window_s``, duplicates dropped, resolved episodes marked) on an
    outbox in memory."""
    from rankwatch.alerts.lifecycle import Lifecycle
    from rankwatch.alerts.outbox import Outbox

    outbox = Outbox(":memory:")
    try:
        lc = Lifecycle(outbox, [_PreviewTarget()], notify, clock=time.time)
        lc.ingest(events)
        return [lc.incident(int(r["id"])) for r in outbox.query("SELECT id FROM incidents ORDER BY id")]
    finally:
        outbox.close()


def _preview(args: argparse.Namespace) -> int:
    from rankwatch.alerts.config import load_alerting_config
    from rankwatch.alerts.render import render_incident, render_plain

    # Only what shapes the message: links and grouping. Targets and their secrets are not needed.
    doc = _load_toml(args.config) if args.config else {}
    doc = {k: v for k, v in doc.items() if k in ("links", "notify")}
    cfg = load_alerting_config(doc, source=str(args.config or "<defaults>"), environ={})
    events = read_events(args.event) if args.event else sample_events(t0=1795750000)[:1]
    incidents = preview_incidents(events, cfg.notify)
    if not incidents:
        print(f"rankwatch: no firing event in {args.event} that the alerts would report "
              f"(kinds {', '.join(cfg.notify.kinds)}, severity {cfg.notify.min_severity} or more)", file=sys.stderr)
        return 2
    for n, view in enumerate(incidents, 1):
        action = "resolved" if view.state == "resolved" else "firing"
        now = max(e.current.time for e in view.episodes)
        if args.format == "blocks":  # one JSON object per incident and line, for machines
            msg = render_incident(view, action, cfg.links, now=now)
            print(json.dumps({"text": msg.text, "blocks": msg.blocks}, ensure_ascii=False))
            continue
        if len(incidents) > 1:
            print(f"── incident {n} of {len(incidents)} · run {view.run or '(no run label)'} · {view.state} · "
                  f"{len(view.active)} of {len(view.episodes)} episodes firing ──")
        if args.format == "both":
            msg = render_incident(view, action, cfg.links, now=now)
            print(json.dumps({"text": msg.text, "blocks": msg.blocks}, indent=2, ensure_ascii=False))
        print(render_plain(view, action, cfg.links, now=now))
    return 0


def _send_test(args: argparse.Namespace) -> int:
    from rankwatch.alerts import AlertSink, load_alerting_config
    from rankwatch.secrets import redact

    cfg = load_alerting_config(_load_toml(args.config), source=str(args.config))
    if not cfg.any_target:
        print("rankwatch: no target configured (set SLACK_WEBHOOK_URL / SLACK_BOT_TOKEN, [wandb] or [alertmanager])",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rankwatch-alerts-test-") as tmp:
        sink = AlertSink(cfg, state_dir=Path(tmp), start_thread=False, require_outbox=True, ephemeral=True)
        assert sink.outbox is not None and sink.lifecycle is not None
        try:
            for event in sample_events(args.run):
                sink.publish([event])
                sink.lifecycle.release_held()
                # One attempt per notification (plus the clients' own retries): report, don't wait
                # for backoffs; only the rate limiter's short waits are waited out.
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    sink.deliver_due()
                    assert sink.outbox is not None
                    pending = sink.outbox.rows(status="pending")
                    if not pending or any(r.last_error for r in pending):
                        break
                    time.sleep(0.2)
                if sink.outbox.rows(status="pending"):
                    break
            rows = sink.outbox.rows()
        finally:
            sink.cfg = replace(sink.cfg, notify=replace(sink.cfg.notify, close_timeout_s=0))
            sink.close()
    for r in rows:
        state = "ok" if r.status in ("delivered", "skipped") else f"FAILED: {redact(r.last_error or r.status)}"
        print(f"{r.target:13s} {r.action:9s} {state}")
    return 0 if rows and all(r.status in ("delivered", "skipped") for r in rows) else 1


def _flush(args: argparse.Namespace) -> int:
    from rankwatch.alerts import OUTBOX_FILE, AlertSink, load_alerting_config
    from rankwatch.alerts.outbox import OutboxUnavailable
    from rankwatch.errors import InputError, RankwatchError

    cfg = load_alerting_config(_load_toml(args.config), source=str(args.config))
    if not (args.state_dir / OUTBOX_FILE).exists():
        raise InputError(f"{args.state_dir / OUTBOX_FILE}: no outbox here (is --state-dir the detector's state directory?)")
    try:
        sink = AlertSink(cfg, state_dir=args.state_dir, start_thread=False, require_outbox=True)
    except OutboxUnavailable as exc:
        raise RankwatchError(f"cannot open the outbox: {exc}") from None
    assert sink.outbox is not None and sink.lifecycle is not None
    # Rows for a target that is not configured here can never be sent by this command: say so.
    stuck = {r.target: 0 for r in sink.outbox.rows(status="pending") if r.target not in sink.targets}
    for r in sink.outbox.rows(status="pending"):
        if r.target in stuck:
            stuck[r.target] += 1
    for target, n in sorted(stuck.items()):
        print(f"rankwatch: {n} pending {target} notification(s) cannot be delivered: {_not_configured(target)}",
              file=sys.stderr)
    if not sink.targets and not stuck:
        print("rankwatch: no notification target is configured (set SLACK_BOT_TOKEN / SLACK_WEBHOOK_URL, "
              "[wandb] or [alertmanager]): nothing can be delivered", file=sys.stderr)
    try:
        sink.lifecycle.release_held()
        left = sink.flush(timeout=args.timeout) if sink.targets else sink.outbox.counts().get("pending", 0)
        counts = sink.outbox.counts()
    except sqlite3.OperationalError as exc:  # another process took the lock meanwhile
        raise RankwatchError(f"{sink.outbox.path}: {exc}; nothing more delivered") from None
    finally:
        sink.close()
    print(json.dumps(counts, sort_keys=True))
    if not sink.targets:
        return 2
    return 1 if left or stuck else 0


def _not_configured(target: str) -> str:
    return {
        "slack": "Slack is not configured here (no SLACK_BOT_TOKEN / SLACK_WEBHOOK_URL in the environment, "
                 "no [slack] bot_token_file / webhook_url_file in the config)",
        "wandb": "there is no [wandb] table in the config",
        "alertmanager": "there is no [alertmanager] table in the config",
    }.get(target, f"{target} is not configured")


def _outbox(args: argparse.Namespace) -> int:
    from rankwatch.alerts import OUTBOX_FILE
    from rankwatch.alerts.outbox import Outbox, OutboxUnavailable
    from rankwatch.errors import InputError

    path = args.state_dir / OUTBOX_FILE
    if not path.exists():
        raise InputError(f"{path}: no outbox here (is --state-dir the detector's state directory?)")
    try:
        ob = Outbox(path)
    except OutboxUnavailable as exc:
        raise InputError(f"cannot open the outbox: {exc}") from None
    for r in ob.rows(status=args.status):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.delivered_wall or r.created_wall))
        print(f"{r.id:6d} {when} {r.status:9s} {r.target:13s} {r.action:9s} attempts={r.attempts} {r.key}"
              + (f"  last_error={r.last_error}" if r.last_error and r.status != "delivered" else "")
              + ("  (may have arrived: checked before the next attempt)" if r.unsure and r.status == "pending" else ""))
    ob.close()
    return 0
