"""What a person watching the detector sees: `--format text` (one readable line per event, the
JSON lines unchanged in --events-file) and the heartbeat line (ranks, GPUs and NICs with data,
open episodes, the worst score and its rank), on real replay data through a real Prometheus."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankwatch import promserver
from rankwatch.cli import main
from rankwatch.detectors.console import event_line, text_renderer
from rankwatch.events import Event

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _event(**kw) -> Event:
    base = dict(time=1_750_000_090.0, kind="straggler", state="firing", run="llama", rank=6, node="node-01", gpu="2",
                score=8.44, summary="Rank 6 computes 30 % slower\nthan its peers.", severity="warning")
    return Event(**{**base, **kw})


def test_event_line_is_one_readable_line() -> None:
    line = event_line(_event())
    assert line == ("2025-06-15T15:08:10Z FIRING   straggler       run=llama rank=6 node=node-01 gpu=2  warning "
                    "score=8.4  Rank 6 computes 30 % slower than its peers.")
    nic = event_line(_event(kind="network", rank=None, gpu=None, nic="rdmap16s27", state="resolved"))
    assert " RESOLVED " in nic and "run=llama node=node-01 nic=rdmap16s27 " in nic and "rank=" not in nic


def test_event_line_keeps_hostile_label_values_literal() -> None:
    line = event_line(_event(run="[bold red]x[/]\n<b>", summary="a [link=http://evil]b[/link]"))
    assert "\n" not in line
    assert "run=[bold red]x[/] <b>" in line and "a [link=http://evil]b[/link]" in line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_and_never_with_no_color(monkeypatch) -> None:
    ev = _event()
    assert text_renderer(io.StringIO())(ev) == event_line(ev)  # piped: plain text
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    coloured = text_renderer(_Tty())(ev)
    assert "\x1b[" in coloured and re.sub(r"\x1b\[[0-9;]*m", "", coloured) == event_line(ev)
    monkeypatch.setenv("NO_COLOR", "1")
    assert text_renderer(_Tty())(ev) == event_line(ev)


@pytest.fixture(scope="module")
def slowdown_replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("console", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=300,
                  faults=[Fault("slowdown", rank=6, start_s=90, end_s=210, magnitude=0.3)])
    om, _, _ = write_replay(sc, tmp_path_factory.mktemp("console"))
    return om


def test_detect_replay_format_text_prints_a_line_per_event(slowdown_replay: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "detector.toml"
    cfg.write_text("warmup_s = 30.0\n")
    events_file = tmp_path / "events.jsonl"
    assert main(["detect", "--replay", str(slowdown_replay), "--config", str(cfg), "--format", "text",
                 "--events-file", str(events_file)]) == 0
    out = capsys.readouterr().out
    events = [Event.from_json(line) for line in events_file.read_text().splitlines()]  # still JSON lines
    lines = out.splitlines()
    assert len(lines) == len(events) >= 2 and out.endswith("\n")
    assert lines == [event_line(e) for e in events]
    strag = [ln for ln in lines if " straggler " in ln]
    assert re.match(ISO + r" FIRING +straggler +run=sim-run rank=6 node=node-01 gpu=2 +\w+ score=[\d.]+ +Rank 6",
                    strag[0]), strag[0]
    assert " RESOLVED " in strag[-1] and "rank=6" in strag[-1]
    assert not any(line.startswith("{") for line in lines)


def test_heartbeat_counts_what_has_data_and_names_the_worst_rank(slowdown_replay: Path) -> None:
    """The live loop (DetectorService.run) over a real Prometheus holding the replay, with a
    clock that runs as fast as the cycles: the heartbeat hook sees every cycle."""
    import threading

    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.heartbeat import HeartbeatLog
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import DetectorService
    from rankwatch.detectors.source import PromSource

    cfg = DetectorConfig(warmup_s=30.0)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.heartbeat")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    with ReplayDataset(slowdown_replay) as ds:
        src = PromSource(PromClient(PromConnection(ds.url)), cfg.window_s, cfg.efa_error_counters)
        core = DetectorCore(cfg)
        beats = HeartbeatLog(core, every=2, logger=logger)
        stop = threading.Event()
        start = ds.min_time + 2 * cfg.interval_s
        clock_t = [start]

        def clock() -> float:  # each look at the clock moves it one interval: no waiting
            clock_t[0] += cfg.interval_s
            return clock_t[0]

        hb_at_fault = []

        def on_cycle(res) -> None:
            hb = beats(res)
            if hb is not None and res.time >= 1_750_000_180:
                hb_at_fault.append(hb)
            if res.time >= 1_750_000_195:
                stop.set()

        svc = DetectorService(src, core, interval_s=cfg.interval_s, query_delay_s=0.0, clock=clock,
                              on_cycle=on_cycle)
        svc.run(stop)
        src.close()
    lines = [r.getMessage() for r in records]
    assert len(lines) >= 5 and beats.cycles >= 2 * (len(lines) - 1) + 1  # the 1st cycle, then every 2nd
    assert re.match(r"heartbeat " + ISO + r" cycle 1; data from 8 ranks, 8 GPUs, \d+ NICs", lines[0]), lines[0]
    hb = hb_at_fault[0]
    assert (hb.ranks, hb.gpus) == (8, 8) and hb.nics > 0
    assert hb.worst is not None and hb.worst[:2] == ("sim-run", 6)
    assert hb.open_episodes["straggler"] == 1
    line = hb.line()
    assert "1 open episode (straggler 1)" in line and "(rank 6 of sim-run)" in line


def test_detector_cli_text_format_and_heartbeat(slowdown_replay: Path, tmp_path: Path, subprocess_env) -> None:
    """`rankwatch detector --format text` against a real Prometheus with no current data: it
    cycles, logs a heartbeat saying it sees nothing, prints no event, and stops on SIGTERM."""
    from rankwatch.detectors.replay import ReplayDataset

    with ReplayDataset(slowdown_replay) as ds:
        port = promserver.free_port()
        log = tmp_path / "detector.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rankwatch", "detector", "--prometheus", ds.url, "--interval", "1",
                 "--query-delay", "0", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"),
                 "--format", "text", "--heartbeat-every", "2"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=subprocess_env)
        try:
            for _ in range(1200):
                assert proc.poll() is None, log.read_text()[-3000:]
                if log.read_text().count("heartbeat ") >= 2:
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    text = log.read_text()
    assert proc.returncode == 0, text
    beats = [ln for ln in text.splitlines() if "heartbeat " in ln]
    assert len(beats) >= 2, text[-3000:]
    assert re.search(r"heartbeat " + ISO + r" cycle 1; data from 0 ranks, 0 GPUs, 0 NICs; no open episode; "
                     r"no rank scored; cycle took \d+ ms", beats[0]), beats[0]
    assert " cycle 3;" in beats[1]  # the first cycle, then every 2nd
    assert out == ""
    assert (tmp_path / "state" / "detector.sqlite").is_file()


def test_heartbeat_every_must_not_be_negative(tmp_path: Path, capsys) -> None:
    assert main(["detector", "--prometheus", "http://127.0.0.1:1", "--heartbeat-every", "-1",
                 "--state-dir", str(tmp_path)]) == 2
    assert "--heartbeat-every: must be 0 (off) or a number of cycles" in capsys.readouterr().err


def test_events_file_stays_json_with_format_text(tmp_path: Path) -> None:
    from rankwatch.detectors.service import EventWriter

    out = io.StringIO()
    writer = EventWriter(out, tmp_path / "e.jsonl", render=event_line)
    writer.publish([_event(), _event(state="resolved")])
    writer.close()
    assert [json.loads(x)["state"] for x in (tmp_path / "e.jsonl").read_text().splitlines()] == ["firing", "resolved"]
    assert out.getvalue().splitlines() == [event_line(_event()), event_line(_event(state="resolved"))]
