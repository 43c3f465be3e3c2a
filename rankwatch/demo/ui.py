"""The demo's terminal view (rich): throughput, ranks by straggler score, events as they fire
and resolve, and a progress line for the scripted timeline. ``render`` is a pure function of
``ViewState``; the runner owns the refresh loop."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rankwatch.demo.scenario import Timeline
from rankwatch.demo.scoring import entity_of
from rankwatch.events import Event


@dataclass
class RankScore:
    rank: int
    node: str
    gpu: str
    score: float
    flagged: bool
    compute_ms: float | None = None


@dataclass
class ViewState:
    title: str
    timeline: Timeline
    t0: float
    tokens_per_s: float | None = None
    step_seconds: float | None = None
    baseline_tokens_per_s: float | None = None
    ranks: list[RankScore] = field(default_factory=list)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=40))
    targets_up: int | None = None
    targets_total: int | None = None
    scrape_p99_ms: float | None = None
    status: str = ""

    def slot_at(self, now: float) -> tuple[str, str, float, float] | None:
        off = now - self.t0
        for slot in self.timeline.slots:
            if slot[2] <= off < slot[3]:
                return slot
        return None


def slot_title(state: ViewState, now: float) -> str:
    slot = state.slot_at(now)
    if slot:
        return slot[1]
    return "starting" if now < state.t0 else "finishing"


_KIND_STYLE = {"straggler": "yellow", "gpu_fault": "red", "network": "magenta", "hang": "bold red",
               "throughput_drop": "cyan"}


def _progress(state: ViewState, now: float, width: int) -> Text:
    total = state.timeline.total_seconds
    off = max(0.0, min(total, now - state.t0))
    text = Text(no_wrap=True, overflow="ellipsis")
    for name, _title, start, end in state.timeline.slots:
        cells = max(1, round((end - start) / total * width))
        done = max(0, min(cells, round((off - start) / (end - start) * cells))) if end > start else 0
        healthy = name in ("warmup", "benign") or name.startswith("recover")
        label = {"warmup": "w", "benign": "b"}.get(name, "·" if name.startswith("recover") else name[0].upper())
        text.append(label * done, style="bold green" if healthy else "bold red")
        text.append("─" * (cells - done), style="dim")
    text.append(f" {off:4.0f}/{total:.0f}s ")
    text.append(slot_title(state, now), style="bold")
    return text


def _throughput(state: ViewState) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if state.tokens_per_s is None:
        t.append("throughput: waiting for data", style="dim")
        return t
    t.append("throughput ", style="bold")
    t.append(f"{state.tokens_per_s / 1e3:,.0f} k tok/s", style="bold green")
    if state.baseline_tokens_per_s:
        ratio = state.tokens_per_s / state.baseline_tokens_per_s
        style = "green" if ratio > 0.97 else "yellow" if ratio > 0.5 else "bold red"
        t.append(f" ({ratio:4.0%} of healthy)", style=style)
    if state.step_seconds is not None:
        t.append(f"  step {state.step_seconds * 1e3:4.0f} ms")
    if state.targets_total:
        t.append(f"  targets up {state.targets_up}/{state.targets_total}")
    if state.scrape_p99_ms is not None:
        t.append(f"  scrape p99 {state.scrape_p99_ms:4.0f} ms")
    return t


def _ranks_table(state: ViewState, rows: int) -> Table:
    table = Table(title="ranks by straggler score (detector)", expand=True, title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    for col, just in (("rank", "right"), ("node", "left"), ("gpu", "right"), ("score", "right"),
                      ("compute/step", "right"), ("", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in state.ranks[:rows]:
        style = "bold red" if r.flagged else ("yellow" if r.score >= 3 else "")
        table.add_row(str(r.rank), r.node, r.gpu, f"{r.score:6.1f}",
                      "" if r.compute_ms is None else f"{r.compute_ms:6.0f} ms",
                      "STRAGGLER" if r.flagged else "", style=style)
    if not state.ranks:
        table.add_row("", "waiting for the detector", "", "", "", "")
    return table


def _events_table(state: ViewState, rows: int) -> Table:
    table = Table(title="events (newest first)", expand=True, title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), show_edge=False)
    table.add_column("t+s", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("where", no_wrap=True)
    table.add_column("summary", ratio=1, overflow="ellipsis", no_wrap=True)
    for ev in list(state.events)[::-1][:rows]:
        style = _KIND_STYLE.get(ev.kind, "")
        st = Text("FIRING", style="bold red") if ev.state == "firing" else Text("resolved", style="green")
        table.add_row(f"{ev.time - state.t0:4.0f}", st, Text(ev.kind, style=style), entity_of(ev), ev.summary)
    if not state.events:
        table.add_row("", "", "", "", Text("no events yet: a healthy job raises none", style="dim"))
    return table


def render(state: ViewState, now: float | None = None, *, width: int = 100, height: int = 40) -> RenderableType:
    """The whole view, sized to fit ``height`` lines (rich crops whatever does not fit)."""
    now = time.time() if now is None else now
    title = Text(state.title, no_wrap=True, overflow="ellipsis", style="bold")
    header = Group(title, _progress(state, now, max(20, min(60, width - 45))), _throughput(state))
    # header panel 5 lines; each table: title + header + rule = 3 lines; status 1 line
    spare = max(6, height - 5 - 6 - (1 if state.status else 0) - 1)
    rank_rows = max(3, min(8, spare // 3))
    event_rows = max(3, spare - rank_rows)
    parts: list[RenderableType] = [Panel(header, title="rankwatch demo", border_style="blue", padding=(0, 1)),
                                   _ranks_table(state, rank_rows), _events_table(state, event_rows)]
    if state.status:
        parts.append(Text(state.status, style="dim", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def event_line(ev: Event, t0: float) -> str:
    """One plain line per event for non-interactive output (CI logs, pipes)."""
    return f"[t+{ev.time - t0:5.0f}s] {ev.state.upper():8s} {ev.kind:15s} {entity_of(ev)}: {ev.summary}"
