"""What the detector sees at one evaluation: plain data, built by a source (live Prometheus,
backtest range, replay) and consumed by the pure scoring code. Nothing here does I/O.

Every per-window quantity is computed the same way in live and replay mode (by PromQL over a
window of ``Snapshot.window_s`` seconds ending at ``Snapshot.time``), so verdicts agree."""

from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE_EXCLUDED_SECTIONS = frozenset({"comm", "dataloader"})


@dataclass
class RankObs:
    """One training rank (probe series), keyed by (run, rank)."""

    run: str
    rank: int
    node: str
    local_rank: int | None = None
    world_size: int | None = None
    gpu: str | None = None  # GPU index on its node, as a string (dcgm `gpu` label)
    gpu_uuid: str | None = None
    pp: int | None = None
    tp: int | None = None
    dp: int | None = None
    cp: int | None = None
    # its probe endpoint answered the last scrape, for this rank (an endpoint that now serves
    # another run's rank does not answer for this one)
    up: bool = True
    step: float | None = None  # rankwatch_step (the loop's own step number)
    last_step_time: float | None = None  # rankwatch_last_step_timestamp_seconds
    steps_rate: float | None = None  # completed steps per second over the window
    step_seconds: float | None = None  # mean wall time per step over the window
    # Mean seconds per *step* spent in each section over the window:
    # rate(section_seconds_total[w]) / rate(steps_total[w]). Missing key = no data.
    sections: dict[str, float] = field(default_factory=dict)
    tokens_rate: float | None = None  # tokens/s over the window

    @property
    def compute_seconds(self) -> float | None:
        """Per-step time in sections other than comm and dataloader (None without sections)."""
        vals = [v for k, v in self.sections.items() if k not in COMPUTE_EXCLUDED_SECTIONS]
        return sum(vals) if vals else None

    @property
    def comm_seconds(self) -> float | None:
        return self.sections.get("comm")

    @property
    def dataloader_seconds(self) -> float | None:
        return self.sections.get("dataloader")


@dataclass
class GpuObs:
    """One GPU (node exporter, dcgm-exporter names), keyed by (node, gpu)."""

    node: str
    gpu: str
    uuid: str | None = None
    model: str | None = None
    present: bool = True  # its series were in this evaluation
    health: float | None = None  # DCGM_EXP_GPU_HEALTH_STATUS: 0 pass, 10 warn, 20 fail
    last_xid: float | None = None  # DCGM_FI_DEV_XID_ERRORS
    xid_increase: dict[int, float] = field(default_factory=dict)  # increase(DCGM_EXP_XID_ERRORS_COUNT[w]) by xid
    dbe_increase: float | None = None  # volatile DBE increase over window
    sbe_increase: float | None = None
    remap_failure: float | None = None  # DCGM_FI_DEV_ROW_REMAP_FAILURE
    remap_pending: float | None = None  # DCGM_FI_DEV_ROW_REMAP_PENDING
    retired_pending: float | None = None  # DCGM_FI_DEV_RETIRED_PENDING
    sm_clock: float | None = None  # MHz, averaged over the window
    temperature: float | None = None  # °C
    power: float | None = None  # W
    utilization: float | None = None  # %
    clock_event_reasons: float | None = None  # DCGM_FI_DEV_CLOCKS_EVENT_REASONS bitmask (last)
    thermal_violation_rate: float | None = None  # rate of DCGM_FI_DEV_THERMAL_VIOLATION (µs/s)
    power_violation_rate: float | None = None  # rate of DCGM_FI_DEV_POWER_VIOLATION (µs/s)
    nvlink_errors_increase: float | None = None  # CRC + replay + recovery increase over window
    pcie_replay_increase: float | None = None


@dataclass
class NicObs:
    """One EFA device port (node exporter, node_amazonefa_* names), keyed by (node, device, port)."""

    node: str
    device: str
    port: str = "1"
    # increase(node_amazonefa_<counter>[w]) for the error counters (retrans_bytes, retrans_pkts,
    # retrans_timeout_events, unresponsive_remote_events, impaired_remote_conn_events, rx_drops, …)
    increase: dict[str, float] = field(default_factory=dict)
    tx_bytes_rate: float | None = None
    rx_bytes_rate: float | None = None


@dataclass
class NodeObs:
    """One node exporter target."""

    node: str
    exporter_up: bool = True
    gpus_expected: float | None = None
    gpus_answering: float | None = None


@dataclass
class Snapshot:
    """Everything the detector knows at evaluation time ``time`` (Unix seconds, data time)."""

    time: float
    window_s: float  # window of the probes' (per-rank) quantities
    ranks: list[RankObs] = field(default_factory=list)
    gpus: list[GpuObs] = field(default_factory=list)
    nics: list[NicObs] = field(default_factory=list)
    nodes: list[NodeObs] = field(default_factory=list)
    # Queries that failed this cycle: the detector must treat their quantities as missing,
    # never as zero (missing data is not a straggler).
    errors: list[str] = field(default_factory=list)
    # Window of the node exporters' quantities (GPUs, NICs, nodes); None = ``window_s``. The
    # two differ when probes and node exporters are scraped at different intervals.
    node_window_s: float | None = None
    # (node, device, port) of every NIC seen over the identity lookback, with data now or not:
    # what the coverage counts NICs against. Scoring reads ``nics``.
    nics_seen: list[tuple[str, str, str]] = field(default_factory=list)
