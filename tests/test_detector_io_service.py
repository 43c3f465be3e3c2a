"""The detector loop: a Prometheus that is down, slow or answers garbage never stops it and never
turns into stragglers; a failing sink is counted, not fatal; state survives a crash (no
duplicate firing, resolution still emitted, unpublished events re-published); /metrics and
/healthz; `rankwatch detector` exits cleanly on SIGTERM and names bad config keys."""

from __future__ import annotations

import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from test_detector_io_client import FakePrometheus

from rankwatch import promserver
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.metrics import DetectorMetrics, MetricsServer
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.replay import ReplayDataset
from rankwatch.detectors.service import DetectorService, EventWriter, evaluate_range
from rankwatch.detectors.source import PromSource
from rankwatch.detectors.state import DetectorState
from rankwatch.events import Event

CFG = DetectorConfig(warmup_s=30.0)


def source_for(url: str, **conn: Any) -> PromSource:
    conn.setdefault("retries", 0)
    conn.setdefault("timeout_s", 30.0)
    return PromSource(PromClient(PromConnection(url=url, **conn)), CFG.window_s, CFG.efa_error_counters)


class ListSink:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self.closed = False

    def publish(self, events):
        self.batches.append(list(events))

    def close(self) -> None:
        self.closed = True


class BrokenSink:
    def publish(self, events):
        raise RuntimeError("slack is down")

    def close(self) -> None:
        raise RuntimeError("still down")


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    assert found, f"{name}{labels} not in /metrics"
    return total


@pytest.mark.parametrize("mode", ["http500", "not_json", "error_json", "slow", "down"])
def test_broken_prometheus_keeps_cycling_and_counts_errors(mode: str) -> None:
    responses = {
        "http500": (500, b"<html>oops</html>"),
        "not_json": (200, b"{\"status\": \"succ"),
        "error_json": (422, json.dumps({"status": "error", "errorType": "execution", "error": "boom"}).encode()),
    }
    srv = None
    if mode == "down":
        url = f"http://127.0.0.1:{promserver.free_port()}"
    else:
        srv = FakePrometheus(lambda r: (time.sleep(0.8), (200, b"{}"))[1] if mode == "slow" else responses[mode])
        url = srv.url
    metrics = DetectorMetrics(CFG.interval_s)
    sink = ListSink()
    service = DetectorService(source_for(url, timeout_s=0.5), DetectorCore(CFG), interval_s=CFG.interval_s, sinks=[sink],
                              metrics=metrics)
    try:
        results = [service.run_cycle(1_700_000_000 + 15 * k) for k in range(3)]
        n_queries = len(service.source.queries)
        for res in results:
            assert res.all_failed and len(res.errors) == n_queries and res.events == []
        # every query of every cycle is counted, under its own name
        text = metrics.registry.get_sample_value
        assert text("rankwatch_detector_query_errors_total", {"query": "rank_steps_rate"}) == 3
        assert text("rankwatch_detector_cycles_total") == 3
        assert sink.batches == [[], [], []]  # sinks still hear from every cycle
        assert metrics.health()[0]
    finally:
        service.source.close()
        if srv is not None:
            srv.close()


@pytest.fixture(scope="module")
def straggler_replay(tmp_path_factory: pytest.TempPathFactory):
    """A 16-rank job whose rank 13 is 30 % slower from 60 s to 150 s, backfilled into a real
    Prometheus."""
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("io-service", layout=Layout(tp=4, pp=2, dp=2), nodes=2, duration_s=330,
                  faults=[Fault("slowdown", rank=13, start_s=60, end_s=150, magnitude=0.3)])
    om, _, _ = write_replay(sc, tmp_path_factory.mktemp("svc"))
    with ReplayDataset(om) as ds:
        yield sc, ds


