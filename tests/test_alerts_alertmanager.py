"""Detector episodes posted to a real Alertmanager (Debian's prometheus-alertmanager binary) and
read back through its v2 API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import SilentServer, wait_until

from rankwatch import promserver
from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.events import Event

AM_CONFIG = """
route:
  receiver: blackhole
  group_wait: 1h
receivers:
  - name: blackhole
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[promserver.ManagedProcess]:
    am = promserver.start_alertmanager(AM_CONFIG, workdir=tmp_path / "am")
    try:
        yield am
    finally:
        am.stop()


def am_alerts(url: str) -> list[dict]:
    return requests.get(url + "/api/v2/alerts", params={"active": "true", "silenced": "true", "inhibited": "true",
                                                        "unprocessed": "true"}, timeout=5).json()


def test_episodes_become_alerts_and_resolve(tmp_path: Path, alertmanager: promserver.ManagedProcess) -> None:
    now = time.time()
    doc = {"alertmanager": {"url": alertmanager.url, "resend_interval_s": 60},
           "links": {"runbook_url": "https://runbooks.example/{alert}.md"}, "notify": {"group_wait_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=tmp_path / "state", start_thread=False)
    straggler = Event(time=now - 60, kind="straggler", state="firing", run="llama", rank=37, node="p5-012", gpu="3",
                      score=8.0, summary="Rank 37 computes 21 % slower than its peers.", evidence={"slowdown": 0.21},
                      episode="ep-37", severity="warning", since=now - 120)
    gpu = Event(time=now - 60, kind="gpu_fault", state="firing", run="llama", rank=None, node="p5-020", gpu="5",
                score=1.0, summary="GPU 5 of p5-020 raised XID 79 (fell off the bus).", evidence={"xid": 79},
                episode="ep-gpu", severity="critical")
    sink.publish([straggler, gpu])
    sink.publish([straggler])  # duplicate
    assert sink.flush(timeout=60) == 0

    alerts = {a["labels"]["episode"]: a for a in am_alerts(alertmanager.url)}
    assert set(alerts) == {"ep-37", "ep-gpu"}
    a = alerts["ep-37"]
    assert a["labels"] == {"alertname": "RankwatchStraggler", "kind": "straggler", "severity": "warning",
                           "source": "rankwatch-detector", "episode": "ep-37", "run": "llama", "rank": "37",
                           "node": "p5-012", "gpu": "3"}
    assert a["annotations"]["summary"] == "Straggler: rank 37 on p5-012 (GPU 3) (run llama)"
    assert a["annotations"]["runbook_url"] == "https://runbooks.example/RankwatchStraggler.md"
    assert "Rank 37 computes 21 % slower" in a["annotations"]["description"]
    assert a["status"]["state"] == "active"
    assert abs(_ts(a["startsAt"]) - (now - 120)) < 1
    assert alerts["ep-gpu"]["labels"]["alertname"] == "RankwatchGpuFault"
    assert alerts["ep-gpu"]["labels"]["severity"] == "critical" and "rank" not in alerts["ep-gpu"]["labels"]

    resolved = Event(**{**straggler.__dict__, "state": "resolved", "time": now - 5})
    sink.publish([resolved])
    assert sink.flush(timeout=60) == 0
    active = {a["labels"]["episode"] for a in am_alerts(alertmanager.url)}
    assert active == {"ep-gpu"}  # endsAt in the past: Alertmanager no longer lists it as active
    sink.close()


def test_alertmanager_down_keeps_alerts_queued(tmp_path: Path) -> None:
    doc = {"alertmanager": {"url": f"http://127.0.0.1:{promserver.free_port()}", "timeout_s": 1},
           "notify": {"close_timeout_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=tmp_path, start_thread=False)
    sink.publish([Event(time=time.time(), kind="hang", state="firing", run="r", rank=None, node=None, gpu=None,
                        score=0.0, summary="No rank stepped for 10 min.", episode="h1", severity="critical")])
    sink.deliver_due()
    [row] = sink.outbox.rows()
    assert row.status == "pending" and "unreachable" in (row.last_error or "")
    sink.close()


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_hanging_alertmanager_does_not_delay_slack(tmp_path: Path, silent_server: SilentServer) -> None:
    from rankwatch.sim.slack import SlackServer

    slack = SlackServer().start()
    try:
        # Alertmanager accepts and never answers, for far longer than this test waits for Slack:
        # Slack can only get its message while that request hangs.
        doc = {"alertmanager": {"url": silent_server.url, "timeout_s": 3600},
               "slack": {"channel": slack.channel, "api_url": slack.api_url},
               "notify": {"group_wait_s": 0, "close_timeout_s": 0}}
        sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=tmp_path)
        sink.publish([Event(time=time.time(), kind="hang", state="firing", run="r", rank=None, node=None, gpu=None,
                            score=0.0, summary="No rank stepped for 10 min.", episode="h1", severity="critical")])
        wait_until(lambda: silent_server.accepted >= 1, "the request to the hanging Alertmanager")
        wait_until(lambda: slack.messages, "the Slack message while Alertmanager hangs")
        assert silent_server.accepted == 1  # still that one request, unanswered
        [row] = [r for r in sink.outbox.rows() if r.target == "alertmanager"]
        assert row.status != "delivered"
        silent_server.close()  # the hanging request fails now: close() need not wait for it
        sink.close()
    finally:
        slack.stop()


def test_firing_alerts_are_reposted_so_they_do_not_expire(tmp_path: Path,
                                                          alertmanager: promserver.ManagedProcess) -> None:
    doc = {"alertmanager": {"url": alertmanager.url, "resend_interval_s": 0.5}, "notify": {"group_wait_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=tmp_path, start_thread=False)
    sink.publish([Event(time=time.time(), kind="hang", state="firing", run="r", rank=None, node=None, gpu=None,
                        score=0.0, summary="No rank stepped for 10 min.", episode="h1", severity="critical")])
    assert sink.flush(timeout=60) == 0
    [first] = am_alerts(alertmanager.url)
    time.sleep(0.6)
    sink.deliver_due()
    [again] = am_alerts(alertmanager.url)
    assert _ts(again["endsAt"]) > _ts(first["endsAt"]) and again["startsAt"] == first["startsAt"]
    sink.close()
