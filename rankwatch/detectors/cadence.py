"""Windows and evaluation interval that follow the data's sample spacing.

The detector does not choose the scrape interval; the user's Prometheus does, and probes and
node exporters may be scraped at different ones. Each source's spacing is learned from the data
(``PromSource.sample_spacing``: the median over its series of each series' mean time between
samples) and the plan follows it:

* evaluation interval ``I = max(interval_s, probe spacing)``: evaluating more often than the
  probes are scraped only repeats verdicts on the same samples;
* window of each source ``W = max(window_s, I + spacing, 3 * spacing)``: ``I + spacing`` makes
  consecutive windows share no increment and lose none (each scrape-to-scrape increase lands
  in exactly one window's rate), and three samples keep a rate when one scrape is late or lost.

``interval_s`` and ``window_s`` are floors. One set explicitly (config file or command line)
that the data makes too short is raised, with a warning that names it: never silence, never
a window that holds one sample. Before any data exists the plan is the configured values.

Pure functions plus ``Cadence``, the small stateful part the live loop and replay share."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from rankwatch.detectors.config import DetectorConfig

log = logging.getLogger(__name__)

MIN_WINDOW_SAMPLES = 3
# Re-learn the spacing this often (data time) once known; while unknown, every evaluation. Two
# one-number queries: cheap enough to follow a change (or correct a first measurement taken
# from a job's first samples) within two minutes.
RELEARN_S = 120.0
# A newly measured spacing replaces the current one only when it differs by more than this
# fraction (a missed scrape or jitter must not re-plan the windows).
SPACING_HYSTERESIS = 0.1


def quantize_spacing(seconds: float) -> float:
    """Two significant digits: 14.997 -> 15, 0.5003 -> 0.5, 59.6 -> 60 (scrape intervals are
    round numbers; the measured mean carries millisecond jitter and the odd missed scrape)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"spacing must be a positive number, got {seconds!r}")
    return float(f"{seconds:.2g}")


@dataclass(frozen=True)
class Spacing:
    """Sample spacing in seconds of the probes' and of the node exporters' series (None: not
    known yet — the source has no series with enough history)."""

    probe_s: float | None = None
    node_s: float | None = None

    def describe(self) -> str:
        def one(v: float | None) -> str:
            return "unknown" if v is None else f"{v:g} s"
        return f"probe scrape {one(self.probe_s)}, node scrape {one(self.node_s)}"


@dataclass(frozen=True)
class WindowPlan:
    interval_s: float  # seconds between evaluations
    window_s: float  # window of the probes' (per-rank) rates
    node_window_s: float  # window of the node exporters' (GPU, EFA) rates and increases
    spacing: Spacing = Spacing()
    # Explicit settings the data made too short, one sentence each (logged as warnings).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        win = f"window {self.window_s:g} s" if self.window_s == self.node_window_s else \
            f"window {self.window_s:g} s (node {self.node_window_s:g} s)"
        return f"{self.spacing.describe()}; {win}; evaluating every {self.interval_s:g} s"


def plan_windows(cfg: DetectorConfig, spacing: Spacing, explicit: Collection[str] = ()) -> WindowPlan:
    """The plan for ``spacing``. ``explicit``: the settings the user gave (``interval_s``,
    ``window_s``); only those get a warning when raised."""
    warnings: list[str] = []
    interval = cfg.interval_s
    drive = spacing.probe_s if spacing.probe_s is not None else spacing.node_s
    if drive is not None and interval < drive:
        if "interval_s" in explicit:
            warnings.append(
                f"interval_s = {interval:g} s is shorter than the {'probes' if spacing.probe_s else 'node exporters'}' "
                f"scrape interval ({drive:g} s): evaluations in between would judge the same samples again; "
                f"evaluating every {drive:g} s")
        interval = drive

    def window(s: float | None, what: str) -> float:
        if s is None:
            return cfg.window_s
        need = max(interval + s, MIN_WINDOW_SAMPLES * s)
        if cfg.window_s >= need:
            return cfg.window_s
        if "window_s" in explicit:
            samples = int(cfg.window_s / s + 1e-9)
            why = ("rate() and increase() see nothing" if samples < 2 else
                   "one late scrape leaves it empty" if samples < MIN_WINDOW_SAMPLES else
                   "the increase between one window and the next would be lost")
            warnings.append(
                f"window_s = {cfg.window_s:g} s holds {samples} sample{'s' if samples != 1 else ''} of the {what} "
                f"(scraped every {s:g} s, evaluated every {interval:g} s): {why}; using {need:g} s for the {what}")
        return need

    return WindowPlan(interval_s=interval, window_s=window(spacing.probe_s, "probes"),
                      node_window_s=window(spacing.node_s, "node exporters"), spacing=spacing,
                      warnings=tuple(warnings))


def _settle(old: float | None, new: float | None) -> float | None:
    """Keep the current spacing unless the new measurement differs by more than the hysteresis;
    a source that shows no series now keeps the spacing it had."""
    if new is None:
        return old
    new = quantize_spacing(new)
    if old is not None and abs(new - old) <= SPACING_HYSTERESIS * old:
        return old
    return new


class Cadence:
    """The current plan, re-learned from the data: every evaluation while a source's spacing is
    unknown, every ``relearn_s`` of data time once it is. ``learn(t)`` returns the spacing
    measured at ``t`` ({"probe": s, "node": s}); the live loop passes the source's instant
    measurement, replay its measurement over the whole range (``fix``)."""

    def __init__(self, cfg: DetectorConfig, learn: Callable[[float], dict[str, float | None]] | None = None,
                 explicit: Collection[str] = (), relearn_s: float = RELEARN_S) -> None:
        self.cfg = cfg
        self.explicit = frozenset(explicit)
        self.learn = learn
        self.relearn_s = relearn_s
        self.spacing = Spacing()
        self.plan = plan_windows(cfg, self.spacing, self.explicit)
        self._learned_at: float | None = None
        self._warned: set[str] = set()

    def _due(self, t: float) -> bool:
        if self.learn is None:
            return False
        if self.spacing.probe_s is None or self.spacing.node_s is None or self._learned_at is None:
            return True
        return t - self._learned_at >= self.relearn_s or t < self._learned_at

    def update(self, t: float) -> bool:
        """Learn the spacing at data time ``t`` if due; True when the plan changed."""
        if not self._due(t):
            return False
        assert self.learn is not None
        measured = self.learn(t)
        self._learned_at = t
        return self.fix(measured)

    def fix(self, measured: dict[str, float | None]) -> bool:
        """Adopt a measured spacing ({"probe": s, "node": s}); True when the plan changed."""
        spacing = Spacing(_settle(self.spacing.probe_s, measured.get("probe")),
                          _settle(self.spacing.node_s, measured.get("node")))
        if spacing == self.spacing:
            return False
        old = self.plan
        self.spacing = spacing
        self.plan = plan_windows(self.cfg, spacing, self.explicit)
        for w in self.plan.warnings:
            if w not in self._warned:  # once per distinct problem, not once per re-learn
                self._warned.add(w)
                log.warning("%s", w)
        if self.plan == old:
            return False
        log.info("sample spacing: %s", self.plan.describe())
        return True
