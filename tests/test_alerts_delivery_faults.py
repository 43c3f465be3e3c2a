"""Delivery faults found by hostile trials: a slow Slack, Retry-After across `alerts flush` runs,
an Alertmanager that refuses an alert for good, a W&B directory that cannot be written, and
`alerts flush` with nothing to deliver through. Real slack_sdk against the local Slack server,
W&B offline; every wait is on recorded data (requests, outbox rows), never on a clock."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.alerts.wandb_notifier import offline_alerts
from rankwatch.cli import main
from rankwatch.events import Event
from rankwatch.sim.slack import SlackServer

T0 = 1_790_000_000.0


def ev(rank: int, state: str = "firing", t: float = T0, run: str = "r1") -> Event:
    return Event(time=t, kind="straggler", state=state, run=run, rank=rank, node=f"node-{rank // 8:03d}",
                 gpu=str(rank % 8), score=7.5, summary=f"Rank {rank} computes 20 % slower than its peers.",
                 evidence={"slowdown": 0.2}, episode=f"{run}/straggler/{rank}", since=t - 30)


def slack_doc(server: SlackServer, **notify: Any) -> dict[str, Any]:
    return {"slack": {"channel": server.channel, "api_url": server.api_url, "max_retries": 0, "timeout_s": 1,
                      "chart": False},
            "notify": {"group_wait_s": 0, "min_interval_s": 0, "retry_interval_s": 0.2, "retry_max_backoff_s": 0.5,
                       "close_timeout_s": 0, **notify}}


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    lines = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def posts(server: SlackServer) -> list[Any]:
    return server.calls("chat.postMessage", ok_only=False)


# -- a slow Slack: a timed-out post is "maybe delivered" --------------------------------------

def test_slow_slack_gets_each_message_once(tmp_path: Path, slack: SlackServer) -> None:
    """Slack posts the message but answers after the client's timeout. Before: the flush posted
    again after each backoff (and close() once more), so the channel got copies."""
    sink = AlertSink(load_alerting_config(slack_doc(slack), environ={"SLACK_BOT_TOKEN": slack.token}),
                     state_dir=tmp_path / "state", start_thread=False)
    slack.hold(lambda path: path.endswith("chat.postMessage"))
    sink.publish([ev(3)])
    assert sink.flush(timeout=120) == 0  # returns as soon as the outbox says delivered
    [msg] = slack.top_level_messages()
    assert len(posts(slack)) == 1 and len(slack.calls("conversations.history")) == 1
    [row] = sink.outbox.rows(status="delivered")
    assert row.result["ts"] == msg.ts and row.result.get("recovered") is True
    slack.release()

    # The resolved reply in the thread, slow too: found in the thread, not posted twice.
    slack.hold(lambda path: path.endswith("chat.postMessage"))
    sink.publish([ev(3, "resolved", T0 + 600)])
    assert sink.flush(timeout=120) == 0
    assert len(slack.thread(msg.ts)) == 1 and len(slack.calls("conversations.replies")) == 1
    slack.release()
    sink.close()
    assert len(slack.top_level_messages()) == 1 and len(posts(slack)) == 2


def test_slow_slack_through_two_flush_commands(tmp_path: Path, slack: SlackServer,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial as run: `alerts flush` with timeout_s = 1 and a Slack answering after it, then
    another `alerts flush`: one message in the channel."""
    doc = slack_doc(slack, retry_interval_s=60, retry_max_backoff_s=60)
    cfg = write_toml(tmp_path / "rankwatch.toml", doc)
    state = tmp_path / "state"
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=state,
                     start_thread=False)
    sink.publish([ev(4)])
    sink.close()  # close_timeout_s = 0: the row stays pending, never tried
    monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
    slack.hold(lambda path: path.endswith("chat.postMessage"))
    assert main(["alerts", "flush", "--config", str(cfg), "--state-dir", str(state), "--timeout", "5"]) == 1
    assert len(posts(slack)) == 1, "close() after the flush must not post again while the row backs off"
    slack.release()
    db = sqlite3.connect(state / "alerts.sqlite")
    db.execute("UPDATE outbox SET not_before=0")  # the 60 s backoff has passed
    db.commit()
    db.close()
    assert main(["alerts", "flush", "--config", str(cfg), "--state-dir", str(state), "--timeout", "30"]) == 0
    assert len(slack.top_level_messages()) == 1 and len(posts(slack)) == 1
    capsys.readouterr()


