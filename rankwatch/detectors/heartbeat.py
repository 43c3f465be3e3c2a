"""The live detector's heartbeat: one status line every N cycles, so that someone watching
`rankwatch detector` sees it is alive and what it sees between events.

Pure: :func:`heartbeat` reads one cycle's result (its Snapshot) and the core's scores and open
episodes; :class:`HeartbeatLog` decides when to log. Nothing here queries anything."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rankwatch.detectors.model import Snapshot

log = logging.getLogger("rankwatch.detector.heartbeat")

# Once a minute at the default 15 s interval.
DEFAULT_HEARTBEAT_CYCLES = 4


@dataclass(frozen=True)
class Heartbeat:
    time: float  # data time of the cycle
    cycle: int  # cycles run by this process, this one included
    ranks: int  # ranks whose probe answered
    gpus: int  # GPUs whose series were in the evaluation
    nics: int  # EFA ports with counters
    open_episodes: Mapping[str, int]  # kind -> episodes firing now
    worst: tuple[str, int, float] | None  # (run, rank, score) of the highest straggler score
    errors: int  # queries that failed this cycle
    duration_s: float  # how long the cycle took

    def line(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        n_open = sum(self.open_episodes.values())
        parts = [f"heartbeat {when} cycle {self.cycle}",
                 f"data from {self.ranks} rank{_s(self.ranks)}, {self.gpus} GPU{_s(self.gpus)}, "
                 f"{self.nics} NIC{_s(self.nics)}"]
        if n_open:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.open_episodes.items()) if n)
            parts.append(f"{n_open} open episode{_s(n_open)} ({kinds})")
        else:
            parts.append("no open episode")
        if self.worst is not None:
            run, rank, score = self.worst
            parts.append(f"worst score {score:.1f} (rank {rank} of {run})")
        else:
            parts.append("no rank scored")
        if self.errors:
            parts.append(f"{self.errors} quer{'y' if self.errors == 1 else 'ies'} failed")
        parts.append(f"cycle took {self.duration_s * 1e3:.0f} ms")
        return "; ".join(parts)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def heartbeat(snapshot: Snapshot | None, core: Any, *, cycle: int, duration_s: float,
              errors: int = 0, t: float | None = None) -> Heartbeat:
    """The status after one cycle. ``core``: anything with ``scores`` ({(run, rank): score}) and,
    optionally, ``trackers`` ({kind: EpisodeTracker}); a failed cycle has no snapshot."""
    if snapshot is not None:
        ranks = sum(1 for r in snapshot.ranks if r.up)
        gpus = sum(1 for g in snapshot.gpus if g.present)
        nics = len(snapshot.nics)
        t = snapshot.time
    else:
        ranks = gpus = nics = 0
    scores: Mapping[tuple[str, int], float] = getattr(core, "scores", {}) or {}
    worst = None
    if scores and snapshot is not None:  # after a failed cycle the scores are the previous cycle's
        (run, rank), score = max(scores.items(), key=lambda kv: kv[1])
        worst = (str(run), int(rank), float(score))
    trackers = getattr(core, "trackers", {}) or {}
    open_eps = {kind: len(tr.open_episodes()) for kind, tr in trackers.items()}
    return Heartbeat(time=float(t or 0.0), cycle=cycle, ranks=ranks, gpus=gpus, nics=nics, open_episodes=open_eps,
                     worst=worst, errors=errors, duration_s=duration_s)


class HeartbeatLog:
    """Call once per cycle; logs the heartbeat on the first cycle and every ``every`` cycles
    after it (``every`` = 0: never)."""

    def __init__(self, core: Any, every: int = DEFAULT_HEARTBEAT_CYCLES, logger: logging.Logger = log) -> None:
        if every < 0:
            raise ValueError(f"heartbeat every {every} cycles: must be >= 0")
        self.core = core
        self.every = every
        self.logger = logger
        self.cycles = 0

    def __call__(self, result: Any) -> Heartbeat | None:
        """``result``: the service's CycleResult (snapshot, errors, duration_s, time)."""
        self.cycles += 1
        if not self.every or (self.cycles - 1) % self.every:
            return None
        hb = heartbeat(getattr(result, "snapshot", None), self.core, cycle=self.cycles,
                       duration_s=result.duration_s, errors=len(result.errors), t=result.time)
        self.logger.info("%s", hb.line())
        return hb
