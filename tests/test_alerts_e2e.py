"""End to end with real parts: a replayed scenario with one slowed rank goes through
`rankwatch detect --replay` (real promtool backfill + Prometheus) into the real slack_sdk client
(local Slack API server), W&B (offline) and a real Alertmanager; then the same with Slack
failing and the detector killed with SIGKILL between detection and delivery."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from rankwatch import promserver
from rankwatch.alerts.wandb_notifier import offline_alerts
from rankwatch.sim.scenario import Scenario, write_replay
from rankwatch.sim.slack import SlackServer
from rankwatch.sim.training import Fault, Layout

# Hang guards only (a replay and its deliveries take seconds idle, longer on a busy machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SLOW_RANK = 5


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sc = Scenario("alerts-e2e", layout=Layout(tp=2, pp=2, dp=4), nodes=2, duration_s=720, seed=3,
                  faults=[Fault("slowdown", rank=SLOW_RANK, start_s=180, end_s=420, magnitude=0.3)])
    om, _truth, _n = write_replay(sc, tmp_path_factory.mktemp("replay"))
    return om


def write_config(path: Path, slack: SlackServer, *, am_url: str | None = None, wandb: bool = False,
                 close_timeout_s: float = 300) -> Path:
    # close_timeout_s: how long the detector keeps delivering after the replay. It stops as
    # soon as nothing is pending, so a generous value costs nothing on a healthy run and lets a
    # busy machine finish (W&B's offline run alone takes seconds to start).
    text = f"""
[slack]
channel = "{slack.channel}"
api_url = "{slack.api_url}"
max_retries = 1
timeout_s = 5

[notify]
kinds = ["straggler"]
group_wait_s = 0
min_interval_s = 0
retry_interval_s = 0.3
retry_max_backoff_s = 0.5
close_timeout_s = {close_timeout_s}

[links]
grafana_url = "https://grafana.example/d/rankwatch-node?var-node={{node}}"
"""
    if am_url:
        text += f'\n[alertmanager]\nurl = "{am_url}"\n'
    if wandb:
        text += '\n[wandb]\nproject = "e2e"\nmode = "offline"\n'
    path.write_text(text)
    return path


def detect(replay: Path, config: Path, state: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rankwatch", "detect", "--replay", str(replay), "--config", str(config),
         "--state-dir", str(state), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def descendants(pid: int) -> list[int]:
    """Child processes (e.g. the replay's Prometheus, which runs in its own session)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def outbox(state: Path) -> list[tuple[str, str, str, int]]:
    if not (state / "alerts.sqlite").exists():
        return []
    try:
        db = sqlite3.connect(f"file:{state / 'alerts.sqlite'}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        return db.execute("SELECT target, action, status, attempts FROM outbox ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def am_received(url: str) -> dict[str, float]:
    """Alertmanager's own counters of the alerts it was sent."""
    out = {"firing": 0.0, "resolved": 0.0, "invalid": 0.0}
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("alertmanager_alerts_received_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            out[status] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("alertmanager_alerts_invalid_total"):
            out["invalid"] += float(line.rsplit(" ", 1)[1])
    return out


def test_replayed_straggler_reaches_slack_wandb_and_alertmanager_once(
        tmp_path: Path, replay: Path, slack: SlackServer, subprocess_env: dict[str, str]) -> None:
    am = promserver.start_alertmanager("route: {receiver: x, group_wait: 1h}\nreceivers: [{name: x}]\n",
                                       workdir=tmp_path / "am")
    try:
        env = {**subprocess_env, "SLACK_BOT_TOKEN": slack.token}
        cfg = write_config(tmp_path / "cfg.toml", slack, am_url=am.url, wandb=True)
        state = tmp_path / "state"
        proc = detect(replay, cfg, state, env)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]

        # Slack: exactly one message, about the right rank, rewritten as resolved, one reply.
        [msg] = slack.top_level_messages()
        header = msg.blocks[0]["text"]["text"]
        assert f"Straggler: rank {SLOW_RANK} on node-00" in msg.edits[0]["blocks"][0]["text"]["text"]
        assert header.startswith(":white_check_mark: Resolved") and f"rank {SLOW_RANK}" in header
        assert len(msg.edits) == 1
        [reply] = slack.thread(msg.ts)
        assert reply.text.startswith(":white_check_mark: Resolved after")
        assert len(slack.calls("chat.postMessage")) == 2 and len(slack.calls("chat.update")) == 1

        # Alertmanager: one firing and one resolved post of the episode, all valid; the v2 API no
        # longer lists it (resolved).
        assert am_received(am.url) == {"firing": 1.0, "resolved": 1.0, "invalid": 0.0}
        assert requests.get(am.url + "/api/v2/alerts", timeout=5).json() == []

        # W&B: one firing and one resolved alert in the monitor run.
        titles = [(a["title"], a["level"]) for a in offline_alerts(state / "wandb")]
        assert titles == [(f"#1 Straggler: rank {SLOW_RANK} on node-00 (GPU 5)", "WARN"),
                          (f"Resolved #1: Straggler: rank {SLOW_RANK} on node-00 (GPU 5)", "INFO")]

    finally:
        am.stop()


def test_outbox_survives_kill_9_between_detection_and_delivery(
        tmp_path: Path, replay: Path, slack: SlackServer, subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "SLACK_BOT_TOKEN": slack.token}
    state = tmp_path / "state"
    slack.fail_always(500)
    # close_timeout_s keeps the detector retrying after the replay, so it is killed mid-delivery.
    cfg = write_config(tmp_path / "cfg.toml", slack, close_timeout_s=3600)
    proc = detect(replay, cfg, state, env)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 600  # a hang guard only: the detector retries for an hour
        while time.monotonic() < deadline:
            rows = outbox(state)
            if (len(rows) == 2 and all(r[2] != "delivered" for r in rows)
                    and len(slack.calls("chat.postMessage", ok_only=False)) >= 2):
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail(f"no failed delivery attempt seen; outbox {outbox(state)}")
        kids = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.stdout:
            proc.stdout.close()
    assert not slack.messages
    assert [(r[0], r[1]) for r in outbox(state)] == [("slack", "firing"), ("slack", "resolved")]

    slack.heal()
    cfg = write_config(tmp_path / "cfg.toml", slack)
    proc = detect(replay, cfg, state, env)  # the restarted detector replays the same data
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    [msg] = slack.top_level_messages()
    assert f"rank {SLOW_RANK}" in msg.edits[0]["blocks"][0]["text"]["text"]
    assert "Resolved" in msg.blocks[0]["text"]["text"]
    assert len(slack.thread(msg.ts)) == 1
    assert len(slack.calls("chat.postMessage")) == 2  # the firing and the thread reply, once each
    assert {r[2] for r in outbox(state)} == {"delivered"}
