"""Slack delivery and the alert lifecycle, with the real slack_sdk clients talking to the local
Slack API server (rankwatch.sim.slack)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from conftest import SilentServer, wait_until
from slack_sdk.models.blocks import Block

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.alerts.lifecycle import EpisodeView, IncidentView
from rankwatch.alerts.render import render_incident
from rankwatch.events import Event
from rankwatch.sim.slack import SlackServer

T0 = 1_790_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def ev(rank: int | None, state: str = "firing", t: float = T0, run: str = "r1", kind: str = "straggler",
       severity: str = "warning", **kw: Any) -> Event:
    evidence = kw.pop("evidence", {"slowdown": 0.2, "compute_seconds": 1.2, "peer_median_seconds": 1.0})
    return Event(time=t, kind=kind, state=state, run=run, rank=rank, node=f"node-{(rank or 0) // 8:03d}",
                 gpu=str((rank or 0) % 8), score=7.5, summary=f"Rank {rank} computes 20 % slower than its peers.",
                 evidence=evidence, episode=kw.pop("episode", f"{run}/{kind}/{rank}"), severity=severity,
                 since=t - 30, **kw)


def make_sink(tmp_path: Path, server: SlackServer, *, mode: str = "bot", clock: Any = time.time,
              notify: dict[str, Any] | None = None, thread: bool = False, slack: dict[str, Any] | None = None) -> AlertSink:
    doc = {
        "slack": {"channel": server.channel, "api_url": server.api_url, "max_retries": 2, "timeout_s": 5,
                  **(slack or {})},
        "notify": {"group_wait_s": 0, "min_interval_s": 0, "retry_interval_s": 0.2, "retry_max_backoff_s": 0.5,
                   "close_timeout_s": 2, **(notify or {})},
        "links": {"grafana_url": "https://grafana.example/d/rw?var-node={node}&from={from_ms}&to={to_ms}",
                  "wandb_run_url": "https://wandb.ai/acme/proj/groups/{run}"},
    }
    env = {"SLACK_BOT_TOKEN": server.token} if mode == "bot" else {"SLACK_WEBHOOK_URL": server.webhook_url}
    cfg = load_alerting_config(doc, environ=env)
    return AlertSink(cfg, state_dir=tmp_path / "state", clock=clock, start_thread=thread)


def header(msg: Any) -> str:
    return msg.blocks[0]["text"]["text"]


def block_text(msg: Any) -> str:
    """Every text of a message's sections (text and fields), newline-joined."""
    out = []
    for b in msg.blocks:
        if b["type"] == "section":
            if b.get("text"):
                out.append(b["text"]["text"])
            out += [f["text"] for f in b.get("fields", [])]
    return "\n".join(out)


def test_bot_firing_then_resolved_edits_the_same_message_and_replies_in_thread(tmp_path: Path, slack: SlackServer) -> None:
    series = {"t": [T0 - 600 + 15 * i for i in range(40)], "culprit": [1.0] * 20 + [1.2] * 20,
              "peer_median": [1.0] * 40, "peer_p10": [0.98] * 40, "peer_p90": [1.02] * 40}
    sink = make_sink(tmp_path, slack)
    firing = ev(37, evidence={"slowdown": 0.2, "compute_series": series})
    sink.publish([firing])
    assert sink.flush(timeout=60) == 0

    [msg] = slack.top_level_messages()
    assert "rank 37" in header(msg) and "node-004" in header(msg)
    assert msg.text.startswith("[WARNING] Straggler: rank 37")
    fields = " ".join(f["text"] for b in msg.blocks if b["type"] == "section" for f in b.get("fields", []))
    assert "+20 % vs peers" in fields and "*Run*\nr1" in fields
    buttons = [e["url"] for b in msg.blocks if b["type"] == "actions" for e in b["elements"]]
    assert "https://grafana.example/d/rw?var-node=node-004" in buttons[0]
    # The chart: uploaded with files_upload_v2's three calls, a PNG, in the alert's thread.
    assert [r.api_method for r in slack.calls() if r.api_method and r.api_method.startswith("files.")] == [
        "files.getUploadURLExternal", "files.completeUploadExternal"]
    [upload] = slack.uploads.values()
    assert upload["data"][:8] == b"\x89PNG\r\n\x1a\n" and upload["thread_ts"] == msg.ts

    sink.publish([ev(37, state="resolved", t=T0 + 600)])
    assert sink.flush(timeout=60) == 0
    [msg] = slack.top_level_messages()
    assert len(msg.edits) == 1 and header(msg).startswith(":white_check_mark: Resolved")
    [reply] = slack.thread(msg.ts)
    assert "Resolved after 10 min" in reply.text

    # The detector repeating itself (or a replay after a restart) changes nothing.
    before = len(slack.calls())
    sink.publish([firing, ev(37, state="resolved", t=T0 + 600)])
    sink.flush(timeout=60)
    assert len(slack.calls()) == before
    sink.close()


