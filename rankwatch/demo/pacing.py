"""When each slot of the demo's timeline ends: not on the clock alone, but when the detector
has seen what the slot is for. A slot lasts at least its scripted length; an incident then
lasts until every required event has fired, a recovery until the job is back to normal (its
straggler, network, hang and throughput episodes resolved),
and every slot until the detector's evaluations have caught up with it. A busy machine makes
the demo longer, never wrong. Pure logic over plain data; the runner feeds it and publishes
``starts`` to the cluster workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rankwatch.demo.scenario import DemoConfig, Timeline, expected_incidents
from rankwatch.events import Event

# A slot ends anyway, and the judge reports what the detector missed, once the detector has
# evaluated ``patience_s`` of data past the slot's scripted end without what the slot waits for,
# or, should the detector stop evaluating, this long (or 4 times the slot) past that end.
HOLD_LIMIT_S = 120.0


# What a recovery waits for: the job back to normal. A GPU's own fault may rightly stay open
# (a GPU that fell off the bus keeps failing its health check until it is reset, as in DCGM).
JOB_KINDS = frozenset({"straggler", "network", "hang", "throughput_drop"})


def open_episodes(events: Sequence[Event], kinds: frozenset[str] = JOB_KINDS) -> list[Event]:
    """The firing event of every episode of ``kinds`` that has not resolved."""
    last: dict[object, Event] = {}
    for e in sorted(events, key=lambda e: e.time):
        if e.kind in kinds:
            last[e.episode or (e.kind, e.run, e.rank, e.node, e.gpu, e.nic)] = e
    return [e for e in last.values() if e.state == "firing"]


@dataclass
class Pacer:
    """Decides when the running slot ends. Times are seconds after the timeline's start (t0).

    ``lag_s``: how far the detector's evaluated data time may trail a slot's scripted end and
    still count as caught up (one evaluation interval plus its query delay). ``patience_s``:
    data past a slot's scripted end that the detector may evaluate before the slot gives up
    waiting. ``lead_s``: a new slot begins this long after it is decided, so that every worker
    has read the schedule before it takes effect."""

    cfg: DemoConfig
    timeline: Timeline
    t0: float
    lag_s: float
    patience_s: float
    lead_s: float = 1.0
    starts: list[float] = field(default_factory=lambda: [0.0])
    end: float | None = None
    held: dict[str, str] = field(default_factory=dict)  # slot -> what it waited for beyond its length

    @property
    def running(self) -> int:
        return len(self.starts) - 1

    def limit(self, i: int) -> float:
        nominal = self.timeline.nominal_seconds(i)
        return nominal + max(HOLD_LIMIT_S, 4 * nominal)

    def waiting_for(self, now: float, events: Sequence[Event], evaluated: float | None) -> str | None:
        """What the running slot still waits for at ``now``, or None when it may end."""
        i = self.running
        name = self.timeline.slots[i][0]
        start, nominal = self.starts[i], self.timeline.nominal_seconds(i)
        last = i == len(self.timeline.slots) - 1
        if now + (0.0 if last else self.lead_s) < start + nominal:
            return "its scripted length"
        if name in {f.name for f in self.timeline.faults}:
            inc = next(x for x in expected_incidents(self.cfg, self.timeline.placed(self.starts), self.t0)
                       if x.name == name)
            fired = [e for e in events if e.state == "firing" and e.time >= inc.start]
            missing = [x for x in inc.required if not any(x.matches(e) for e in fired)]
            if missing:
                return "the detector to name it: " + ", ".join(x.describe() for x in missing)
            return None
        if evaluated is None or evaluated < start + nominal - self.lag_s:
            return "the detector's evaluations to catch up"
        if name.startswith("recover") or last:
            still = open_episodes(events)
            if still:
                return "open episodes to resolve: " + ", ".join(sorted({e.kind for e in still}))
        return None

    def advance(self, now: float, events: Sequence[Event], evaluated: float | None) -> bool:
        """End the running slot if it may end at ``now``; True when ``starts`` or ``end`` changed."""
        if self.end is not None:
            return False
        i = self.running
        reason = self.waiting_for(now, events, evaluated)
        start, nominal = self.starts[i], self.timeline.nominal_seconds(i)
        over = now >= start + self.limit(i) or (
            evaluated is not None and evaluated >= start + nominal + self.patience_s)
        if reason is not None and not over:
            if now >= start + nominal and reason != "its scripted length":
                self.held[self.timeline.slots[i][0]] = reason
            return False
        if over and reason is not None:
            self.held[self.timeline.slots[i][0]] = f"gave up after {now - start:.0f} s waiting for {reason}"
        if i == len(self.timeline.slots) - 1:
            self.end = now
        else:
            self.starts.append(max(start + nominal, now + self.lead_s))
        return True

    def played(self) -> Timeline:
        """The timeline as played so far (the whole of it once ``end`` is set)."""
        return self.timeline.placed(self.starts, end=self.end)

    def projected(self, now: float) -> Timeline:
        """For display: what was played, the running slot, and the rest at scripted lengths."""
        return self.timeline.placed(self.starts, end=self.end, now=now)
