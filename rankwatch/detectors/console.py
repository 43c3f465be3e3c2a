"""`--format text`: one readable line per detector event, for a person watching a terminal.

    2026-11-27T03:25:55Z FIRING   straggler   run=llama70b rank=37 node=p5-012 gpu=3  score=8.4  Rank 37 spends …

The line is plain text (safe to pipe and grep); on a terminal the state is coloured with rich,
which also honours NO_COLOR. The JSON lines stay the machine format (default, --events-file)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import IO

from rankwatch.events import Event

_STATE_STYLE = {"firing": "bold red", "resolved": "green"}
_SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def event_fields(e: Event) -> list[str]:
    """The ``key=value`` words that say where: run, rank, node, gpu, nic (those present)."""
    out = []
    for key in ("run", "rank", "node", "gpu", "nic"):
        v = getattr(e, key)
        if v is not None and v != "":
            out.append(f"{key}={_one_line(str(v))}")
    return out


def event_line(e: Event) -> str:
    """time, state, kind, where, severity and score, summary: one line, no markup."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.time))
    where = " ".join(event_fields(e)) or "run=?"
    return (f"{when} {e.state.upper():8s} {e.kind:15s} {where}  {e.severity} score={e.score:.1f}  "
            f"{_one_line(e.summary)}")


def text_renderer(stream: IO[str] | None) -> Callable[[Event], str]:
    """:func:`event_line`, with the state and severity coloured when ``stream`` is a terminal."""
    if stream is None or not getattr(stream, "isatty", lambda: False)():
        return event_line
    from rich.console import Console
    from rich.text import Text

    buf = io.StringIO()
    # The real terminal decides (NO_COLOR, TERM=dumb): rich looks at it, writes into the buffer.
    probe = Console(file=stream)
    if probe.no_color or probe.color_system is None:
        return event_line
    console = Console(file=buf, force_terminal=True, color_system=probe.color_system, width=1 << 16,
                      highlight=False, markup=False, emoji=False)

    def render(e: Event) -> str:
        line = event_line(e)
        text = Text(line)
        state_at = line.index(" ") + 1
        text.stylize(_STATE_STYLE.get(e.state, "bold"), state_at, state_at + len(e.state))
        sev_at = line.find(f"  {e.severity} score=")
        if sev_at >= 0:
            text.stylize(_SEVERITY_STYLE.get(e.severity, ""), sev_at + 2, sev_at + 2 + len(e.severity))
        buf.seek(0)
        buf.truncate()
        console.print(text, end="", soft_wrap=True)
        return buf.getvalue()

    return render