def test_token_that_cannot_read_history_posts_again_rather_than_never(tmp_path: Path, slack: SlackServer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # Without the channels:history scope the lookup can never answer: at least once, said so.
    sink = AlertSink(load_alerting_config(slack_doc(slack), environ={"SLACK_BOT_TOKEN": slack.token}),
                     state_dir=tmp_path / "state", start_thread=False)
    slack.hold(lambda path: path.endswith("chat.postMessage"))
    sink.publish([ev(9)])
    sink.deliver_due()
    assert sink.outbox.rows()[0].unsure
    slack.release()
    slack.fail_next(1, 200, error="missing_scope", match=lambda path: path.endswith("conversations.history"))
    caplog.set_level(logging.WARNING, logger="rankwatch.alerts")
    assert sink.flush(timeout=60) == 0
    sink.close()
    assert len(posts(slack)) == 2
    assert any("missing_scope" in r.getMessage() and "may post it twice" in r.getMessage() for r in caplog.records)


def test_retry_after_holds_across_flush_and_close(tmp_path: Path, slack: SlackServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """release_held() (run by every close and at the start of `alerts flush`) used to reset
    not_before of rows backing off, overriding Retry-After."""
    doc = slack_doc(slack)
    cfg = write_toml(tmp_path / "rankwatch.toml", doc)
    state = tmp_path / "state"
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=state,
                     start_thread=False)
    sink.publish([ev(5)])
    sink.close()
    monkeypatch.setenv("SLACK_BOT_TOKEN", slack.token)
    slack.fail_next(1, 429, retry_after=3600, match=lambda path: path.endswith("chat.postMessage"))
    before = time.time()
    for _ in range(2):
        assert main(["alerts", "flush", "--config", str(cfg), "--state-dir", str(state), "--timeout", "2"]) == 1
    assert len(posts(slack)) == 1 and not slack.messages
    db = sqlite3.connect(state / "alerts.sqlite")
    [(status, not_before, attempts)] = db.execute("SELECT status, not_before, attempts FROM outbox").fetchall()
    assert status == "pending" and attempts == 1 and not_before >= before + 3600


# -- Alertmanager: a permanent refusal is reported once and blocks nothing ----------------------

class _RefusingAlertmanager:
    """Alertmanager's v2 alerts endpoint, refusing alerts of one rank with 400 the way
    Alertmanager does for an invalid alert; every other post is accepted and recorded. (A real
    Alertmanager cannot be made to refuse what the notifier sends: its labels are valid.)"""

    def __init__(self, refuse_rank: str) -> None:
        self.refuse_rank = refuse_rank
        self.posts: list[tuple[int, list[dict[str, Any]]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                alerts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bad = [a for a in alerts if a["labels"].get("rank") == outer.refuse_rank]
                status = 400 if bad else 200
                body = b'{"code":400,"message":"invalid label set: label rank has an unsupported value"}' if bad else b""
                outer.posts.append((status, alerts))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_alertmanager_400_is_reported_once_and_does_not_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    am = _RefusingAlertmanager(refuse_rank="7")
    try:
        doc = {"alertmanager": {"url": am.url, "resend_interval_s": 3600},
               "notify": {"retry_interval_s": 0.2, "retry_max_backoff_s": 0.5, "close_timeout_s": 0}}
        sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=tmp_path, start_thread=False)
        caplog.set_level(logging.INFO, logger="rankwatch.alerts")
        sink.publish([ev(7), ev(8)])
        assert sink.flush(timeout=60) == 0
        sink.publish([ev(7, "resolved", T0 + 300), ev(8, "resolved", T0 + 300)])
        assert sink.flush(timeout=60) == 0
        statuses = {(r.episode.rsplit("/", 1)[1], r.action): r.status for r in sink.outbox.rows()}
        sink.close()
    finally:
        am.close()
    assert statuses == {("7", "firing"): "failed", ("7", "resolved"): "failed",
                        ("8", "firing"): "delivered", ("8", "resolved"): "delivered"}
    # Each refused notification was posted once, and said so once with Alertmanager's text.
    refused = [alerts for status, alerts in am.posts if status == 400]
    assert len(refused) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("unsupported value" in e and "HTTP 400" in e for e in errors)
    assert any(a[0]["labels"]["rank"] == "8" and a[0]["endsAt"] for s, a in am.posts if s == 200)


# -- W&B: the configured directory, or pending -------------------------------------------------

def _immutable(path: Path, on: bool) -> bool:
    res = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return res.returncode == 0


def test_unwritable_wandb_directory_keeps_the_alert_pending(tmp_path: Path) -> None:
    """wandb silently fell back to the system temp directory and the alert was marked delivered
    although nothing was where the docs say. An immutable directory is unwritable even for root
    (and os.access, which wandb checks, says so)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr not installed")
    state = tmp_path / "state"
    wdir = state / "wandb"
    wdir.mkdir(parents=True)
    if not _immutable(wdir, True):
        pytest.skip(f"this filesystem cannot make {wdir} immutable")
    try:
        doc = {"wandb": {"project": "llama", "mode": "offline", "log_scores": False},
               "notify": {"group_wait_s": 0, "retry_interval_s": 0.2, "close_timeout_s": 0}}
        sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=state, start_thread=False)
        sink.publish([ev(2)])
        sink.deliver_due()
        [row] = sink.outbox.rows()
        assert row.status == "pending" and f"W&B directory {wdir} is not writable" in (row.last_error or "")
    finally:
        _immutable(wdir, False)
    assert sink.flush(timeout=120) == 0
    sink.close()
    [alert] = offline_alerts(wdir)
    assert alert["title"].startswith("#1 Straggler: rank 2")


# -- `alerts flush` that cannot deliver, and an outbox that will not survive -------------------

def test_flush_without_a_token_says_nothing_can_be_delivered(tmp_path: Path, slack: SlackServer,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    doc = slack_doc(slack)
    cfg = write_toml(tmp_path / "rankwatch.toml", doc)
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=tmp_path / "s",
                     start_thread=False)
    sink.publish([ev(6)])
    sink.close()
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    code = main(["alerts", "flush", "--config", str(cfg), "--state-dir", str(tmp_path / "s")])
    out, err = capsys.readouterr()
    assert code != 0
    assert "1 pending slack notification(s) cannot be delivered" in err and "SLACK_BOT_TOKEN" in err
    assert json.loads(out) == {"pending": 1}


def test_temporary_state_directory_says_dropped_not_left(tmp_path: Path, slack: SlackServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # `rankwatch detect` without an alert state directory uses a temporary one.
    slack.fail_always(500)
    sink = AlertSink(load_alerting_config(slack_doc(slack), environ={"SLACK_BOT_TOKEN": slack.token}),
                     state_dir=tmp_path / "tmp-state", start_thread=False, ephemeral=True)
    sink.publish([ev(1)])
    caplog.set_level(logging.WARNING, logger="rankwatch.alerts")
    sink.close()
    [msg] = [r.getMessage() for r in caplog.records if "notification(s)" in r.getMessage()]
    assert "dropped" in msg and "temporary directory" in msg and "next start" not in msg
