"""Property-based tests (hypothesis) of the replay reader against the real promtool: whatever the
order of the samples, what ``scan_samples`` says is what promtool loads; whatever a file's
mistakes, a file promtool refuses gets a line number from ``find_first_error``, and a file it
accepts gets none."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankwatch import promserver
from rankwatch.detectors.replay import MAX_BLOCK_DURATION, find_first_error, scan_samples, write_without

SERIES = ['m{s="a"}', 'm{s="b b"}', 'm{s="#c"}', "m", 'm{s="a",t="x"}']


def backfill(path: Path, tsdb: Path) -> tuple[int, str]:
    """(samples promtool loaded, its error or "")."""
    res = promserver.promtool("tsdb", "create-blocks-from", "openmetrics", f"--max-block-duration={MAX_BLOCK_DURATION}",
                              str(path), str(tsdb), timeout=120)
    if res.returncode != 0:
        return 0, (res.stderr or res.stdout).strip().splitlines()[-1]
    return sum(json.loads(m.read_text())["stats"]["numSamples"] for m in tsdb.glob("*/meta.json")), ""


_samples = st.lists(st.tuples(st.sampled_from(SERIES), st.sampled_from(["1", "2", "2.0", "NaN", "-3e2"]),
                              st.integers(1_000_000, 1_000_030), st.sampled_from(["", ".0001", ".0009", ".5"])),
                    min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_samples)
def test_what_the_order_check_says_is_what_promtool_loads(samples: list[tuple[str, str, int, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "x.om"
        lines = [f"{s} {v} {t}{frac}" for s, v, t, frac in samples]
        f.write_text("# TYPE m gauge\n" + "".join(line + "\n" for line in lines) + "# EOF\n")
        scan = scan_samples(f)
        assert scan.samples + (scan.conflict is not None) >= 1
        if scan.conflict is not None:
            line, earlier, _ = scan.conflict
            a, b = samples[earlier - 2], samples[line - 2]  # line 1 is the TYPE line
            assert a[0] == b[0] and int(float(f"{a[2]}{a[3]}") * 1000) == int(float(f"{b[2]}{b[3]}") * 1000)
            assert float(a[1]) != float(b[1]) and not (a[1] == b[1] == "NaN")
            return
        assert scan.samples == len(samples)
        clean = Path(tmp) / "clean.om"
        write_without(f, clean, scan.drop_lines)
        loaded, error = backfill(clean, Path(tmp) / "tsdb")
        assert error == "" and loaded == scan.samples - scan.dropped


_GOOD_LINES = [
    "# TYPE up gauge", "# HELP up Target answered.", 'up{instance="n:1",job="p"} 1 1700000000',
    'up{instance="n:1",job="p"} 0 1700000015.5', "# TYPE rankwatch_steps counter",
    'rankwatch_steps_total{run="r",rank="0"} 10 1700000000', 'rankwatch_steps_total{run="r",rank="0"} 12 1700000015',
]
_JUNK = st.sampled_from(['"', "{", "}", " ", "=", ",", "#", "\\", "x", "1", "e", "-", ".", "\t", "é", "NaN", "Inf"])


@st.composite
def mutated_files(draw: st.DrawFn) -> str:
    lines = list(_GOOD_LINES)
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(0, len(lines) - 1))
        line = lines[k]
        i = draw(st.integers(0, len(line)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(_JUNK)
        if op == "insert":
            line = line[:i] + junk + line[i:]
        elif op == "delete":
            line = line[:i] + line[i + 1:]
        else:
            line = line[:i] + junk + line[i + 1:]
        lines[k] = line
    return "\n".join(lines) + "\n# EOF\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_files())
def test_promtool_refuses_a_file_exactly_when_a_line_is_named(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "x.om"
        f.write_text(text, encoding="utf-8")
        _, error = backfill(f, Path(tmp) / "tsdb")
        where = find_first_error(f)
        if error:
            assert where is not None, f"promtool refused it ({error}) and no line was named"
        else:
            assert where is None, f"promtool accepted it but line {where} was called bad"
