"""Scenarios: a simulated job plus labelled faults, turned into what the detector would see.

Two outputs from the same telemetry, so they agree:

* ``snapshots(...)``: detector ``Snapshot``s built directly (fast path for benchmarks and tests);
* ``write_openmetrics(...)``: a replay file — OpenMetrics text with timestamps, as
  ``promtool tsdb create-blocks-from openmetrics`` accepts — with the series Prometheus would
  have scraped (``job``/``instance`` labels, ``up`` per target): probe series per rank,
  dcgm-named GPU series, ``node_amazonefa_*`` EFA series and ``rankwatch_node_info`` per node;
  plus a ground-truth JSON of the injected faults.

Counters are sampled every ``scrape_s`` seconds of job time, like a Prometheus scrape; in the
replay file, the node exporters' series every ``node_scrape_s`` (a multiple of ``scrape_s``;
default the same), as when Prometheus scrapes the two kinds of target at different intervals."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from rankwatch.detectors.model import GpuObs, NicObs, NodeObs, RankObs, Snapshot
from rankwatch.exporters.dcgm_fields import FIELD_BY_NAME, HEALTH_STATUS
from rankwatch.sim.training import QUIET, Fault, Layout, Noise, TrainingJob

_DCGM_HELP = {f.name: f.help for f in (*FIELD_BY_NAME.values(), HEALTH_STATUS)}

EFA_COUNTERS = (
    "tx_bytes", "rx_bytes", "tx_pkts", "rx_pkts", "retrans_pkts", "retrans_bytes", "retrans_timeout_events",
    "unresponsive_remote_events", "impaired_remote_conn_events", "rx_drops",
)
EFA_DEVICES_PER_NODE = 4
GPU_MODEL = "NVIDIA H100 80GB HBM3"
DRIVER = "570.124.06"
MAX_SM_CLOCK = 1980.0
PROBE_PORT = 9420
NODE_PORT = 9410
PROBE_JOB = "rankwatch-probe"
NODE_JOB = "rankwatch-node"
# What each fault kind should make the detector say (event kinds that count as detecting it).
EXPECTED_EVENTS: dict[str, tuple[str, ...]] = {
    "slowdown": ("straggler",),
    "thermal": ("straggler", "gpu_fault"),
    "dataloader": ("straggler",),
    "xid79": ("gpu_fault", "hang"),
    "dbe": ("gpu_fault",),
    "efa": ("network",),
    "hang": ("hang",),
    "job_slowdown": ("throughput_drop",),
    "spike": (),  # benign: a transient spike must raise nothing
}


@dataclass
class Scenario:
    name: str
    layout: Layout = field(default_factory=lambda: Layout(tp=8, pp=4, dp=2))
    nodes: int = 8
    gpus_per_node: int = 8
    base_step_s: float = 1.0
    duration_s: float = 900.0
    seed: int = 0
    noise: Noise = field(default_factory=Noise)
    faults: list[Fault] = field(default_factory=list)
    scrape_s: float = 5.0
    run: str = "sim-run"
    start_time: float = 1_750_000_000.0
    pp_labels: bool = True  # False: the probe does not know the layout (no pp/tp/dp labels)
    node_scrape_s: float | None = None  # node exporters' scrape interval in the replay file (None: scrape_s)

    def __post_init__(self) -> None:
        if self.node_scrape_s is not None:
            ratio = self.node_scrape_s / self.scrape_s
            if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
                raise ValueError(f"node_scrape_s ({self.node_scrape_s:g}) must be a multiple of scrape_s ({self.scrape_s:g})")

    def job(self) -> TrainingJob:
        job = TrainingJob(self.layout, nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                          base_step_s=self.base_step_s, seed=self.seed, noise=self.noise, run=self.run,
                          start_time=self.start_time)
        for f in self.faults:
            job.add_fault(f)
        return job

    def ground_truth(self) -> dict[str, Any]:
        job = self.job()
        labels = []
        for f in self.faults:
            rank = job.fault_rank(f)
            node = job.node_name(f.node) if f.node is not None else (job.node_of(rank) if rank is not None else None)
            labels.append({
                "fault": f.kind, "expect": list(EXPECTED_EVENTS[f.kind]), "run": self.run, "rank": rank,
                "node": node,
                "gpu": str(f.gpu) if f.gpu is not None else (str(rank % self.gpus_per_node) if rank is not None else None),
                "start": self.start_time + f.start_s,
                "end": None if f.end_s is None else self.start_time + f.end_s, "magnitude": f.magnitude,
            })
        return {"scenario": self.name, "run": self.run, "world": self.layout.world, "layout": asdict(self.layout),
                "start_time": self.start_time, "duration_s": self.duration_s, "faults": labels}


@dataclass
class Telemetry:
    """Everything a scrape would have returned, at every scrape time of the scenario."""

    scenario: Scenario
    job: TrainingJob
    times: np.ndarray  # job time of each scrape (K,)
    rank: dict[str, np.ndarray]  # name -> (K, world)
    sections: dict[str, np.ndarray]  # section -> (K, world) seconds total
    section_counts: dict[str, np.ndarray]
    gpu: dict[str, np.ndarray]  # name -> (K, G), G = nodes * gpus_per_node
    xid_counts: dict[int, np.ndarray]  # xid -> (K, G)
    nic: dict[str, np.ndarray]  # counter -> (K, nodes, devices)

    @property
    def world(self) -> int:
        return self.job.world


def simulate(sc: Scenario) -> Telemetry:
    job = sc.job()
    recs = job.advance(sc.duration_s)
    K = int(math.floor(sc.duration_s / sc.scrape_s)) + 1
    times = np.arange(K) * sc.scrape_s
    world = job.world
    ends = np.array([r.end_s for r in recs]) if recs else np.zeros(0)
    idx = np.searchsorted(ends, times, side="right")  # steps completed by each scrape

    def cum_at(per_step: np.ndarray) -> np.ndarray:
        c = np.vstack([np.zeros((1, world)), np.cumsum(per_step, axis=0)]) if per_step.size else np.zeros((1, world))
        return c[idx]

    names = sorted({k for r in recs for k in r.sections})
    sections, counts = {}, {}
    for name in names:
        m = np.zeros((len(recs), world))
        has = np.zeros((len(recs), world))
        for i, r in enumerate(recs):
            v = r.sections.get(name)
            if v is not None:
                m[i] = v
                has[i] = 1
        sections[name] = cum_at(m)
        counts[name] = cum_at(has)
    step_dur = (ends - np.array([r.start_s for r in recs])) if recs else np.zeros(0)
    ones = np.ones((len(recs), world))
    rank = {
        "steps": cum_at(ones),
        "step_seconds": cum_at(step_dur[:, None] * ones) if recs else np.zeros((K, world)),
        "tokens": cum_at(ones * job.tokens_per_step),
        "last_step": np.where(idx[:, None] > 0, np.r_[np.nan, ends][idx][:, None], np.nan) * np.ones((1, world)),
    }
    gpu, xids, nic = _hardware(sc, job, times)
    return Telemetry(sc, job, times, rank, sections, counts, gpu, xids, nic)


def _hardware(sc: Scenario, job: TrainingJob, times: np.ndarray) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(sc.seed + 7919)
    K, N, gpn = times.size, len(job.node_names), sc.gpus_per_node
    G = N * gpn
    wob = rng.normal(0, 1, (K, G))
    g = {
        "sm_clock": np.full((K, G), MAX_SM_CLOCK) - np.abs(wob) * 8,
        "temp": 62 + rng.normal(0, 1.5, (K, G)),
        "power": 610 + rng.normal(0, 15, (K, G)),
        "util": np.full((K, G), 98.0),
        "health": np.zeros((K, G)),
        "last_xid": np.zeros((K, G)),
        "dbe": np.zeros((K, G)),
        "remap_pending": np.zeros((K, G)),
        "remap_failure": np.zeros((K, G)),
        "reasons": np.zeros((K, G)),
        "thermal_violation": np.zeros((K, G)),
        "power_violation": np.zeros((K, G)),
        "present": np.ones((K, G), dtype=bool),
    }
    xids: dict[int, np.ndarray] = {}
    used = np.zeros(G, bool)
    used[: job.world] = True
    g["util"][:, ~used] = 0.0
    g["power"][:, ~used] = 90.0
    dt = np.diff(times, prepend=times[0])
    nic: dict[str, np.ndarray] = {}
    base_rate = {"tx_bytes": 2.0e9, "rx_bytes": 2.0e9, "tx_pkts": 2.5e5, "rx_pkts": 2.5e5,
                 "retrans_pkts": 0.05, "retrans_bytes": 0.05 * 8192, "rx_drops": 0.02}
    for c in EFA_COUNTERS:
        lam = base_rate.get(c, 0.0)
        inc = rng.poisson(lam * dt[:, None, None] * np.ones((1, N, EFA_DEVICES_PER_NODE))) if lam < 1e6 else \
            lam * dt[:, None, None] * (1 + rng.normal(0, 0.02, (K, N, EFA_DEVICES_PER_NODE)))
        nic[c] = inc.astype(float)
    for f in sc.faults:
        if f.kind not in ("thermal", "xid79", "dbe", "efa"):
            continue
        active = (times >= f.start_s) & ((times < f.end_s) if f.end_s is not None else True)
        if f.kind == "efa":
            n = job.node_names.index(job.node_name(f.node))
            m = f.magnitude
            for c, lam in (("retrans_pkts", 400 * m), ("retrans_bytes", 400 * m * 8192), ("retrans_timeout_events", 4 * m),
                           ("unresponsive_remote_events", 1 * m), ("impaired_remote_conn_events", 0.5 * m)):
                extra = rng.poisson(lam * dt) * active
                nic[c][:, n, 0] += extra
            continue
        n = job.node_names.index(job.node_name(f.node))
        col = n * gpn + int(f.gpu)
        first = int(np.argmax(active)) if active.any() else None
        if f.kind == "thermal":
            g["sm_clock"][active, col] = MAX_SM_CLOCK / (1 + f.magnitude)
            g["temp"][active, col] = 88 + rng.normal(0, 1, int(active.sum()))
            g["reasons"][active, col] = 0x20 | 0x40
            g["thermal_violation"][:, col] = np.cumsum(active * dt * 1e6 * min(1.0, 2 * f.magnitude))
        elif f.kind == "dbe" and first is not None:
            g["dbe"][first:, col] += max(1.0, f.magnitude)
            g["last_xid"][first:, col] = 48
            # The row remap stays pending until the GPU is reset: end_s is that reset.
            g["remap_pending"][active, col] = 1
            g["health"][active, col] = 20
            xids.setdefault(48, np.zeros((K, G)))[first:, col] += 1
        elif f.kind == "xid79" and first is not None:
            g["last_xid"][first:, col] = 79
            g["health"][active, col] = 20
            xids.setdefault(79, np.zeros((K, G)))[first:, col] += 1
            # the exporter reports the XID and a failed health for 20 s, then the GPU is gone
            gone = active.copy()
            gone[first:first + max(1, int(round(20.0 / sc.scrape_s)))] = False
            g["present"][gone, col] = False
    for c in nic:
        nic[c] = np.cumsum(nic[c], axis=0)
    return g, xids, nic


def _series_index(tel: Telemetry, t: float) -> int:
    i = int(round(t / tel.scenario.scrape_s))
    if not 0 <= i < tel.times.size or abs(tel.times[i] - t) > 1e-6:
        raise ValueError(f"time {t} is not a scrape time of the scenario")
    return i


def gpu_uuid(node_idx: int, gpu: int) -> str:
    return f"GPU-{node_idx:08x}-{gpu:04x}-4{node_idx % 4096:03x}-8{gpu:03x}-{node_idx * 8 + gpu:012x}"


def snapshots(tel: Telemetry, interval_s: float = 15.0, window_s: float = 15.0) -> Iterator[Snapshot]:
    """Snapshots every ``interval_s`` from the first full window to the end of the scenario."""
    sc, job = tel.scenario, tel.job
    t = window_s
    coords = job.coords
    while t <= sc.duration_s + 1e-9:
        yield snapshot_at(tel, t, window_s, coords)
        t += interval_s


def snapshot_at(tel: Telemetry, t: float, window_s: float, coords: dict[str, np.ndarray] | None = None) -> Snapshot:
    sc, job = tel.scenario, tel.job
    coords = coords if coords is not None else job.coords
    i, j = _series_index(tel, t), _series_index(tel, t - window_s)
    d_steps = tel.rank["steps"][i] - tel.rank["steps"][j]
    d_step_s = tel.rank["step_seconds"][i] - tel.rank["step_seconds"][j]
    d_tok = tel.rank["tokens"][i] - tel.rank["tokens"][j]
    dsec = {k: v[i] - v[j] for k, v in tel.sections.items()}
    ranks = []
    for r in range(job.world):
        n = d_steps[r]
        sections = {k: float(v[r] / n) for k, v in dsec.items()} if n > 0 else {}
        last = tel.rank["last_step"][i, r]
        ranks.append(RankObs(
            run=sc.run, rank=r, node=job.node_of(r), local_rank=int(job.local_rank[r]), world_size=job.world,
            gpu=str(int(job.local_rank[r])), gpu_uuid=gpu_uuid(int(job.node_index[r]), int(job.local_rank[r])),
            pp=int(coords["pp"][r]) if sc.pp_labels else None, tp=int(coords["tp"][r]) if sc.pp_labels else None,
            dp=int(coords["dp"][r]) if sc.pp_labels else None, cp=int(coords["cp"][r]) if sc.pp_labels else None,
            up=True, step=float(tel.rank["steps"][i, r]),
            last_step_time=None if np.isnan(last) else float(sc.start_time + last),
            steps_rate=float(n / window_s), step_seconds=float(d_step_s[r] / n) if n > 0 else None,
            sections=sections, tokens_rate=float(d_tok[r] / window_s),
        ))
    gpus = []
    gd = tel.gpu
    gpn = sc.gpus_per_node
    win = slice(j + 1, i + 1)
    for col in range(len(job.node_names) * gpn):
        if not gd["present"][i, col]:
            continue
        ni, gi = divmod(col, gpn)
        xinc = {x: float(a[i, col] - a[j, col]) for x, a in tel.xid_counts.items() if a[i, col] - a[j, col] > 0}
        gpus.append(GpuObs(
            node=job.node_names[ni], gpu=str(gi), uuid=gpu_uuid(ni, gi), model=GPU_MODEL, present=True,
            health=float(gd["health"][i, col]), last_xid=float(gd["last_xid"][i, col]), xid_increase=xinc,
            dbe_increase=float(gd["dbe"][i, col] - gd["dbe"][j, col]), sbe_increase=0.0,
            remap_failure=float(gd["remap_failure"][i, col]), remap_pending=float(gd["remap_pending"][i, col]),
            retired_pending=0.0, sm_clock=float(gd["sm_clock"][win, col].mean()),
            temperature=float(gd["temp"][i, col]), power=float(gd["power"][i, col]),
            utilization=float(gd["util"][i, col]), clock_event_reasons=float(gd["reasons"][i, col]),
            thermal_violation_rate=float((gd["thermal_violation"][i, col] - gd["thermal_violation"][j, col]) / window_s),
            power_violation_rate=float((gd["power_violation"][i, col] - gd["power_violation"][j, col]) / window_s),
            nvlink_errors_increase=0.0, pcie_replay_increase=0.0,
        ))
    nics = []
    for ni, node in enumerate(job.node_names):
        for dv in range(EFA_DEVICES_PER_NODE):
            inc = {c: float(a[i, ni, dv] - a[j, ni, dv]) for c, a in tel.nic.items()}
            nics.append(NicObs(node=node, device=efa_device(dv), port="1", increase=inc,
                               tx_bytes_rate=inc["tx_bytes"] / window_s, rx_bytes_rate=inc["rx_bytes"] / window_s))
    nodes = []
    for ni, node in enumerate(job.node_names):
        cols = slice(ni * gpn, (ni + 1) * gpn)
        nodes.append(NodeObs(node=node, exporter_up=True, gpus_expected=float(gpn),
                             gpus_answering=float(gd["present"][i, cols].sum())))
    return Snapshot(time=sc.start_time + t, window_s=window_s, ranks=ranks, gpus=gpus, nics=nics, nodes=nodes)


def efa_device(i: int) -> str:
    return f"rdmap{16 + i * 16}s0"


# ---- OpenMetrics replay file ------------------------------------------------------------

def _labels(d: dict[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{k}="{s}"')
    return "{" + ",".join(parts) + "}"


def _fmt(v: float) -> str:
    if v != v:
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def write_openmetrics(tel: Telemetry, out: TextIO) -> int:
    """Write the replay file; returns the number of samples. One metric family at a time (the
    OpenMetrics grammar wants a family's lines together); within a family, time-major order,
    which promtool accepts as long as each series' timestamps increase."""
    sc, job = tel.scenario, tel.job
    T = sc.start_time + tel.times
    ts = [f"{x:.3f}" for x in T]
    n = 0
    world, gpn = job.world, sc.gpus_per_node
    rank_lbl = []
    for r in range(world):
        node = job.node_of(r)
        lr = int(job.local_rank[r])
        rank_lbl.append({"job": PROBE_JOB, "instance": f"{node}:{PROBE_PORT + lr}", "run": sc.run, "rank": r,
                         "local_rank": lr, "node": node})
    node_lbl = [{"job": NODE_JOB, "instance": f"{node}:{NODE_PORT}"} for node in job.node_names]

    K = len(ts)
    # scrapes of the node exporters: every k-th probe scrape
    every = int(round((sc.node_scrape_s or sc.scrape_s) / sc.scrape_s))
    node_k = (np.arange(K) % every == 0)[:, None]

    def family(name: str, typ: str, help_: str, rows: list[tuple[str, np.ndarray]], mask: np.ndarray | None = None,
               node: bool = False) -> None:
        """rows: (label string, values over K); mask (K, len(rows)) = sample present; ``node``: a
        node exporter's family (scraped every ``node_scrape_s``)."""
        nonlocal n
        if node:
            mask = np.broadcast_to(node_k, (K, len(rows))) if mask is None else node_k & mask
        out.write(f"# TYPE {name} {typ}\n# HELP {name} {help_}\n")
        sample_name = name if typ != "counter" else f"{name}_total"
        prefix = [f"{sample_name}{lbl} " for lbl, _ in rows]
        for k in range(len(ts)):
            tk = ts[k]
            for c, (_, vals) in enumerate(rows):
                v = vals[k]
                if v != v or (mask is not None and not mask[k, c]):
                    continue
                out.write(f"{prefix[c]}{_fmt(v)} {tk}\n")
                n += 1

    ones = np.ones(K)
    # targets are up for the whole scenario (a hang keeps the endpoints answering)
    family("up", "gauge", "1 if the target answered the scrape.",
           [(_labels(lb), ones) for lb in rank_lbl] + [(_labels(lb), ones) for lb in node_lbl],
           mask=np.hstack([np.ones((K, len(rank_lbl)), bool), np.repeat(node_k, len(node_lbl), axis=1)]))
    coords = job.coords
    info_rows = []
    for r, lb in enumerate(rank_lbl):
        extra = {"world_size": world, "gpu": int(job.local_rank[r]),
                 "gpu_uuid": gpu_uuid(int(job.node_index[r]), int(job.local_rank[r]))}
        if sc.pp_labels:
            extra.update({k: int(coords[k][r]) for k in ("pp", "tp", "dp", "cp")})
        info_rows.append((_labels({**lb, **extra}), ones))
    family("rankwatch_rank_info", "gauge", "Static identity of a training rank.", info_rows)
    family("rankwatch_steps", "counter", "Completed training steps.",
           [(_labels(lb), tel.rank["steps"][:, r]) for r, lb in enumerate(rank_lbl)])
    family("rankwatch_step_seconds", "counter", "Summed wall time of completed steps.",
           [(_labels(lb), tel.rank["step_seconds"][:, r]) for r, lb in enumerate(rank_lbl)])
    sec_rows, cnt_rows = [], []
    for s in tel.sections:
        for r, lb in enumerate(rank_lbl):
            lab = _labels({**lb, "section": s})
            sec_rows.append((lab, tel.sections[s][:, r]))
            cnt_rows.append((lab, tel.section_counts[s][:, r]))
    family("rankwatch_section_seconds", "counter", "Summed time inside a section.", sec_rows)
    family("rankwatch_section_count", "counter", "Completed sections.", cnt_rows)
    family("rankwatch_tokens", "counter", "Tokens processed by this rank.",
           [(_labels(lb), tel.rank["tokens"][:, r]) for r, lb in enumerate(rank_lbl)])
    family("rankwatch_last_step_timestamp_seconds", "gauge", "Unix time the last step finished.",
           [(_labels(lb), sc.start_time + tel.rank["last_step"][:, r]) for r, lb in enumerate(rank_lbl)])
    family("rankwatch_step", "gauge", "The training loop's own step number.",
           [(_labels(lb), tel.rank["steps"][:, r]) for r, lb in enumerate(rank_lbl)])

    # node exporter: identity, GPU counts, dcgm-named GPU series, EFA series
    family("rankwatch_node_info", "gauge", "Host name of this node exporter's target.",
           [(_labels({**lb, "Hostname": node}), ones) for lb, node in zip(node_lbl, job.node_names, strict=True)],
           node=True)
    present = tel.gpu["present"]
    exp_rows, ans_rows = [], []
    for ni, lb in enumerate(node_lbl):
        exp_rows.append((_labels(lb), ones * gpn))
        ans_rows.append((_labels(lb), present[:, ni * gpn:(ni + 1) * gpn].sum(axis=1).astype(float)))
    family("rankwatch_gpu_expected", "gauge", "GPUs this node should have.", exp_rows, node=True)
    family("rankwatch_gpu_answering", "gauge", "GPUs that answered NVML at the last scrape.", ans_rows, node=True)
    gpu_lbl = []
    for ni, node in enumerate(job.node_names):
        for gi in range(gpn):
            gpu_lbl.append({"gpu": gi, "UUID": gpu_uuid(ni, gi), "pci_bus_id": f"00000000:{0x18 + gi * 0x10:02X}:00.0",
                            "device": f"nvidia{gi}", "modelName": GPU_MODEL, "Hostname": node,
                            "DCGM_FI_DRIVER_VERSION": DRIVER, **node_lbl[ni]})
    gl = [_labels(lb) for lb in gpu_lbl]
    gd = tel.gpu
    # HELP from the GPU collector's own table. Counters are written as gauges: OpenMetrics (what
    # promtool backfills) would require a `_total` suffix that dcgm-exporter's names lack.
    for name, key in (
        ("DCGM_FI_DEV_SM_CLOCK", "sm_clock"),
        ("DCGM_FI_DEV_GPU_TEMP", "temp"),
        ("DCGM_FI_DEV_POWER_USAGE", "power"),
        ("DCGM_FI_DEV_GPU_UTIL", "util"),
        ("DCGM_FI_DEV_XID_ERRORS", "last_xid"),
        ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "dbe"),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "remap_failure"),
        ("DCGM_FI_DEV_ROW_REMAP_PENDING", "remap_pending"),
        ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "reasons"),
        ("DCGM_FI_DEV_THERMAL_VIOLATION", "thermal_violation"),
        ("DCGM_FI_DEV_POWER_VIOLATION", "power_violation"),
        ("DCGM_EXP_GPU_HEALTH_STATUS", "health"),
    ):
        family(name, "gauge", _DCGM_HELP[name], [(gl[c], gd[key][:, c]) for c in range(len(gl))], mask=present,
               node=True)
    xid_rows, xid_mask = [], []
    for x, arr in sorted(tel.xid_counts.items()):
        for c in range(len(gl)):
            if arr[:, c].any():
                xid_rows.append((_labels({**gpu_lbl[c], "xid": x}), arr[:, c]))
                xid_mask.append(present[:, c])
    if xid_rows:
        family("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "Count of XID errors seen since the exporter started.",
               xid_rows, mask=np.stack(xid_mask, axis=1), node=True)
    for c, arr in tel.nic.items():
        rows = []
        for ni, lb in enumerate(node_lbl):
            for dv in range(EFA_DEVICES_PER_NODE):
                rows.append((_labels({"device": efa_device(dv), "port": 1, **lb}), arr[:, ni, dv]))
        family(f"node_amazonefa_{c}", "gauge", f"EFA hw counter {c}.", rows, node=True)
    out.write("# EOF\n")
    return n


