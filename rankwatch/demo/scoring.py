"""Judge the detector against the demo's script: for each incident, when it was injected, when
the first matching event fired, the delay, and whether the kind and entity were right; every
firing event that no incident explains is a false alarm. Pure functions over plain data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rankwatch.events import Event


@dataclass(frozen=True)
class Expect:
    """An event the detector should (or may) raise: ``kind`` plus the entity fields that must
    match (None = any value)."""

    kind: str
    rank: int | None = None
    node: str | None = None
    gpu: str | None = None
    ranks: frozenset[int] | None = None  # any of these ranks (e.g. every rank of a node)

    def matches(self, ev: Event) -> bool:
        if ev.kind != self.kind:
            return False
        if self.rank is not None and ev.rank != self.rank:
            return False
        if self.ranks is not None and ev.rank not in self.ranks:
            return False
        if self.node is not None and ev.node != self.node:
            return False
        return self.gpu is None or (ev.gpu is not None and str(ev.gpu) == str(self.gpu))

    def describe(self) -> str:
        parts = [self.kind]
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.node is not None:
            parts.append(self.node)
        if self.gpu is not None:
            parts.append(f"gpu {self.gpu}")
        if self.ranks is not None:
            parts.append(f"a rank of {len(self.ranks)}")
        return " ".join(parts)


@dataclass(frozen=True)
class Incident:
    """One scripted fault: active on [start, end) in Unix seconds.

    ``required``: every one must fire for the verdict to be correct (the right kind on the right
    entity). ``allowed``: consequences that are not false alarms (a throttled GPU's own
    gpu_fault event, the throughput drop a straggler causes)."""

    name: str
    title: str
    start: float
    end: float
    required: tuple[Expect, ...]
    allowed: tuple[Expect, ...] = ()
    benign: bool = False  # noise that must raise nothing


@dataclass
class IncidentResult:
    incident: Incident
    detected_at: float | None
    matched: list[Event] = field(default_factory=list)
    missing: list[Expect] = field(default_factory=list)
    wrong: list[Event] = field(default_factory=list)  # fired during the slot, explained by nothing

    @property
    def delay(self) -> float | None:
        return None if self.detected_at is None else self.detected_at - self.incident.start

    @property
    def correct(self) -> bool:
        # A benign slot is right when it raised nothing; an incident when every required event
        # fired (a wrong event elsewhere is counted as a false alarm, not against this row).
        if self.incident.benign:
            return not self.wrong
        return not self.missing


@dataclass
class Verdict:
    results: list[IncidentResult]
    false_alarms: list[Event]

    @property
    def all_correct(self) -> bool:
        return all(r.correct for r in self.results) and not self.false_alarms


def judge(incidents: Sequence[Incident], events: Iterable[Event], *, grace: float) -> Verdict:
    """Match firing events to incidents.

    An event explains itself by an incident when it fired inside [start, end + grace) (the
    detector needs a window to see a change and to see it go) and matches one of that incident's
    required or allowed expectations. Resolved events never count: they close an episode."""
    firing = sorted((e for e in events if e.state == "firing"), key=lambda e: e.time)
    results = [IncidentResult(inc, None) for inc in incidents]
    explained: set[int] = set()
    for res in results:
        inc = res.incident
        in_slot = [e for e in firing if inc.start <= e.time < inc.end + grace]
        for exp in inc.required:
            hits = [e for e in in_slot if exp.matches(e)]
            if not hits:
                res.missing.append(exp)
                continue
            res.matched.extend(hits)
            explained.update(id(e) for e in hits)
        for exp in inc.allowed:
            hits = [e for e in in_slot if exp.matches(e)]
            res.matched.extend(h for h in hits if id(h) not in {id(m) for m in res.matched})
            explained.update(id(e) for e in hits)
        required_hits = [e for e in res.matched if any(x.matches(e) for x in inc.required)]
        if required_hits:
            res.detected_at = min(e.time for e in required_hits)
        res.matched.sort(key=lambda e: e.time)
    false_alarms = [e for e in firing if id(e) not in explained]
    # Attribute each false alarm to the slot it fired in, so the table shows where it came from.
    for res in results:
        inc = res.incident
        res.wrong = [e for e in false_alarms if inc.start <= e.time < inc.end]
    return Verdict(results, false_alarms)


def entity_of(ev: Event) -> str:
    """Short human form of an event's entity: ``rank 29 (node-03 gpu 5)``."""
    bits: list[str] = []
    if ev.rank is not None:
        bits.append(f"rank {ev.rank}")
    where = " ".join(x for x in (ev.node or "", f"gpu {ev.gpu}" if ev.gpu is not None else "",
                                 ev.nic or "") if x)
    if where:
        bits.append(f"({where})" if bits else where)
    if not bits:
        bits.append(f"run {ev.run}" if ev.run else "cluster")
    return " ".join(bits)