def grid(ds: ReplayDataset) -> list[float]:
    start = (ds.min_time // 15 + 1) * 15
    return [start + 15 * k for k in range(int((ds.max_time - start) // 15) + 1)]


def test_restart_neither_repeats_nor_loses_alerts(straggler_replay, tmp_path: Path) -> None:
    _, ds = straggler_replay
    times = grid(ds)
    # reference: one uninterrupted evaluation of the same times (the range path, which equals the
    # live path: test_replay_of_the_same_data_gives_the_same_events)
    ref_src = source_for(ds.url)
    ref_sink = ListSink()
    evaluate_range(ref_src.snapshots(times[0], times[-1], 15), DetectorCore(CFG), sinks=[ref_sink])
    ref_events = [e for b in ref_sink.batches for e in b]
    ref_src.close()
    strag = [(e.state, e.rank) for e in ref_events if e.kind == "straggler"]
    assert strag == [("firing", 13), ("resolved", 13)]
    firing_t = next(e.time for e in ref_events if e.kind == "straggler")

    db = tmp_path / "state.sqlite"
    out = tmp_path / "events.jsonl"
    crash_after = times.index(firing_t) + 1  # crash while the episode is open
    src1 = source_for(ds.url)
    first = DetectorService(src1, DetectorCore(CFG), interval_s=15, state=DetectorState(db),
                            writer=EventWriter(path=out))
    for t in times[:crash_after]:
        first.run_cycle(t)
    src1.close()  # process killed: nothing else is closed or flushed beyond what each cycle committed

    # the restarted service resumes right after the last saved evaluation
    src2 = source_for(ds.url)
    second = DetectorService(src2, DetectorCore(CFG), interval_s=15, state=DetectorState(db),
                             writer=EventWriter(path=out), clock=lambda: times[-1] + 60, query_delay_s=0)
    assert second.first_time() == times[crash_after]
    for t in times[crash_after:]:
        second.run_cycle(t)
    second.close()
    src2.close()
    written = [Event.from_json(line) for line in out.read_text().splitlines()]
    assert written == ref_events
    st = [(e.state, e.episode) for e in written if e.kind == "straggler"]
    assert len(st) == 2 and st[0][1] == st[1][1]  # one firing, one resolution, same episode


def test_events_saved_but_not_published_are_published_after_restart(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    ev = Event(time=1.0, kind="straggler", state="firing", run="r", rank=3, node="n", gpu="3", score=9.0,
               summary="Rank 3 is slow.", episode="straggler-abc")
    st = DetectorState(db)
    st.save(1.0, {"version": 1}, [ev])  # crash before publishing
    st.close()
    sink = ListSink()
    svc = DetectorService(source=None, core=DetectorCore(CFG), interval_s=15,  # type: ignore[arg-type]
                          state=DetectorState(db), sinks=[sink])
    assert sink.batches == [[ev]]
    assert svc.state is not None and svc.state.pending() == []
    svc.close()
    # and only once
    sink2 = ListSink()
    DetectorService(source=None, core=DetectorCore(CFG), interval_s=15,  # type: ignore[arg-type]
                    state=DetectorState(db), sinks=[sink2]).close()
    assert sink2.batches == []


def test_live_loop_with_a_failing_sink_and_metrics_endpoint(straggler_replay) -> None:
    sc, ds = straggler_replay
    times = grid(ds)
    now = [times[0]]

    class Clock:
        """Data time that advances only while the loop sleeps."""

        def __call__(self) -> float:
            return now[0]

    class Stop:
        def is_set(self) -> bool:
            return now[0] > times[-1] + 1

        def wait(self, seconds: float) -> bool:
            now[0] += max(seconds, 0.001)
            return self.is_set()

    metrics = DetectorMetrics(15)
    server = MetricsServer(metrics, "127.0.0.1:0")
    good = ListSink()
    src = source_for(ds.url)
    svc = DetectorService(src, DetectorCore(CFG), interval_s=15, sinks=[BrokenSink(), good], metrics=metrics,
                          clock=Clock(), query_delay_s=0)
    try:
        svc.run(Stop())  # type: ignore[arg-type]
        assert svc.last_time == times[-1]
        published = [e for batch in good.batches for e in batch]
        assert [(e.kind, e.state, e.rank) for e in published if e.kind == "straggler"] == \
               [("straggler", "firing", 13), ("straggler", "resolved", 13)]
        base = f"http://127.0.0.1:{server.port}"
        text = requests.get(base + "/metrics", timeout=5).text
        assert metric_value(text, "rankwatch_detector_sink_errors_total", sink="BrokenSink") == len(good.batches)
        assert metric_value(text, "rankwatch_detector_events_total", kind="straggler", state="firing") == 1
        assert metric_value(text, "rankwatch_detector_rank_flagged", run=sc.run) == 0  # resolved by the end
        # recovered: its score is back under the flagging threshold, and still exported
        assert metric_value(text, "rankwatch_detector_rank_score", run=sc.run, rank="13") < CFG.z_threshold
        assert metric_value(text, "rankwatch_detector_observed", kind="ranks") == 16
        assert metric_value(text, "rankwatch_detector_cycle_duration_seconds") > 0
        assert metric_value(text, "rankwatch_detector_last_evaluated_timestamp_seconds") == times[-1]
        h = requests.get(base + "/healthz", timeout=5)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        assert requests.get(base + "/nope", timeout=5).status_code == 404
    finally:
        server.close()
        svc.close()  # BrokenSink.close raising is logged, not fatal
        src.close()
    assert good.closed


def test_replay_of_the_same_data_gives_the_same_events(straggler_replay) -> None:
    _, ds = straggler_replay
    times = grid(ds)
    live_src = source_for(ds.url)
    live = DetectorService(live_src, DetectorCore(CFG), interval_s=15)
    live_events = [e for t in times for e in live.run_cycle(t).events]
    live_src.close()
    sink = ListSink()
    range_src = source_for(ds.url)
    res = evaluate_range(range_src.snapshots(times[0], times[-1], 15), DetectorCore(CFG), sinks=[sink])
    range_src.close()
    assert res.evaluations == len(times)
    assert [e for b in sink.batches for e in b] == live_events and live_events


def test_corrupt_state_db_is_moved_aside_with_a_clear_message(tmp_path: Path, caplog) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_text("this is not sqlite" * 100)
    caplog.set_level(logging.INFO)
    st = DetectorState(bad)
    assert st.load() == (None, None)  # a fresh state in a new file
    st.save(15.0, {"version": 1}, [])
    st.close()
    (aside,) = tmp_path.glob("bad.sqlite.corrupt-*")
    assert aside.read_text() == "this is not sqlite" * 100  # kept for whoever wants to look
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(bad) in msg and str(aside) in msg and "not a usable SQLite database" in msg
    assert DetectorState(bad).load()[1] == 15.0


def _detector_cmd(url: str, tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rankwatch", "detector", "--prometheus", url, "--interval", "1",
            "--query-delay", "0", "--query-timeout", "0.5", "--query-retries", "0", "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(tmp_path / "state"), "--events-file", str(tmp_path / "events.jsonl"), *extra]


@pytest.mark.slow
def test_detector_cli_serves_metrics_and_exits_cleanly_on_sigterm(tmp_path: Path, subprocess_env) -> None:
    srv = FakePrometheus(lambda r: (503, b"Service Unavailable"))
    port = promserver.free_port()
    proc = subprocess.Popen(_detector_cmd(srv.url, tmp_path, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env)
    try:
        deadline = time.monotonic() + 240  # a hang guard: start-up takes seconds, longer on a busy machine
        errors = 0.0
        while time.monotonic() < deadline:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                if "rankwatch_detector_cycles_total" in text and metric_value(text, "rankwatch_detector_cycles_total") >= 2:
                    errors = metric_value(text, "rankwatch_detector_query_errors_total")
                    break
            except (requests.RequestException, AssertionError):
                pass
            time.sleep(0.2)
        assert errors > 0, "the detector did not cycle against the failing Prometheus"
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        srv.close()
    assert proc.returncode == 0, err
    assert "detector stopped" in err and "Traceback" not in err
    assert out == ""  # missing data raised nothing


def test_detector_cli_config_errors_name_the_key(tmp_path: Path, capsys) -> None:
    from rankwatch.cli import main

    cfg = tmp_path / "detector.toml"
    cfg.write_text("[detector]\nresolve_windows = 0\n")
    assert main(_detector_cmd("http://127.0.0.1:1", tmp_path, promserver.free_port(), "--config", str(cfg))[3:]) == 2
    err = capsys.readouterr().err
    assert "resolve_windows" in err and str(cfg) in err
    assert main(_detector_cmd("prometheus:9090", tmp_path, promserver.free_port())[3:]) == 2
    assert "must start with http" in capsys.readouterr().err
    cfg.write_text("[slack]\nbogus_key = 1\n")
    assert main(_detector_cmd("http://127.0.0.1:1", tmp_path, promserver.free_port(), "--config", str(cfg))[3:]) == 2
    assert "slack.bogus_key: unknown key" in capsys.readouterr().err


def test_state_from_another_version_is_a_clear_error(tmp_path: Path) -> None:
    from rankwatch.errors import ConfigError

    db = tmp_path / "old.sqlite"
    st = DetectorState(db)
    st.save(1.0, {"version": 999}, [])
    st.close()
    with pytest.raises(ConfigError, match="cannot resume from the stored state"):
        DetectorService(source=None, core=DetectorCore(CFG), interval_s=15,  # type: ignore[arg-type]
                        state=DetectorState(db))


# --- hardening (issue 11): a silent server, a clock set back, a state file someone breaks ------------

EMPTY_VECTOR = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}).encode()


def test_silent_prometheus_costs_one_timeout_and_one_log_line_per_cycle(caplog) -> None:
    """A server that accepts and never answers: each query is sent at most once per cycle (no
    timeout retried, the rest skipped), and each cycle logs one line that says why."""
    release = threading.Event()
    srv = FakePrometheus(lambda r: (release.wait(60), (200, EMPTY_VECTOR))[1])
    src = source_for(srv.url, timeout_s=0.5, retries=2)
    service = DetectorService(src, DetectorCore(CFG), interval_s=15)
    caplog.set_level(logging.DEBUG)
    try:
        results = [service.run_cycle(1_700_000_000 + 15 * k) for k in range(2)]
    finally:
        release.set()
        src.close()
        srv.close()
    n = len(src.queries)
    assert all(r.all_failed and len(r.errors) == n for r in results)
    sent = [(r["form"]["query"], r["form"]["time"]) for r in srv.requests]
    assert len(sent) == len(set(sent)), "a query was sent twice in one cycle"
    assert len(sent) <= 2 * src._pool._max_workers  # only the queries already in flight
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    for rec in lines:
        assert f"{n} of {n} queries failed" in rec.getMessage() and "timed out" in rec.getMessage()


def test_clock_set_back_is_detected_and_evaluation_goes_on(tmp_path: Path, caplog) -> None:
    """The state says the last evaluation was an hour ahead (the clock was set back): the
    detector says so and evaluates now, instead of waiting blind for an hour."""
    srv = FakePrometheus(lambda r: (200, EMPTY_VECTOR))
    now = [1_700_000_013.0]
    db = tmp_path / "state.sqlite"
    st = DetectorState(db)
    st.save(1_700_000_010 + 3600, DetectorCore(CFG).export_state(), [])
    st.close()

    class Stop:
        """Stops once a cycle has queried; a wait moves the clock on (as a real wait would)."""

        def is_set(self) -> bool:
            return bool(srv.requests)

        def wait(self, seconds: float) -> bool:
            now[0] += seconds
            return self.is_set()

    src = source_for(srv.url)
    svc = DetectorService(src, DetectorCore(CFG), interval_s=15, state=DetectorState(db), clock=lambda: now[0],
                          query_delay_s=2)
    caplog.set_level(logging.INFO)
    try:
        svc.run(Stop())  # type: ignore[arg-type]
    finally:
        svc.close()
        src.close()
        srv.close()
    assert {float(r["form"]["time"]) for r in srv.requests} == {1_700_000_010.0}
    assert "clock went back" in caplog.text
    assert DetectorState(db).load()[1] == 1_700_000_010.0


def _reference_events(ds: ReplayDataset, times: list[float]) -> list[Event]:
    src = source_for(ds.url)
    sink = ListSink()
    evaluate_range(src.snapshots(times[0], times[-1], 15), DetectorCore(CFG), sinks=[sink])
    src.close()
    return [e for b in sink.batches for e in b]


@pytest.mark.parametrize("fault", ["deleted", "replaced_by_garbage", "locked"])
def test_events_reach_stdout_and_file_whatever_the_state_db_does(straggler_replay, tmp_path: Path, caplog,
                                                                 fault: str) -> None:
    _, ds = straggler_replay
    times = grid(ds)
    ref = _reference_events(ds, times)
    assert ref
    db = tmp_path / "state.sqlite"
    out, stdout = tmp_path / "events.jsonl", io.StringIO()
    src = source_for(ds.url)
    svc = DetectorService(src, DetectorCore(CFG), interval_s=15, state=DetectorState(db),
                          writer=EventWriter(stdout, out))
    caplog.set_level(logging.INFO)
    fault_at = {len(times) // 3, len(times) // 3 + 1} if fault == "locked" else {len(times) // 3}
    locker = None
    try:
        for k, t in enumerate(times):
            if k in fault_at and fault == "deleted":
                db.unlink()
            elif k in fault_at and fault == "replaced_by_garbage":
                db.unlink()
                db.write_bytes(b"\x00garbage" * 1000)
            elif k in fault_at and fault == "locked" and locker is None:
                locker = sqlite3.connect(db, isolation_level=None)
                locker.execute("BEGIN EXCLUSIVE")
            elif locker is not None and k not in fault_at:
                locker.execute("ROLLBACK")
                locker.close()
                locker = None
            svc.run_cycle(t)
    finally:
        svc.close()
        src.close()
    for text in (stdout.getvalue(), out.read_text()):
        assert [Event.from_json(line) for line in text.splitlines()] == ref
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all(r.exc_info is None for r in warnings), "a warning, never a traceback"
    said = " ".join(r.getMessage() for r in warnings)
    expect = {"deleted": "was deleted while the detector was running",
              "replaced_by_garbage": "moved it aside", "locked": "locked by another process"}[fault]
    assert expect in said
    # the file holds the state of the last evaluation again: a restart resumes from there
    assert DetectorState(db).load()[1] == times[-1]
