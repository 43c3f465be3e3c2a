"""The demo's live view fits a small terminal and shows what matters: the newest events, the
flagged rank, the timeline's current slot."""

from __future__ import annotations

from rich.console import Console

from rankwatch.demo.scenario import DemoConfig, build_timeline
from rankwatch.demo.ui import RankScore, ViewState, event_line, render
from rankwatch.events import Event


def _state() -> ViewState:
    cfg = DemoConfig()
    tl = build_timeline(cfg)
    st = ViewState(title="32 nodes × 8 GPUs = 256 ranks (tp 8 × pp 4 × dp 8), run llama70b-cpt", timeline=tl, t0=1000.0,
                   tokens_per_s=8.2e6, baseline_tokens_per_s=8.4e6, step_seconds=0.61, targets_up=288,
                   targets_total=289, scrape_p99_ms=12.0)
    st.ranks = [RankScore(29, "node-03", "5", 9.7, True, 560.0)] + [
        RankScore(r, f"node-{r // 8:02d}", str(r % 8), 1.0 - r / 1000, False, 450.0) for r in range(40)]
    for i in range(30):
        st.events.append(Event(time=1000.0 + i, kind="gpu_fault", state="firing", run=None, rank=None, node="node-09",
                               gpu="1", score=1.0, summary=f"old event {i}"))
    st.events.append(Event(time=1050.0, kind="straggler", state="firing", run="llama70b-cpt", rank=29, node="node-03",
                           gpu="5", score=9.7, summary="Rank 29 is a straggler: compute 25 % slower than its peers"))
    return st


def _lines(width: int, height: int, now: float) -> list[str]:
    console = Console(width=width, height=height, record=True, force_terminal=False)
    console.print(render(_state(), now, width=width, height=height))
    return console.export_text().rstrip("\n").splitlines()


def test_view_fits_an_80x24_terminal_with_the_newest_event_the_straggler_and_the_current_slot() -> None:
    lines = _lines(80, 24, now=1060.0)
    assert len(lines) <= 24
    text = "\n".join(lines)
    assert "STRAGGLER" in text and "node-03" in text
    assert "Rank 29 is a straggler" in text  # newest event first, not cropped away
    assert "old event 0" not in text  # oldest events give way
    # t+60 s of the default timeline (warm-up 16 s, benign 20 s) is inside the thermal incident
    assert "GPU thermal throttling" in text  # the title, cropped to 80 columns
    assert "benign" not in text and "warm-up" not in text


def test_taller_terminal_shows_more_events() -> None:
    short = "\n".join(_lines(120, 24, now=1060.0)).count("old event")
    tall = "\n".join(_lines(120, 50, now=1060.0)).count("old event")
    assert tall > short >= 1


def test_plain_event_line_names_state_kind_and_entity() -> None:
    st = _state()
    line = event_line(st.events[-1], st.t0)
    assert line.startswith("[t+   50s] FIRING")
    assert "straggler" in line and "rank 29 (node-03 gpu 5)" in line