def test_forty_ranks_behind_one_switch_make_one_message(tmp_path: Path, slack: SlackServer) -> None:
    clock = FakeClock()
    sink = make_sink(tmp_path, slack, clock=clock, notify={"group_wait_s": 30, "group_window_s": 300})
    sink.publish([ev(r, t=T0) for r in range(25)])
    clock.now += 10
    sink.publish([ev(r, t=T0 + 15) for r in range(25, 40)])  # decided one cycle later
    sink.publish([ev(3, run="r2", kind="gpu_fault", severity="critical", t=T0 + 15)])  # another run
    assert sink.deliver_due() == 0  # held by group_wait
    clock.now += 31
    assert sink.deliver_due() == 2
    msgs = slack.top_level_messages()
    assert len(msgs) == 2
    big = next(m for m in msgs if "r1" in m.text)
    assert "40 ranks on 5 nodes" in header(big)
    assert "*Affected ranks*\n0–39" in block_text(big)
    assert "Failing GPU: rank 3" in header(next(m for m in msgs if "r2" in m.text))

    # A new problem on run r1 long after the first one started is a new incident.
    sink.publish([ev(50, t=T0 + 900)])
    clock.now += 31
    sink.deliver_due()
    assert len(slack.top_level_messages()) == 3

    # All 40 recover: one edit and one thread reply, not 40.
    sink.publish([ev(r, state="resolved", t=T0 + 1200) for r in range(40)])
    sink.deliver_due()
    big = next(m for m in slack.top_level_messages() if m.ts == big.ts)
    assert len(big.edits) == 1 and "Resolved" in header(big)
    assert len(slack.thread(big.ts)) == 1
    sink.close()


def test_partial_recovery_updates_the_message(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack)
    sink.publish([ev(1), ev(2)])
    sink.flush(timeout=60)
    sink.publish([ev(1, state="resolved", t=T0 + 60)])
    sink.flush(timeout=60)
    [msg] = slack.top_level_messages()
    assert "*Still firing*\n1 of 2" in block_text(msg) and not slack.thread(msg.ts)
    sink.close()


def test_rate_limited_429_is_retried_after_retry_after(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack, mode="webhook")
    slack.fail_next(1, status=429, retry_after=1)
    start = time.monotonic()
    sink.publish([ev(5)])
    assert sink.flush(timeout=60) == 0
    assert time.monotonic() - start >= 1.0  # slack_sdk's RateLimitErrorRetryHandler waited
    statuses = [r.status for r in slack.calls("webhook", ok_only=False)]
    assert statuses == [429, 200]
    assert len(slack.top_level_messages()) == 1
    sink.close()


def test_server_errors_are_retried_by_the_client(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack)
    slack.fail_next(2, status=500, match=lambda p: p.endswith("chat.postMessage"))
    sink.publish([ev(5)])
    assert sink.flush(timeout=60) == 0
    assert [r.status for r in slack.calls("chat.postMessage", ok_only=False)] == [500, 500, 200]
    assert len(slack.top_level_messages()) == 1
    sink.close()


def test_webhook_error_answers_are_checked_and_kept_in_the_outbox(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack, mode="webhook")
    slack.fail_next(3, status=404)  # e.g. a revoked webhook ("no_service")
    sink.publish([ev(5)])
    sink.deliver_due()
    [row] = sink.outbox.rows()
    assert row.status == "pending" and "HTTP 404" in (row.last_error or "")
    assert "sim-webhook-secret" not in (row.last_error or "")
    time.sleep(0.25)
    sink.flush(timeout=60)
    assert sink.outbox.rows()[0].status == "delivered"
    assert len(slack.top_level_messages()) == 1
    sink.close()


def test_outage_survives_restart_and_is_delivered_once(tmp_path: Path, slack: SlackServer) -> None:
    slack.fail_always(500)
    sink = make_sink(tmp_path, slack, slack={"max_retries": 1})
    sink.publish([ev(9)])
    sink.close()  # gives up after close_timeout_s, leaving the row pending
    assert slack.calls("chat.postMessage", ok_only=False) and not slack.messages
    slack.heal()
    for _ in range(2):  # the first restart delivers, the second finds nothing to do
        sink = make_sink(tmp_path, slack)
        sink.flush(timeout=60)
        sink.close()
    assert len(slack.top_level_messages()) == 1


def test_crash_between_post_and_commit_does_not_post_twice(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack)
    sink.publish([ev(11)])
    sink.flush(timeout=60)
    sink.close()
    # What a kill -9 right after Slack's 200 and before the commit leaves behind:
    db = sqlite3.connect(tmp_path / "state" / "alerts.sqlite")
    db.execute("UPDATE outbox SET status='sending', result=NULL WHERE action='firing'")
    db.commit()
    db.close()
    sink = make_sink(tmp_path, slack)  # looks the key up in the channel history (message metadata)
    sink.publish([ev(11, state="resolved", t=T0 + 300)])
    sink.flush(timeout=60)
    sink.close()
    [msg] = slack.top_level_messages()
    assert len(msg.edits) == 1 and "Resolved" in header(msg)
    assert len(slack.calls("conversations.history")) == 1


