"""Replay files: bad input is named by file and line; a large file cut into parts for parallel
promtool runs holds exactly the samples of a single run; `rankwatch detect --replay` prints
JSON-lines events at the live cadence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rankwatch.cli import main
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.replay import ReplayDataset, find_first_error, split_points
from rankwatch.detectors.source import PromSource
from rankwatch.errors import InputError

GOOD = """# TYPE rankwatch_steps counter
# HELP rankwatch_steps Completed training steps.
rankwatch_steps_total{run="r",rank="0",node="n",instance="n:9420",job="p"} 10 1700000000.000
rankwatch_steps_total{run="r",rank="0",node="n",instance="n:9420",job="p"} 20 1700000005.000
# TYPE up gauge
up{instance="n:9420",job="p"} 1 1700000000
up{instance="n:9420",job="p"} 1 1700000005
# EOF
"""


@pytest.mark.parametrize("mutate,line,reason", [
    (lambda s: s.replace(" 20 1700000005.000", " twenty 1700000005.000"), 4, "value 'twenty' is not a number"),
    (lambda s: s.replace(" 20 1700000005.000", " 20"), 4, "no timestamp"),
    (lambda s: s.replace("# EOF\n", ""), 7, "does not end with '# EOF'"),
    (lambda s: s.replace('up{instance="n:9420",job="p"} 1 1700000005', 'up{instance="n:9420",job=p} 1 1700000005'),
     7, "not a sample line"),
    (lambda s: s.replace("# TYPE up gauge", "# TYPE up gauges"), 5, "unknown metric type 'gauges'"),
    (lambda s: s + "trailing 1 2\n", 9, "content after '# EOF'"),
])
def test_bad_replay_file_names_file_and_line(tmp_path: Path, mutate, line: int, reason: str) -> None:
    f = tmp_path / "bad.om"
    f.write_text(mutate(GOOD))
    with pytest.raises(InputError) as exc:
        ReplayDataset(f).open()
    msg = str(exc.value)
    assert msg.startswith(f"{f}:{line}: ") and reason in msg
    assert "promtool" in msg  # promtool's own words come along


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.om"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty.om:1: file is empty"):
        ReplayDataset(empty).open()
    with pytest.raises(InputError, match="no such replay file"):
        ReplayDataset(tmp_path / "missing.om").open()


def test_a_good_file_has_no_first_error(tmp_path: Path) -> None:
    f = tmp_path / "good.om"
    f.write_text(GOOD)
    assert find_first_error(f) is None


def test_split_points_fall_on_family_boundaries(tmp_path: Path) -> None:
    f = tmp_path / "fam.om"
    body = "".join(f"# TYPE m{k} gauge\n# HELP m{k} h\n" + "".join(f'm{k}{{a="{i}"}} {i} {100 + i}\n' for i in range(50))
                   for k in range(6))
    f.write_text(body + "# EOF\n")
    data = f.read_bytes()
    pts = split_points(f, 3)
    assert pts[0] == 0 and pts[-1] == data.rfind(b"# EOF") and len(pts) == 4
    for p in pts[1:-1]:
        assert data[p:p + 7] == b"# TYPE "


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    sc = Scenario("io-replay", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=300,
                  faults=[Fault("slowdown", rank=6, start_s=90, end_s=210, magnitude=0.3)])
    om, _, n = write_replay(sc, tmp_path_factory.mktemp("replay"))
    return om, n


def test_parallel_backfill_holds_the_same_samples(scenario_file) -> None:
    om, n = scenario_file
    snaps = {}
    for parts in (1, 3):
        with ReplayDataset(om, parts=parts) as ds:
            assert ds.samples == n
            src = PromSource(PromClient(PromConnection(ds.url)), 15.0, ["retrans_pkts"])
            snaps[parts] = list(src.snapshots(ds.min_time + 15, ds.max_time, 15.0))
            src.close()
    assert snaps[1] == snaps[3] and len(snaps[1]) == 20


def test_detect_replay_cli_prints_events_at_the_live_cadence(scenario_file, tmp_path: Path, capsys, caplog) -> None:
    om, _ = scenario_file
    cfg = tmp_path / "detector.toml"
    cfg.write_text("warmup_s = 30.0\n")
    events_file = tmp_path / "events.jsonl"
    caplog.set_level(logging.INFO, logger="rankwatch.detector")
    assert main(["detect", "--replay", str(om), "--config", str(cfg), "--events-file", str(events_file)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events == [json.loads(line) for line in events_file.read_text().splitlines()]
    strag = [e for e in events if e["kind"] == "straggler"]
    assert [(e["state"], e["rank"]) for e in strag] == [("firing", 6), ("resolved", 6)]
    # data time, on the live grid (multiples of the interval), inside the fault and after it
    assert all(e["time"] % 15 == 0 for e in events)
    assert 1_750_000_090 < strag[0]["time"] < 1_750_000_210 < strag[1]["time"]
    assert "evaluations from" in caplog.text and "samples" in caplog.text


def test_detect_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.om"
    bad.write_text(GOOD.replace(" 20 1700000005.000", " 20"))
    assert main(["detect", "--replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"rankwatch: error: {bad}:4: sample has no timestamp" in err and "Traceback" not in err
    cfg = tmp_path / "d.toml"
    cfg.write_text("z_threshold = -1\n")
    assert main(["detect", "--replay", str(bad), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "z_threshold" in err and str(cfg) in err
    assert main(["detect", "--prometheus", "http://127.0.0.1:1", "--start", "yesterday", "--end", "1"]) == 2
    assert "--start 'yesterday': expected RFC3339" in capsys.readouterr().err


def test_backtest_cli_against_a_prometheus(scenario_file, capsys) -> None:
    om, _ = scenario_file
    with ReplayDataset(om) as ds:
        assert main(["detect", "--prometheus", ds.url, "--start", "2025-06-15T15:06:40Z",
                     "--end", str(ds.max_time), "--window", "15", "--interval", "15"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # 2025-06-15T15:06:40Z is the file's first sample; the default warm-up is 60 s
    assert [(e["kind"], e["state"], e["rank"]) for e in events if e["kind"] == "straggler"] == \
           [("straggler", "firing", 6), ("straggler", "resolved", 6)]


# --- samples out of order (issue 15): said with a line number and a count, never silent ----------

def _family(lines: list[str]) -> str:
    return "# TYPE m gauge\n" + "".join(lines) + "# EOF\n"


def _others(n: int, t: int = 1000) -> list[str]:
    # enough samples of other series that promtool commits its batch (5 000) in between
    return [f'm{{s="b{i}"}} 1 {t}\n' for i in range(n)]


def test_one_sample_out_of_order_past_promtools_batch_is_dropped_and_named(tmp_path: Path, caplog) -> None:
    """On main promtool refused the whole file ("out of order sample", no line)."""
    f = tmp_path / "late.om"
    f.write_text(_family(['m{s="a"} 1 1000\n', *_others(6000), 'm{s="a"} 2 500\n', 'm{s="a"} 3 2000\n']))
    caplog.set_level(logging.WARNING)
    with ReplayDataset(f) as ds:
        assert ds.samples == 6002  # everything but the one late sample
        assert promql_value(ds.url, 'm{s="a"}', 2000) == 3.0
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert msg.startswith(f"{f}:6003: goes back in time") and "1 of 6003 samples" in msg


def test_samples_out_of_order_inside_a_batch_are_counted_not_silent(tmp_path: Path, caplog) -> None:
    """On main promtool dropped them without a word (17 552 of 18 780 loaded in the report)."""
    lines = []
    for k in range(50):  # every series' samples written newest first after the first two
        lines += [f'm{{s="c{i}"}} {k} {1000 + (k if k < 2 else 100 - k)}\n' for i in range(20)]
    f = tmp_path / "shuffled.om"
    f.write_text(_family(lines))
    caplog.set_level(logging.WARNING)
    with ReplayDataset(f) as ds:
        kept = ds.samples
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    n_dropped = 1000 - kept
    assert n_dropped > 0 and f"{n_dropped} of 1000 samples do not advance" in msg
    assert msg.startswith(f"{f}:62: goes back in time")  # k = 3, the first series


@pytest.mark.parametrize("gap", [0, 6000])
def test_conflicting_duplicate_refuses_the_file_naming_both_lines(tmp_path: Path, gap: int) -> None:
    """On main: refused without a line past a batch, kept one value silently within it."""
    f = tmp_path / "dup.om"
    f.write_text(_family(['m{s="a"} 1 1000\n', *_others(gap), 'm{s="a"} 2 1000\n']))
    with pytest.raises(InputError) as exc:
        ReplayDataset(f).open()
    msg = str(exc.value)
    assert msg.startswith(f"{f}:{gap + 3}: ") and "two different values" in msg and "line 2" in msg


def test_exact_repeats_are_dropped_and_the_detect_cli_says_so(tmp_path: Path, capsys, caplog) -> None:
    f = tmp_path / "repeat.om"
    f.write_text(GOOD.replace("# EOF\n", 'up{instance="n:9420",job="p"} 1 1700000005\n# EOF\n'))
    caplog.set_level(logging.WARNING)
    assert main(["detect", "--replay", str(f)]) == 0
    assert f"{f}:8: repeats its series' timestamp" in caplog.text and "1 of 5 samples" in caplog.text


def promql_value(url: str, expr: str, t: float) -> float:
    from rankwatch import promserver

    (row,) = promserver.query(url, expr, t)
    return float(row["value"][1])
