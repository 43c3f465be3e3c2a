"""The PromQL that builds one detector Snapshot: one query per quantity, each over all ranks,
GPUs and NICs at once — never one query per rank — so a cycle costs the same few dozen cheap
requests whatever the job size.

The same expressions serve instant queries (live) and range queries (replay, backtest): a
range-query point at t is the same evaluation as an instant query at t, so live and replay agree
by construction. Live sends them in a cheaper but equivalent form (``merge_for_instant``: a few
merged, the GPU gauges trimmed to their key labels); the rows the joins see are the same, which
the tests check against the range form on a real Prometheus.

Expressions stay plain selectors and ``*_over_time``/``rate``/``increase`` calls. Joins (per-step
time = section rate / step rate; rank -> target ``up``; EFA ``instance`` -> host) and de-duplication
(a target scraped by two jobs) happen in ``source.build_snapshot``, identically for both paths:
Prometheus 2.x evaluates ``max by`` and vector matching step by step, and measured on a
64-rank, 30-minute replay they cost several times the plain selectors (BENCHMARKS.md). Joins follow
DESIGN.md "Joining series": never on scrape job names. Probe series carry ``run``/``rank``/
``node``; GPU series carry dcgm's ``Hostname``; EFA series carry only the ``instance`` that
Prometheus adds, which joins to the host through ``rankwatch_node_info{Hostname}``.

Everything here is PromQL that VictoriaMetrics' MetricsQL also accepts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Names from the metric contract (DESIGN.md). Changing one means changing its exporter too.
RANK_INFO = "rankwatch_rank_info"
NODE_INFO = "rankwatch_node_info"
# The node exporter's GPU counts carry Hostname (and instance, like every scraped series).
NODE_GPUS_EXPECTED = "rankwatch_gpu_expected"
NODE_GPUS_ANSWERING = "rankwatch_gpu_answering"
RANK_GAUGES = {"rankwatch_step": "step", "rankwatch_last_step_timestamp_seconds": "last_step_time"}

# Every GPU exports its SM clock: the series that says which GPUs a node has.
GPU_PRESENCE_METRIC = "DCGM_FI_DEV_SM_CLOCK"
GPU_LAST_VALUE = {  # gauge -> GpuObs field; latest value in the window
    "DCGM_EXP_GPU_HEALTH_STATUS": "health",
    "DCGM_FI_DEV_XID_ERRORS": "last_xid",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "remap_failure",
    "DCGM_FI_DEV_ROW_REMAP_PENDING": "remap_pending",
    "DCGM_FI_DEV_RETIRED_PENDING": "retired_pending",
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": "clock_event_reasons",
    "DCGM_FI_DEV_GPU_TEMP": "temperature",
}
# Gauges whose healthy value is 0 (health pass, no XID, no remap or retirement pending): asked
# for with ``> 0``, so that a healthy GPU sends no row for them; the source fills 0 for every
# GPU that reported in the window (GPU_SPARSE_FILLED). At 16 384 GPUs that is 5 x 16 384 rows
# (and 7 health watches each) a cycle fewer. The clock-event reasons and the temperature stay
# dense: "no reason known" (absent) and "no reason" (0) differ to the throttling rule.
GPU_SPARSE_GAUGES = ("DCGM_EXP_GPU_HEALTH_STATUS", "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
                     "DCGM_FI_DEV_ROW_REMAP_PENDING", "DCGM_FI_DEV_RETIRED_PENDING")
GPU_SPARSE_FILLED = tuple(GPU_LAST_VALUE[m] for m in GPU_SPARSE_GAUGES)
# The SM clock is averaged: a throttled GPU dips between scrapes, one sample can miss it.
GPU_WINDOW_AVG = {"sm_clock": "DCGM_FI_DEV_SM_CLOCK"}
GPU_INCREASE = {  # tag -> counter whose increase over the window is wanted
    "dbe": "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "pcie_replay": "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "thermal_violation": "DCGM_FI_DEV_THERMAL_VIOLATION",
    "power_violation": "DCGM_FI_DEV_POWER_VIOLATION",
}
NVLINK_INCREASE = {
    "crc_flit": "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "crc_data": "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
    "replay": "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
    "recovery": "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
}
# Counters whose zero increase is not read as such: asked for with ``> 0`` (only GPUs with new
# replays come back). The others stay dense: a zero violation rate says "not throttled for
# power or heat", which the throttling rule tells apart from "no reason known".
SPARSE_GPU_INCREASE = frozenset({"pcie_replay"})
# Not queried (the core does not use them, and every query costs a round trip per cycle):
# SBE counts, power draw, utilisation. GpuObs leaves those fields None.
XID_COUNT = "DCGM_EXP_XID_ERRORS_COUNT"
EFA_PREFIX = "node_amazonefa_"
# traffic: bytes for the evidence, packets for the errors-per-packet rule (network.py)
EFA_THROUGHPUT_COUNTERS = ("tx_bytes", "rx_bytes", "tx_pkts", "rx_pkts")

# The recording rules of alerts/rankwatch-rules.yml (group rankwatch.detector_inputs) the live query
# set uses when they exist: the node side read through a series per EFA device port instead of
# nine, and no series at all for a healthy GPU's flags and XID counts. RULES_PRESENT says that
# the group runs (its value is 1, always, where the rules are evaluated).
RULES_PRESENT = "rankwatch:detector_rules:present"
RULE_GPU_FLAG = "rankwatch:gpu_flag:nonzero"
RULE_GPU_XID = "rankwatch:gpu_xid_errors_count:nonzero"
RULE_EFA_ERRORS = "rankwatch:efa_errors:sum"
RULE_EFA_PACKETS = "rankwatch:efa_packets:sum"
# The error counters RULE_EFA_ERRORS sums (the detector's default efa_error_counters; with
# others configured, the EFA queries stay on the raw counters).
RULE_EFA_COUNTERS = ("retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events",
                     "impaired_remote_conn_events", "rx_drops")
# NicObs.increase keys of the rules path: errors of those counters together, packets both ways.
EFA_ERRORS_SUM = "errors_sum"
EFA_PACKETS_SUM = "packets_sum"

# Identity lookback: a rank, GPU or node that stopped reporting stays known (as down or
# absent) this long — the default lookback of Prometheus instant queries.
IDENTITY_LOOKBACK_S = 300.0

# The cheap series that say how often each source is scraped (one per rank / per node; present
# at every scrape). Node spacing also reads dcgm-exporter's SM clock, for clusters that run
# dcgm-exporter instead of rankwatch's node exporter.
SPACING_SERIES = {
    "probe": RANK_INFO,
    "node": f'{{__name__=~"{NODE_INFO}|{GPU_PRESENCE_METRIC}"}}',
}
# Spans over which a series' mean sample spacing is measured: the longest one its history
# covers wins (5 min: many samples, robust to a missed scrape; 1 min and 15 s: a job's first
# samples — one interval between two samples is already exact, whatever the span). One
# millisecond more than a round number so that no sample sits exactly on the window's edge,
# where Prometheus 2 (closed windows) and 3 / VictoriaMetrics (left-open) disagree.
SPACING_SPANS_MS = (300_001, 60_001, 15_001)


def tagged(parts: Sequence[tuple[str, str]], label: str = "q") -> str:
    """Union of expressions, each tagged ``label="<tag>"`` so the rows say which is which. Cheap
    for few series; for many, Prometheus 2.x pays label_replace and ``or`` at every step of a
    range query, so large quantities get a query each."""
    return " or ".join(f'label_replace({expr}, "{label}", "{tag}", "", "")' for tag, expr in parts)


@dataclass(frozen=True)
class Query:
    """One expression of the per-cycle set. ``name`` says what the rows are to the snapshot
    builder and prefixes errors in ``Snapshot.errors`` (the core holds rank verdicts while a
    ``rank_*`` query fails)."""

    name: str
    expr: str
    # For a merged instant query (``merge_for_instant``): the names of the queries it holds; its
    # rows carry ``QUERY_TAG=<name>`` saying which one each row belongs to.
    parts: tuple[str, ...] = ()


# Label that tags the rows of a merged instant query with the name of their own query.
QUERY_TAG = "rankwatch_query"
NIC_SEEN = "nic_seen"
RANK_INFO_SEEN = "rank_info_seen"
RANK_INFO_NOW = "rank_info_now"
# The live form of the two rank-info queries in one: every rank seen over the lookback, with the
# time of its latest sample where that sample is in its target's last scrape, else 0. Same
# labels on both sides of `or`: one row per rank. ``source`` splits it by value, not by tag.
RANK_INFO_BOTH = "rank_info"


def _instant_group(name: str) -> str | None:
    # Only the EFA counters (one query per configured counter, one series per NIC): measured on
    # 256 ranks, merging them saves the detector 10 ms of CPU per cycle and costs Prometheus
    # nothing, while merging the per-GPU or per-rank rates (256+ series each) cost Prometheus
    # more than it saved (``or`` matches every row of one side against the other).
    return "efa" if name.startswith("efa:") or name == NIC_SEEN else None


# The labels each query's join reads (``source.build_snapshots``), for the live form: an instant
# query returns its rows as ``max by`` these labels — what the join would keep of duplicate
# series anyway — so Prometheus encodes, and the detector decodes, nothing the join ignores
# (at 16 384 ranks on p5 nodes: 250 MB of JSON per cycle before, mostly job, pci_bus_id,
# DCGM_FI_DRIVER_VERSION and the like). A range query pays an aggregation at every step, so
# replay keeps the plain selectors; the join sees the same rows either way.
_RANK_IDENTITY = ("run", "rank", "node", "instance", "local_rank", "world_size", "gpu", "gpu_uuid", "pp", "tp", "dp",
                  "cp")
INSTANT_LABELS: dict[str, tuple[str, ...]] = {
    RANK_INFO_SEEN: _RANK_IDENTITY,
    RANK_INFO_NOW: _RANK_IDENTITY,
    "rank_steps_rate": ("run", "rank", "node", "instance"),
    "rank_step_seconds_rate": ("run", "rank", "node"),
    "rank_section_rate": ("run", "rank", "node", "section"),
    "rank_tokens_rate": ("run", "rank", "node"),
    "rank_gauges": ("__name__", "run", "rank", "node"),
    "targets_up": ("instance",),
    "node_values": ("__name__", "instance", "Hostname", "q"),
    "gpu_seen": ("Hostname", "gpu", "UUID", "modelName"),
    "gpu_gauges": ("__name__", "Hostname", "gpu"),
    "gpu_flags": ("__name__", "Hostname", "gpu"),
    "gpu_nvlink": ("Hostname", "gpu", "q"),
    "gpu_xid": ("Hostname", "gpu", "xid"),
    NIC_SEEN: ("instance", "device", "port"),
}
_PREFIX_LABELS = {"gpu_avg:": ("Hostname", "gpu"), "gpu_increase:": ("Hostname", "gpu"),
                  "efa:": ("instance", "device", "port")}


def instant_labels(name: str) -> tuple[str, ...] | None:
    if name in INSTANT_LABELS:
        return INSTANT_LABELS[name]
    return next((v for k, v in _PREFIX_LABELS.items() if name.startswith(k)), None)


def lean(q: Query) -> Query:
    """``q`` trimmed to the labels its join reads (instant queries only: see INSTANT_LABELS)."""
    labels = instant_labels(q.name)
    if labels is None:
        return q
    return Query(q.name, f"max by ({', '.join(labels)}) ({q.expr})", q.parts)


def merge_for_instant(queries: Sequence[Query], large: bool = False) -> list[Query]:
    """The live (instant) form of the query set: small quantities merged into one tagged query
    per group, the GPU gauges trimmed to their key labels, the others left alone so that
    Prometheus evaluates them concurrently. Each request
    costs the detector ~1.5 ms of CPU whatever its size, and on a few small vectors an instant
    ``label_replace``/``or`` costs Prometheus next to nothing; in a range query Prometheus pays
    them at every step (4x the separate queries, measured), so replay keeps the separate form.
    Either way the rows are the same series with the same values: ``source`` splits a merged
    result back by ``QUERY_TAG``. ``large`` (tens of thousands of NICs): nothing is merged —
    each ``or`` matches every row of the union so far, and at 65 536 NICs the merged EFA query
    cost Prometheus 8.4 s of CPU where its parts, separate, cost 5.7 s."""
    queries = [lean(q) for q in queries]
    groups: dict[str, list[Query]] = {}
    for q in queries:
        g = None if large else _instant_group(q.name)
        if g is not None:
            groups.setdefault(g, []).append(q)
    out: list[Query] = []
    done: set[str] = set()
    for q in queries:
        g = None if large else _instant_group(q.name)
        if q.name == RANK_INFO_SEEN and any(x.name == RANK_INFO_NOW for x in queries):
            now = next(x for x in queries if x.name == RANK_INFO_NOW)
            # One request instead of two (both are over every rank): see RANK_INFO_BOTH.
            out.append(Query(RANK_INFO_BOTH, f"{now.expr} or 0 * {q.expr}", (RANK_INFO_SEEN, RANK_INFO_NOW)))
        elif q.name == RANK_INFO_NOW:
            continue  # answered by RANK_INFO_BOTH
        elif g is None or len(groups[g]) == 1:
            out.append(q)
        elif g not in done:
            done.add(g)
            members = groups[g]
            out.append(Query(g, tagged([(m.name, f"({m.expr})") for m in members], QUERY_TAG),
                             tuple(m.name for m in members)))
    return out


def duration(seconds: float) -> str:
    """A PromQL duration; milliseconds so that fractional windows survive."""
    ms = int(round(seconds * 1000))
    if ms <= 0:
        raise ValueError(f"duration must be positive, got {seconds!r}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _names(names: Sequence[str]) -> str:
    return "{__name__=~\"" + "|".join(names) + "\"}"


def spacing_query(source: str) -> str:
    """Median over a source's series of each series' mean sample spacing in seconds.

    Per series: (time of its last sample - time of its last sample one span ago) / samples in
    the span — exact for any span when scrapes are regular, and computed by the server, so
    the answer is one number whatever the number of targets."""
    m = SPACING_SERIES[source]
    parts = [f"quantile(0.5, (timestamp({m}) - timestamp({m} offset {ms}ms)) / (count_over_time({m}[{ms}ms]) > 0))"
             for ms in SPACING_SPANS_MS]
    return " or ".join(parts)


def build_queries(window_s: float, efa_counters: Sequence[str], node_window_s: float | None = None,
                  rules: bool = False) -> list[Query]:
    """The per-cycle query set for windows ending at the evaluation time: ``window_s`` seconds
    for the probes' series, ``node_window_s`` (default: the same) for the node exporters'.
    ``rules``: read the GPU flags, XID counts and EFA counters through the recording rules of
    the rankwatch.detector_inputs group (RULES_PRESENT) instead of the raw series."""
    w = duration(window_s)
    nw = duration(node_window_s or window_s)
    lb = duration(max(window_s, node_window_s or 0.0, IDENTITY_LOOKBACK_S))
    qs = [
        # Ranks: rankwatch_rank_info is the registry. A rank is fresh when its step counter has
        # samples in the window (rate() needs two): no separate freshness query.
        Query(RANK_INFO_SEEN, f"last_over_time({RANK_INFO}[{lb}])"),
        # Time of each rank's latest info sample: its endpoint answers for that rank when it is
        # inside the window. Live, a series missing from its target's last scrape (the process
        # exited or was stopped, or the port now serves another run) is marked stale and drops
        # out at once; in a replay file its age says the same.
        Query(RANK_INFO_NOW, f"timestamp({RANK_INFO})"),
        Query("rank_steps_rate", f"rate(rankwatch_steps_total[{w}])"),
        # Per-step means are divided out in the source: rate(x_seconds_total) / rate(steps_total).
        Query("rank_step_seconds_rate", f"rate(rankwatch_step_seconds_total[{w}])"),
        Query("rank_section_rate", f"rate(rankwatch_section_seconds_total[{w}])"),
        Query("rank_tokens_rate", f"rate(rankwatch_tokens_total[{w}])"),
        # The step gauges over the lookback: a rank that stopped answering keeps its last
        # known step (a hang names the rank that stopped first).
        Query("rank_gauges", f"last_over_time({_names(list(RANK_GAUGES))}[{lb}])"),
        # Target health of probes and node exporters, matched to them by instance.
        Query("targets_up", f"up and on(instance) (last_over_time({RANK_INFO}[{lb}]) "
                            f"or last_over_time({NODE_INFO}[{lb}]))"),
        # Node exporters (one series each, cheap to bundle): identity over the lookback, GPU
        # counts and freshness over the window.
        Query("node_values", tagged([
            ("seen", f"last_over_time({NODE_INFO}[{lb}])"),
            ("fresh", f"last_over_time({_names([NODE_INFO, NODE_GPUS_EXPECTED, NODE_GPUS_ANSWERING])}[{nw}])"),
            # whether the detector's recording rules run, with EFA sums evaluated at least twice
            # in the node window (what increase() needs; rules evaluated more rarely than that
            # keep the detector on the raw series): the next cycles' path. The GPU flags and XID
            # counts are sparse, their freshness cannot show.
            ("rules", f"last_over_time({RULES_PRESENT}[{lb}]) and on () "
                      f"(count(count_over_time({RULE_EFA_PACKETS}[{nw}]) >= 2) > 0)"),
        ])),
        Query("gpu_seen", f"last_over_time({GPU_PRESENCE_METRIC}[{lb}])"),
        Query("gpu_gauges", f"last_over_time({_names([m for m in GPU_LAST_VALUE if m not in GPU_SPARSE_GAUGES])}"
                            f"[{nw}])"),
        Query("gpu_flags", f'label_replace({RULE_GPU_FLAG}, "__name__", "$1", "field", "(.+)")' if rules else
              f"last_over_time({_names(list(GPU_SPARSE_GAUGES))}[{nw}]) > 0"),
    ]
    qs += [Query(f"gpu_avg:{tag}", f"avg_over_time({m}[{nw}])") for tag, m in GPU_WINDOW_AVG.items()]
    qs += [Query(f"gpu_increase:{tag}", f"increase({m}[{nw}])" + (" > 0" if tag in SPARSE_GPU_INCREASE else ""))
           for tag, m in GPU_INCREASE.items()]
    # NVLink error counters are off in dcgm-exporter's defaults: one query for the four. Only
    # GPUs with new errors come back (nothing reads a zero; at 16 384 GPUs the zeros were
    # 65 536 rows per cycle).
    qs.append(Query("gpu_nvlink", tagged([(tag, f"increase({m}[{nw}]) > 0") for tag, m in NVLINK_INCREASE.items()])))
    # XID counts per code. The series of a code appears when that XID first happens and
    # increase() never counts a series' first sample: a series absent one window ago counts
    # its whole value. Only codes that happened come back: the source keeps nothing else.
    # (Matching the "absent one window ago" on the GPU and code only, and filtering each side
    # before the union: on 131 072 XID series, 1 s of Prometheus CPU instead of 5.)
    xid = RULE_GPU_XID if rules else f'{XID_COUNT}{{xid!=""}}'
    qs.append(Query("gpu_xid", f"(({xid} > 0) unless on (Hostname, gpu, xid) {xid} offset {nw}) "
                               f"or (increase({xid}[{nw}]) > 0)"))
    counters = list(dict.fromkeys([*efa_counters, *EFA_THROUGHPUT_COUNTERS]))
    bad = [c for c in counters if not re.fullmatch(r"[A-Za-z0-9_]+", c)]
    if bad:  # the config checks them (config.check_metric_suffix); never paste anything else
        raise ValueError(f"EFA counter names must be metric-name suffixes, got {bad!r}")
    if rules and tuple(efa_counters) == RULE_EFA_COUNTERS:
        # One error sum and one packet sum per device port; the per-counter breakdown and the
        # byte throughput are not read on this path (the evidence says "errors_sum").
        qs += [Query(f"efa:{EFA_ERRORS_SUM}", f"increase({RULE_EFA_ERRORS}[{nw}]) > 0"),
               Query(f"efa:{EFA_PACKETS_SUM}", f"increase({RULE_EFA_PACKETS}[{nw}])"),
               Query(NIC_SEEN, f"last_over_time({RULE_EFA_PACKETS}[{lb}]) unless on (instance, device, port) "
                               f"increase({RULE_EFA_PACKETS}[{nw}])")]
        return qs
    # Error counters come back only where they rose: a NIC's zero errors and its absent error
    # rows are the same to the network rule, while its packets and bytes (every NIC, always
    # moving) keep every NIC in the snapshot.
    qs += [Query(f"efa:{c}", f"increase({EFA_PREFIX}{c}[{nw}])" + (" > 0" if c in efa_counters else ""))
           for c in counters]
    # Which NICs exist (seen over the lookback), so that a NIC without data in the window is
    # counted as unwatched rather than not known. Only the silent ones come back: those with
    # data are known from the counters above (the source adds them), which at 65 536 NICs
    # saves as many rows a cycle.
    seen = f"{EFA_PREFIX}{EFA_THROUGHPUT_COUNTERS[0]}"
    qs.append(Query(NIC_SEEN, f"last_over_time({seen}[{lb}]) unless on (instance, device, port) "
                              f"increase({seen}[{nw}])"))
    return qs
