"""Detector configuration: every threshold in one frozen dataclass, loaded from TOML.

A bad key or value is a ``ConfigError`` that names the key and the file. Top-level tables owned
by the alerting side ([slack], [wandb], [alertmanager], [notify], [links]) are left alone here.
Keys may be given flat at top level or inside a ``[detector]`` table."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rankwatch import xids
from rankwatch.errors import ConfigError

# Tables that belong to other parts of rankwatch (alerting, links in notifications).
FOREIGN_TABLES = frozenset({"slack", "wandb", "alertmanager", "notify", "links"})

# XIDs raised as critical: the FAIL class of the one XID table (rankwatch.xids)
CRITICAL_XIDS_DEFAULT = xids.codes(xids.FAIL)
# The sequential test's charts (docs/detector.md): small, medium and large stragglers.
CUSUM_SLOWDOWNS_DEFAULT = (0.06, 0.2, 0.3)
# Seconds of excess each chart needs beyond its noise term: the medium and large charts sit
# above what a +50 % spike of 15 s leaves in them when it straddles two windows (the only
# way it passes their minimum duration; once a minute, the drift empties them in between);
# the small chart's cap and minimum duration keep such a spike out of it.
CUSUM_THRESHOLDS_DEFAULT = (0.0, 3.3, 4.5)
# How long each chart must have risen without a break before it may fire: longer than a
# benign 15 s transient for the small and medium charts; the large chart's threshold is.
CUSUM_MIN_DURATION_DEFAULT = (45.0, 30.0, 15.0)
# retrans_bytes is left out: it is a byte count of the same events retrans_pkts counts.
EFA_ERROR_COUNTERS_DEFAULT = (
    "retrans_pkts",
    "retrans_timeout_events",
    "unresponsive_remote_events",
    "impaired_remote_conn_events",
    "rx_drops",
)


@dataclass(frozen=True)
class DetectorConfig:
    """All detector thresholds. Times are data time (seconds), never the wall clock.

    Defaults are chosen so that, at a 15 s scrape, a 50 % straggler fires within about 30 s,
    20 % within a minute and 5 % within about five minutes, while a +50 % spike of 15 s (even
    once a minute), GC pauses, eval/checkpoint steps, warm-up and pipeline-stage imbalance
    raise nothing (see docs/detector.md and BENCHMARKS.md, detector section)."""

    # --- cadence -------------------------------------------------------------------------
    # Both are floors: the detector learns each source's sample spacing from the data and
    # evaluates at most once per probe scrape, over windows of at least interval + spacing and
    # three samples (detectors/cadence.py). A value set here that the data makes too short is
    # raised, with a warning.
    interval_s: float = 15.0  # seconds between evaluations
    window_s: float = 15.0  # per-window quantities are rates over this many seconds

    # --- coverage ------------------------------------------------------------------------
    # A hole in the coverage (ranks of a live run without data, a silent node exporter under
    # a live run, failing queries) that lasts this long (data time) raises a data_gap event.
    gap_min_s: float = 120.0

    # --- stragglers ----------------------------------------------------------------------
    z_threshold: float = 3.5  # modified z-score (median/MAD, MAD scaled to sigma) to flag a rank
    # Minimum relative slowdown of the rank against its peer median (effect-size floor).
    # 4 % so that an injected 5 % slowdown clears it despite window noise.
    min_slowdown: float = 0.04
    # MAD is floored at this fraction of the peer median: a perfectly uniform group (MAD = 0)
    # must not turn a 0.1 % difference into an infinite z-score.
    mad_floor_rel: float = 0.005
    # Quorum: a peer group gives verdicts only while at least this fraction of its ranks (those
    # the snapshot lists for the run and pp stage; the whole run when it has no pp labels)
    # answers with data. With most peers down, the survivors' median is no reference, and an
    # open episode is held as "no data" rather than judged.
    min_answering_frac: float = 0.5
    min_group_size: int = 3  # groups smaller than this are compared to their fastest peer instead
    small_group_min_slowdown: float = 0.10  # slowdown vs the fastest peer for groups of 2
    # Sequential test (docs/detector.md): per rank, one-sided CUSUM charts of its relative
    # excess over its peers, one per reference slowdown d: drift d/2, each window's excess
    # capped at d (the largest chart uncapped, so that a large straggler adds up at its full
    # size), evidence in seconds of excess. A chart fires once it rose for its minimum
    # duration and holds its threshold plus a noise term sized for false_alarm_rate under
    # Gaussian noise of noise_tail_factor times the peer group's measured spread. A bigger
    # straggler fills the charts faster, so it fires sooner with the same guarantee.
    cusum_slowdowns: tuple[float, ...] = CUSUM_SLOWDOWNS_DEFAULT
    cusum_thresholds_s: tuple[float, ...] = CUSUM_THRESHOLDS_DEFAULT
    cusum_min_duration_s: tuple[float, ...] = CUSUM_MIN_DURATION_DEFAULT
    false_alarm_rate: float = 1e-6  # design false alarms per rank-hour (all charts together)
    noise_tail_factor: float = 1.5  # real per-window noise has heavier tails than a Gaussian
    resolve_windows: int = 2  # consecutive clean evaluations before it resolves
    # Evaluations without data after which an open episode resolves (the rank went away).
    missing_resolve_windows: int = 20
    warmup_s: float = 60.0  # ignore a run's first seconds of data (compilation, cache warm-up)
    min_steps_per_window: float = 1.0  # fewer completed steps in the window = no data
    # Unknown layout (no pp label): split the sorted per-rank compute times at relative gaps of
    # at least cluster_gap_rel that are also cluster_gap_factor times the median neighbour gap;
    # clusters smaller than min_group_size join their nearest neighbour.
    cluster_gap_rel: float = 0.01
    cluster_gap_factor: float = 10.0
    # ... and such runs get no straggler verdict before each rank's clustering basis (its
    # running mean compute time) has this many evaluations.
    cluster_learn_windows: int = 8

    # --- failing GPUs ----------------------------------------------------------------------
    # other XIDs are warnings, except the application's own (XID table class PASS: none)
    critical_xids: tuple[int, ...] = CRITICAL_XIDS_DEFAULT
    clock_drop_rel: float = 0.10  # SM clock this much below its own baseline/peers = throttling
    throttle_persist_windows: int = 2
    gpu_resolve_windows: int = 4  # clean evaluations before a GPU fault resolves
    health_fail_value: float = 20.0  # DCGM_EXP_GPU_HEALTH_STATUS value that means failed

    # --- network (EFA) -------------------------------------------------------------------
    efa_error_counters: tuple[str, ...] = EFA_ERROR_COUNTERS_DEFAULT
    # A NIC is bad when its error events (the counters above, summed) are at least this
    # fraction of the packets it sent and received ...
    efa_max_errors_per_packet: float = 1e-5
    efa_min_errors_per_s: float = 0.5  # ... and at least this many per second (absolute floor)
    network_persist_windows: int = 2
    network_resolve_windows: int = 3

    # --- hangs -----------------------------------------------------------------------------
    hang_factor: float = 10.0  # no step for this many median step times ...
    hang_min_s: float = 60.0  # ... and at least this long (checkpoints must fit under it)

    # --- throughput drop -----------------------------------------------------------------
    throughput_drop_rel: float = 0.10  # run's step time this much above its own baseline
    throughput_min_segment: int = 4  # evaluations after the change point before firing
    throughput_history: int = 80  # evaluations kept as the run's baseline
    throughput_p_value: float = 0.01  # Mann-Whitney U test of after vs before the change point

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"{f.name}: must be a positive number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: must be finite, got {value!r}")
        for name in ("min_slowdown", "small_group_min_slowdown", "clock_drop_rel", "throughput_drop_rel",
                     "mad_floor_rel", "cluster_gap_rel", "false_alarm_rate"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be between 0 and 1 (a fraction), got {getattr(self, name)!r}")
        if not 0 <= self.min_answering_frac <= 1:
            raise ConfigError(f"min_answering_frac: must be between 0 and 1 (a fraction), got {self.min_answering_frac!r}")
        if not 0 < self.throughput_p_value < 1:
            raise ConfigError(f"throughput_p_value: must be between 0 and 1, got {self.throughput_p_value!r}")
        counts = {len(self.cusum_slowdowns), len(self.cusum_thresholds_s), len(self.cusum_min_duration_s)}
        if not self.cusum_slowdowns or len(counts) != 1:
            raise ConfigError("cusum_slowdowns, cusum_thresholds_s, cusum_min_duration_s: need one value each per "
                              f"chart, got {len(self.cusum_slowdowns)}, {len(self.cusum_thresholds_s)} and "
                              f"{len(self.cusum_min_duration_s)}")
        if list(self.cusum_slowdowns) != sorted(set(self.cusum_slowdowns)) or not all(
                0 < d < 1 for d in self.cusum_slowdowns):
            raise ConfigError("cusum_slowdowns: must be increasing fractions between 0 and 1, "
                              f"got {list(self.cusum_slowdowns)!r}")
        for name in ("cusum_thresholds_s", "cusum_min_duration_s"):
            if not all(0 <= v <= _WEEK for v in getattr(self, name)):
                raise ConfigError(f"{name}: must be seconds, from 0 to {_WEEK:g}, got {list(getattr(self, name))!r}")
        if self.noise_tail_factor < 1:
            raise ConfigError(f"noise_tail_factor: must be at least 1, got {self.noise_tail_factor!r}")
        if self.min_group_size < 2:
            raise ConfigError(f"min_group_size: must be at least 2, got {self.min_group_size!r}")
        if self.throughput_history < 2 * self.throughput_min_segment:
            raise ConfigError("throughput_history: must be at least twice throughput_min_segment")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                lo, hi = _RANGES.get(f.name, (-_HUGE, _HUGE))
                if not lo <= value <= hi:
                    raise ConfigError(f"{f.name}: must be between {lo:g} and {hi:g}, got {value!r}")
        for xid in self.critical_xids:
            if not 1 <= xid <= 65535:
                raise ConfigError(f"critical_xids: an XID is a code from 1 to 65535, got {xid!r}")
        for name in self.efa_error_counters:
            check_metric_suffix(name, "efa_error_counters")


# Every string that goes into PromQL is checked here. EFA counters become metric names
# (node_amazonefa_<counter>), so a counter is a metric-name suffix: letters, digits and '_' only.
# Nothing else in the config reaches a query.
_METRIC_SUFFIX = re.compile(r"[A-Za-z0-9_]{1,200}")


def check_metric_suffix(name: str, key: str) -> str:
    """``name`` if it can end a metric name, else a ConfigError naming ``key``."""
    if not isinstance(name, str) or not _METRIC_SUFFIX.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} is not a metric-name suffix (letters, digits and '_' only, "
                          "as in retrans_pkts)")
    return name


# Bounds beyond "positive": values outside them are typos or hostile (interval_s = 1e308 would
# evaluate at time 0 for ever, a window of 1e308 s is no PromQL duration). Times are seconds.
_DAY, _WEEK, _HUGE = 86_400.0, 604_800.0, 1e12
_WINDOWS_MAX = 10_000
_RANGES: dict[str, tuple[float, float]] = {
    "interval_s": (0.1, _DAY), "window_s": (0.1, _DAY), "warmup_s": (0.0, _WEEK), "hang_min_s": (0.0, _WEEK),
    "gap_min_s": (0.0, _WEEK),
    "z_threshold": (0.0, 1000.0), "hang_factor": (0.0, 1e6), "cluster_gap_factor": (0.0, 1e6),
    "noise_tail_factor": (1.0, 100.0), "efa_min_errors_per_s": (0.0, 1e9), "health_fail_value": (0.0, 1e6),
    "min_group_size": (2, 100_000), "throughput_history": (2, 100_000),
    **{k: (1, _WINDOWS_MAX) for k in (
        "resolve_windows", "missing_resolve_windows", "throttle_persist_windows",
        "gpu_resolve_windows", "network_persist_windows", "network_resolve_windows", "throughput_min_segment",
        "cluster_learn_windows")},
}


_POSITIVE = frozenset({
    "interval_s", "window_s", "gap_min_s", "z_threshold", "resolve_windows", "missing_resolve_windows",
    "min_steps_per_window", "throttle_persist_windows", "gpu_resolve_windows", "health_fail_value",
    "efa_max_errors_per_packet", "efa_min_errors_per_s", "network_persist_windows",
    "network_resolve_windows", "hang_factor", "hang_min_s", "throughput_min_segment", "throughput_history",
    "cluster_gap_factor", "cluster_learn_windows", "noise_tail_factor",
})
_INT_FIELDS = frozenset({
    "resolve_windows", "missing_resolve_windows", "min_group_size",
    "throttle_persist_windows", "gpu_resolve_windows", "network_persist_windows",
    "network_resolve_windows", "throughput_min_segment", "throughput_history", "cluster_learn_windows",
})
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(DetectorConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    where = f"{source}: {key}"
    kind = _FIELD_TYPES[key]
    if kind.startswith("tuple[int"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: must be a list of integers, got {value!r}")
        return tuple(value)
    if kind.startswith("tuple[float"):
        if not isinstance(value, list | tuple) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if kind.startswith("tuple[str"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: must be a list of names, got {value!r}")
        return tuple(check_metric_suffix(v, where) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: must be a number, got {value!r}")
    if key in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> DetectorConfig:
    """Build a config from a parsed TOML document (flat keys or a ``[detector]`` table)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of settings")
    values: dict[str, Any] = {}
    items = list(data.items())
    if isinstance(data.get("detector"), Mapping):
        items = [(k, v) for k, v in items if k != "detector"] + list(data["detector"].items())
    for key, value in items:
        if key in FOREIGN_TABLES:
            continue
        if key not in _FIELD_TYPES:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_FIELD_TYPES))})")
        values[key] = _coerce(key, value, source)
    try:
        return DetectorConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None) -> DetectorConfig:
    """Load a TOML file; ``None`` gives the defaults."""
    if path is None:
        return DetectorConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return config_from_mapping(data, source=str(p))
