"""Persistence and hysteresis: turns per-evaluation verdicts into episodes that fire once and
resolve once, with a stable id. One tracker per event kind; its state is plain JSON."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from rankwatch.events import Event


@dataclass
class Finding:
    """One subject's verdict at one evaluation (flagged or clean)."""

    key: str
    flagged: bool
    subject: dict[str, Any]  # run, rank, node, gpu, nic
    score: float
    summary: str  # what the firing event would say now
    resolved_summary: str  # what the resolved event would say now
    severity: str = "warning"
    evidence: dict[str, Any] = field(default_factory=dict)
    persist: int | None = None  # overrides the tracker's persistence for this finding
    resolve: int | None = None


def episode_id(kind: str, key: str, since: float) -> str:
    digest = hashlib.sha1(f"{kind}|{key}|{since:.3f}".encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


class EpisodeTracker:
    """Counts consecutive flagged / clean / missing evaluations per subject key."""

    def __init__(self, kind: str, persist: int, resolve: int, missing_resolve: int) -> None:
        self.kind = kind
        self.persist = persist
        self.resolve = resolve
        self.missing_resolve = missing_resolve
        self.state: dict[str, dict[str, Any]] = {}

    @property
    def open_keys(self) -> set[str]:
        return {k for k, s in self.state.items() if s.get("episode")}

    def open_episodes(self) -> dict[str, dict[str, Any]]:
        return {k: s for k, s in self.state.items() if s.get("episode")}

    def update(self, time: float, findings: list[Finding]) -> list[Event]:
        events: list[Event] = []
        seen: set[str] = set()
        for f in findings:
            seen.add(f.key)
            st = self.state.setdefault(f.key, {"flag_run": 0, "clean_run": 0, "missing_run": 0, "episode": None})
            st["missing_run"] = 0
            persist = f.persist or self.persist
            resolve = f.resolve or self.resolve
            if f.flagged:
                st["flag_run"] += 1
                st["clean_run"] = 0
                if st["flag_run"] == 1:
                    st["onset"] = time
                if not st["episode"] and st["flag_run"] >= persist:
                    st["episode"] = episode_id(self.kind, f.key, time)
                    st["since"] = time
                    st["subject"] = f.subject
                    st["severity"] = f.severity
                    st["summary"] = f.summary
                    ev = dict(f.evidence)
                    ev.setdefault("flagged_evaluations", st["flag_run"])
                    ev.setdefault("first_flagged_time", st.get("onset", time))
                    events.append(self._event(time, "firing", st, f.score, f.summary, ev))
                if st["episode"]:
                    st["last_evidence"] = f.evidence
                    st["last_score"] = f.score
            else:
                st["clean_run"] += 1
                st["flag_run"] = 0
                if st["episode"] and st["clean_run"] >= resolve:
                    ev = dict(f.evidence)
                    ev["duration_s"] = time - st["since"]
                    events.append(self._event(time, "resolved", st, f.score, f.resolved_summary, ev))
                    self.state[f.key] = {"flag_run": 0, "clean_run": st["clean_run"], "missing_run": 0, "episode": None}
        for key in list(self.state):
            if key in seen:
                continue
            st = self.state[key]
            if not st["episode"]:
                # nothing open: forget it so state stays bounded by the live subjects
                del self.state[key]
                continue
            st["missing_run"] += 1
            if st["missing_run"] >= self.missing_resolve:
                subj = st.get("subject", {})
                what = _describe(subj)
                ev = {"reason": "no data", "missing_evaluations": st["missing_run"], "duration_s": time - st["since"]}
                events.append(self._event(time, "resolved", st, 0.0, f"{what}: no more data, episode closed.", ev))
                del self.state[key]
        return events

    def _event(self, time: float, state: str, st: dict[str, Any], score: float, summary: str,
               evidence: dict[str, Any]) -> Event:
        subj = st.get("subject", {})
        return Event(
            time=time, kind=self.kind, state=state, run=subj.get("run"), rank=subj.get("rank"),
            node=subj.get("node"), gpu=subj.get("gpu"), nic=subj.get("nic"), score=round(float(score), 4),
            summary=summary, evidence=evidence, episode=st["episode"], severity=st.get("severity", "warning"),
            since=st.get("since"),
        )

    def export(self) -> dict[str, Any]:
        return {"state": self.state}

    def load(self, data: dict[str, Any]) -> None:
        self.state = {str(k): dict(v) for k, v in data.get("state", {}).items()}


def _describe(subject: dict[str, Any]) -> str:
    parts = []
    if subject.get("run") is not None:
        parts.append(f"run {subject['run']}")
    if subject.get("rank") is not None:
        parts.append(f"rank {subject['rank']}")
    if subject.get("node") is not None:
        parts.append(f"node {subject['node']}")
    if subject.get("gpu") is not None:
        parts.append(f"GPU {subject['gpu']}")
    return ", ".join(parts).capitalize() or "subject"
