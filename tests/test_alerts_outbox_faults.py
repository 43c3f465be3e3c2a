"""Whatever the alert outbox does, events still reach stdout and --events-file: a corrupt file is
moved aside, a lock held by another process is a bounded wait with a warning. The detector runs
through the real CLI on a replay (real promtool backfill + Prometheus); the outbox is real
SQLite, locked by a second real connection."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.alerts.outbox import Outbox, OutboxUnavailable
from rankwatch.events import Event
from rankwatch.sim.scenario import Scenario, write_replay
from rankwatch.sim.slack import SlackServer
from rankwatch.sim.training import Fault, Layout

T0 = 1_790_000_000.0


def ev(rank: int, state: str = "firing", t: float = T0) -> Event:
    return Event(time=t, kind="straggler", state=state, run="r1", rank=rank, node="node-000", gpu=str(rank % 8),
                 score=7.5, summary=f"Rank {rank} computes 20 % slower.", evidence={"slowdown": 0.2},
                 episode=f"r1/straggler/{rank}", since=t - 30)


def exclusive_lock(path: Path, *, readers_too: bool = True) -> sqlite3.Connection:
    """Another process's connection holding the file under an exclusive lock: a write transaction
    left open (``sqlite3`` shell, a backup tool), and with ``readers_too`` in exclusive locking
    mode, which keeps everyone else out (possible only while no one else has the file open)."""
    conn = sqlite3.connect(path, isolation_level=None)
    if readers_too:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("CREATE TABLE IF NOT EXISTS lock_holder (x)")
    return conn


def corrupt(path: Path) -> None:
    """A SQLite file whose pages were overwritten (a disk fault, a bad copy)."""
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)
    data[4096:] = os.urandom(len(data) - 4096)
    path.write_bytes(bytes(data))


def make_outbox_with_a_row(state: Path, slack: SlackServer) -> None:
    doc = {"slack": {"channel": slack.channel, "api_url": slack.api_url},
           "notify": {"group_wait_s": 3600, "close_timeout_s": 0}}
    sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=state,
                     start_thread=False)
    sink.publish([ev(1)])
    sink.close()  # close_timeout_s = 0: the row stays pending


# -- in process: the sink --------------------------------------------------------------------

def test_corrupt_outbox_is_moved_aside_and_a_new_one_started(tmp_path: Path, slack: SlackServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    make_outbox_with_a_row(tmp_path, slack)
    corrupt(tmp_path / "alerts.sqlite")
    caplog.set_level(logging.ERROR, logger="rankwatch.alerts")
    ob = Outbox(tmp_path / "alerts.sqlite")
    assert ob.rows() == []
    ob.close()
    [aside] = tmp_path.glob("alerts.sqlite.corrupt-*")
    [msg] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(tmp_path / "alerts.sqlite") in msg and str(aside) in msg and "not sent" in msg


def test_not_a_database_at_all(tmp_path: Path) -> None:
    (tmp_path / "alerts.sqlite").write_text("this is a text file someone copied here\n" * 200)
    Outbox(tmp_path / "alerts.sqlite").close()
    assert len(list(tmp_path.glob("alerts.sqlite.corrupt-*"))) == 1


def test_locked_outbox_keeps_events_in_memory_until_the_lock_goes(tmp_path: Path, slack: SlackServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    doc = {"slack": {"channel": slack.channel, "api_url": slack.api_url},
           "notify": {"group_wait_s": 0, "min_interval_s": 0, "close_timeout_s": 5, "retry_interval_s": 0.2}}
    cfg = load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token})
    sink = AlertSink(cfg, state_dir=tmp_path, start_thread=False)
    holder = exclusive_lock(tmp_path / "alerts.sqlite", readers_too=False)
    caplog.set_level(logging.WARNING, logger="rankwatch.alerts")
    try:
        sink.publish([ev(1)])  # returns after a bounded wait, the event kept in memory
        sink.publish([ev(2)])
        warnings = [r.getMessage() for r in caplog.records if "cannot write the outbox" in r.getMessage()]
        assert len(warnings) == 1 and "locked" in warnings[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    sink.publish([])  # the next cycle records what waited
    assert sink.flush(timeout=60) == 0
    sink.close()
    assert len(slack.top_level_messages()) == 1  # both ranks, one incident
    assert "2 ranks" in slack.top_level_messages()[0].text


def test_outbox_locked_at_start_does_not_stop_the_sink(tmp_path: Path, slack: SlackServer) -> None:
    make_outbox_with_a_row(tmp_path, slack)
    holder = exclusive_lock(tmp_path / "alerts.sqlite")
    try:
        with pytest.raises(OutboxUnavailable, match="locked by another process"):
            Outbox(tmp_path / "alerts.sqlite", lock_wait_s=0.2)
        doc = {"slack": {"channel": slack.channel, "api_url": slack.api_url},
               "notify": {"group_wait_s": 0, "min_interval_s": 0, "close_timeout_s": 5, "retry_interval_s": 0.2}}
        sink = AlertSink(load_alerting_config(doc, environ={"SLACK_BOT_TOKEN": slack.token}), state_dir=tmp_path,
                         start_thread=False)
        assert sink.outbox is None
        sink.publish([ev(2, t=T0 + 3600)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sink.flush(timeout=60) == 0  # opens the outbox now, records the event, sends both
    sink.close()
    assert len(slack.top_level_messages()) == 2


# -- the detector through its CLI ------------------------------------------------------------

@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sc = Scenario("outbox-faults", layout=Layout(tp=2, pp=1, dp=4), nodes=1, duration_s=480, seed=5,
                  faults=[Fault("slowdown", rank=3, start_s=120, end_s=360, magnitude=0.4)])
    om, _truth, _n = write_replay(sc, tmp_path_factory.mktemp("replay"))
    return om


def detect(replay: Path, tmp_path: Path, state: Path, slack: SlackServer, env: dict[str, str]) -> tuple[int, str, str]:
    config = tmp_path / "rankwatch.toml"
    config.write_text(f'[slack]\nchannel = "{slack.channel}"\napi_url = "{slack.api_url}"\n'
                      '[notify]\nkinds = ["straggler"]\ngroup_wait_s = 0\nclose_timeout_s = 10\nmin_interval_s = 0\n')
    events = tmp_path / "events.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "rankwatch", "detect", "--replay", str(replay), "--config", str(config),
         "--alert-state-dir", str(state), "--events-file", str(events)],
        env={**env, "SLACK_BOT_TOKEN": slack.token}, capture_output=True, text=True, timeout=600)
    return res.returncode, events.read_text() if events.exists() else "", res.stdout + res.stderr


@pytest.mark.slow
def test_detector_with_a_corrupt_outbox_still_writes_events(tmp_path: Path, replay: Path, slack: SlackServer,
                                                            subprocess_env: dict[str, str]) -> None:
    state = tmp_path / "state"
    make_outbox_with_a_row(state, slack)
    corrupt(state / "alerts.sqlite")
    code, events, output = detect(replay, tmp_path, state, slack, subprocess_env)
    assert code == 0, output
    assert '"kind":"straggler"' in events and '"state":"firing"' in events
    assert "Traceback" not in output and "moved it to" in output
    assert list(state.glob("alerts.sqlite.corrupt-*"))
    assert slack.top_level_messages(), "the new outbox delivers the new events"
    assert slack.token not in output + events


@pytest.mark.slow
def test_detector_with_a_locked_outbox_still_writes_events(tmp_path: Path, replay: Path, slack: SlackServer,
                                                           subprocess_env: dict[str, str]) -> None:
    state = tmp_path / "state"
    make_outbox_with_a_row(state, slack)
    holder = exclusive_lock(state / "alerts.sqlite")
    try:
        code, events, output = detect(replay, tmp_path, state, slack, subprocess_env)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 0, output
    assert '"kind":"straggler"' in events
    assert "Traceback" not in output
    assert "cannot write the outbox" in output and "locked by another process" in output
    # Nothing could be recorded while the lock stayed: the detector says what it dropped.
    assert "could not be recorded in the outbox" in output and "dropped" in output
