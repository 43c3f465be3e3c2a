"""Detector events: the one record every part agrees on (detector → notifiers, replay output,
demo report). Schema in DESIGN.md: one JSON object per line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

EventKind = Literal["straggler", "gpu_fault", "network", "hang", "throughput_drop", "data_gap"]
EventState = Literal["firing", "resolved"]


@dataclass(frozen=True)
class Event:
    time: float  # Unix s of the evaluation that decided it (data time in replay/backtest)
    kind: str
    state: str
    run: str | None
    rank: int | None
    node: str | None
    gpu: str | None
    score: float
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    # Stable across the firing and resolved events of one episode: notifiers thread on it.
    episode: str = ""
    severity: str = "warning"  # "info" | "warning" | "critical"
    nic: str | None = None
    since: float | None = None  # Unix s the episode started firing

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False, separators=(",", ":"), default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, line: str) -> Event:
        return cls.from_dict(json.loads(line))


def _json_default(obj: Any) -> Any:
    # numpy scalars in evidence
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class EventSink(Protocol):
    """Where the detector hands its events after each evaluation cycle. Notifiers implement it.

    ``publish`` must not raise for delivery failures: a sink that cannot deliver keeps the
    event (outbox) and retries; the detector keeps cycling regardless."""

    def publish(self, events: Sequence[Event]) -> None: ...

    def close(self) -> None: ...