def test_rate_limit_defers_and_never_drops(tmp_path: Path, slack: SlackServer) -> None:
    clock = FakeClock()
    sink = make_sink(tmp_path, slack, clock=clock, notify={"max_per_minute": 2})
    sink.publish([ev(1, run="a"), ev(1, run="b"), ev(1, run="c")])
    assert sink.deliver_due() == 2
    clock.now += 30
    assert sink.deliver_due() == 0
    clock.now += 31
    assert sink.deliver_due() == 1
    assert len(slack.top_level_messages()) == 3
    sink.close()


def test_long_incident_is_renotified_in_its_thread(tmp_path: Path, slack: SlackServer) -> None:
    clock = FakeClock()
    sink = make_sink(tmp_path, slack, clock=clock, notify={"renotify_interval_s": 3600})
    sink.publish([ev(2)])
    sink.deliver_due()
    [msg] = slack.top_level_messages()
    clock.now += 1800
    sink.deliver_due()
    assert slack.thread(msg.ts) == []
    clock.now += 1801
    sink.deliver_due()
    [reminder] = slack.thread(msg.ts)
    assert "Still firing" in reminder.text
    assert slack.calls("chat.postMessage")[-1].params.get("reply_broadcast") is True
    sink.publish([ev(2, state="resolved", t=T0 + 4000)])
    clock.now += 7200
    sink.deliver_due()
    assert [m.text.split(" ")[0] for m in slack.thread(msg.ts)] == [":repeat:", ":white_check_mark:"]
    sink.close()


def test_publish_never_blocks_or_raises_when_slack_hangs(tmp_path: Path, silent_server: SilentServer) -> None:
    # Slack accepts and never answers, for far longer than the test runs: a publish that waited
    # for Slack would never return. Delivery happens on the sink's own thread, one request at a time.
    doc = {"slack": {"channel": "C1", "api_url": silent_server.url + "/api/", "max_retries": 0, "timeout_s": 3600},
           "notify": {"group_wait_s": 0, "close_timeout_s": 0, "retry_interval_s": 0.1}}
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": "xoxb-x"}), state_dir=tmp_path)
    published = threading.Event()

    def publish_all() -> None:
        for i in range(20):
            sink.publish([ev(i, run=f"run{i}")])  # 20 incidents, each a Slack message to send
        published.set()

    threading.Thread(target=publish_all, daemon=True).start()
    wait_until(published.is_set, "20 publishes while Slack hangs")
    wait_until(lambda: silent_server.accepted >= 1, "the delivery thread's request to the hanging Slack")
    assert silent_server.accepted == 1  # the one request in flight; no publish sent anything itself
    silent_server.close()  # the hanging request fails now: close() need not wait for it
    sink.close()
    rows = [r[0] for r in sqlite3.connect(sink.outbox.path).execute("SELECT status FROM outbox")]
    assert rows == ["pending"] * 20  # kept for the next attempt, none lost


def test_info_events_and_filtered_kinds_are_not_notified(tmp_path: Path, slack: SlackServer) -> None:
    sink = make_sink(tmp_path, slack, notify={"kinds": ["straggler", "hang"]})
    sink.publish([ev(1, severity="info"), ev(2, kind="network"), ev(3, kind="hang", severity="critical")])
    sink.flush(timeout=60)
    [msg] = slack.top_level_messages()
    assert "Training hang" in header(msg)
    sink.close()


def test_rendered_blocks_pass_slack_sdk_validation() -> None:
    from rankwatch.alerts.config import LinksConfig

    episodes = [EpisodeView(f"e{r}", "firing", ev(r, kind="network", nic="rdmap16s27",
                                                    evidence={"retrans_timeout_events": 120, "x" * 40: "y" * 500}))
                for r in range(256)]
    view = IncidentView(id=7, run="r" * 200, state="firing", opened_at=T0, resolved_at=None, reminders=0,
                        episodes=episodes)
    msg = render_incident(view, "firing", LinksConfig(grafana_url="https://g/{node}"))
    assert len(msg.blocks) <= 50
    for b in Block.parse_all(msg.blocks):
        b.validate_json()  # raises SlackObjectFormationError beyond Slack's limits


def test_a_throttling_gpu_and_the_straggler_it_causes_are_named_as_one_rank(tmp_path: Path, slack: SlackServer) -> None:
    """The detector reports a thermally throttling GPU (gpu_fault, with the rank running on it)
    and that rank as a straggler: one message whose headline names the rank, not '2 ranks'."""
    clock = FakeClock()
    sink = make_sink(tmp_path, slack, clock=clock, notify={"group_wait_s": 30, "group_window_s": 300})
    sink.publish([ev(29, kind="gpu_fault", episode="gpu/node-003/5", t=T0),
                  ev(29, t=T0 + 15)])
    clock.now += 31
    assert sink.deliver_due() == 1
    (msg,) = slack.top_level_messages()
    assert "Failing GPU + Straggler: rank 29 on node-003 (GPU 5)" in header(msg)
    sink.close()