def write_replay(sc: Scenario, out_dir: str | Path) -> tuple[Path, Path, int]:
    """Write ``<name>.om`` and ``<name>.truth.json`` into ``out_dir``; returns paths and samples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tel = simulate(sc)
    om = out / f"{sc.name}.om"
    with om.open("w", encoding="utf-8", buffering=1 << 20) as fh:
        n = write_openmetrics(tel, fh)
    truth = out / f"{sc.name}.truth.json"
    truth.write_text(json.dumps(sc.ground_truth(), indent=2) + "\n", encoding="utf-8")
    return om, truth, n


# ---- the scenario suite of the quality benchmark -----------------------------------------

def suite(scale: str = "full", seeds: int = 2) -> list[Scenario]:
    """Labelled scenarios: healthy jobs with all benign noise, and one fault each.

    ``scale="full"``: layouts up to 256 ranks (8x4x8 on 32 nodes); ``"small"``: 64 ranks."""
    layouts = [(Layout(tp=8, pp=4, dp=2), 8), (Layout(tp=4, pp=2, dp=4), 4)]
    if scale == "full":
        layouts.append((Layout(tp=8, pp=4, dp=8), 32))
    out: list[Scenario] = []
    onset, dur = 240.0, 900.0
    for li, (lay, nodes) in enumerate(layouts):
        world = lay.world
        for s in range(seeds):
            seed = 1000 * li + s
            rng = np.random.default_rng(seed)
            rank = int(rng.integers(0, world))
            node, gpu = divmod(rank, 8)
            other_node = int(rng.integers(0, nodes))
            base = {"layout": lay, "nodes": nodes, "seed": seed, "duration_s": dur}
            tag = f"{world}r-s{s}"
            out.append(Scenario(f"healthy-{tag}", **base))
            out.append(Scenario(f"healthy-nolayout-{tag}", pp_labels=False, **base))
            for pct in (5, 10, 20, 50):
                out.append(Scenario(f"slowdown{pct}-{tag}", faults=[Fault("slowdown", rank=rank, start_s=onset, end_s=onset + 420,
                                                                         magnitude=pct / 100)], **base))
            out.append(Scenario(f"slowdown20-nolayout-{tag}", pp_labels=False,
                                faults=[Fault("slowdown", rank=rank, start_s=onset, magnitude=0.2)], **base))
            out.append(Scenario(f"thermal-{tag}", faults=[Fault("thermal", node=node, gpu=gpu, start_s=onset, end_s=onset + 420,
                                                                 magnitude=0.15)], **base))
            out.append(Scenario(f"dataloader-{tag}", faults=[Fault("dataloader", rank=rank, start_s=onset, end_s=onset + 420,
                                                                    magnitude=0.3)], **base))
            out.append(Scenario(f"xid79-{tag}", faults=[Fault("xid79", node=node, gpu=gpu, start_s=onset)], **base))
            out.append(Scenario(f"dbe-{tag}", faults=[Fault("dbe", node=node, gpu=gpu, start_s=onset, end_s=onset + 120,
                                                             magnitude=2)], **base))
            out.append(Scenario(f"efa-{tag}", faults=[Fault("efa", node=other_node, start_s=onset, end_s=onset + 420,
                                                             magnitude=0.3)], **base))
            out.append(Scenario(f"hang-{tag}", faults=[Fault("hang", start_s=onset, end_s=onset + 300)], **base))
            out.append(Scenario(f"jobslow-{tag}", faults=[Fault("job_slowdown", start_s=onset, end_s=onset + 420,
                                                                 magnitude=0.25)], **base))
            out.append(Scenario(f"spike-{tag}", faults=[
                Fault("spike", rank=rank, start_s=onset + 2 * k * 60, end_s=onset + 2 * k * 60 + 15, magnitude=0.5)
                for k in range(3)], **base))
    return out


def quiet_scenario(name: str = "quiet", **kw: Any) -> Scenario:
    """A noise-free scenario (for unit tests that need exact numbers)."""
    return Scenario(name, noise=QUIET, **kw)
