"""Replay data for large simulated jobs (thousands of ranks, nodes at p5 density), streamed.

``rankwatch.sim.scenario`` builds every quantity of a scenario and writes it for jobs of up to
a few hundred ranks. At 16 384 ranks on 2 048 p5 nodes (8 GPUs and 32 EFA devices each) the
same file holds ~1 million series; this module keeps that affordable:

* **Time-streamed simulation.** The job is advanced one scrape at a time and only cumulative
  counters are kept, one ``(scrapes, series)`` array per quantity: memory is O(series x scrapes)
  numbers, never O(steps x ranks) step records or the text itself.
* **Streamed text.** ``iter_chunks`` yields the file in chunks of about a megabyte, so it can go
  to a file (``write``) or straight into VictoriaMetrics' import API (``rankwatch sim scale
  --victoria-url``: no file at all) — promtool needs a file, VictoriaMetrics does not.
* **A sample of nodes** (``nodes_sample``): the node side (GPU and EFA series) only for that
  many nodes — the straggler's node among them — while every rank keeps its probe series.
  The node side is about two thirds of the samples at p5 density; the detector's rank verdicts
  do not depend on it.

Two text forms of the same samples: ``openmetrics`` (timestamps in seconds, ``# EOF``; what
``promtool tsdb create-blocks-from openmetrics`` and ``rankwatch detect --replay`` read) and
``prometheus`` (the text exposition format with millisecond timestamps; what VictoriaMetrics'
``/api/v1/import/prometheus`` reads). Both are written one metric family at a time
(OpenMetrics wants a family's samples together), time-major inside a family.

The node side holds the families the detector reads (``rankwatch.detectors.promql``), with the
series count per node of a real scrape of the node exporter at p5 density for each of them
(7 health watches and 8 watched XIDs per GPU; tests compare against a real scrape). Families
the detector never reads are left out: they cost Prometheus memory (see docs/sizing.md) but
nothing in a detector cycle."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from rankwatch.exporters.dcgm_fields import FIELD_BY_NAME, HEALTH_STATUS
from rankwatch.sim.scenario import (
    DRIVER,
    GPU_MODEL,
    MAX_SM_CLOCK,
    NODE_JOB,
    NODE_PORT,
    PROBE_JOB,
    PROBE_PORT,
    _labels,  # the replay file's label text, written one way
    efa_device,
    gpu_uuid,
)
from rankwatch.sim.training import Fault, Layout, Noise, TrainingJob

FORMATS = ("openmetrics", "prometheus")
P5_GPUS = 8
P5_EFA_DEVICES = 32
# What the GPU collector exports per GPU for these two families (exporters/gpu.py): one
# health series per DCGM watch, one XID count per watched code.
HEALTH_WATCHES = ("ALL", "MEM", "NVLINK", "PCIE", "PMU", "POWER", "THERMAL")
WATCHED_XIDS = (48, 63, 64, 74, 79, 94, 95, 119)
# EFA port counters written per device: the detector's error counters and throughput, and the
# packet counts the alert rules and dashboards use.
EFA_COUNTERS = ("tx_bytes", "rx_bytes", "tx_pkts", "rx_pkts", "retrans_pkts", "retrans_bytes",
                "retrans_timeout_events", "unresponsive_remote_events", "impaired_remote_conn_events", "rx_drops")
_EFA_RATE = {"tx_bytes": 2.0e9, "rx_bytes": 2.0e9, "tx_pkts": 2.5e5, "rx_pkts": 2.5e5,
             "retrans_pkts": 0.05, "retrans_bytes": 0.05 * 8192, "rx_drops": 0.02}
# GPU families: name -> how the simulation fills it.
GPU_GAUGES = ("DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_UTIL",
              "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_ROW_REMAP_PENDING",
              "DCGM_FI_DEV_CLOCKS_EVENT_REASONS")
# Counters in dcgm-exporter's names (no _total suffix): written as gauges, as scenario.py does,
# because OpenMetrics would require the suffix.
GPU_COUNTERS = ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_THERMAL_VIOLATION",
                "DCGM_FI_DEV_POWER_VIOLATION", "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
                "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
                "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL")
_DCGM_HELP = {f.name: f.help for f in (*FIELD_BY_NAME.values(), HEALTH_STATUS)}
_CHUNK = 1 << 20  # characters per yielded chunk


@dataclass(frozen=True)
class ScaleJob:
    """A large synchronous job. ``ranks`` = tp x pp x dp; ``nodes_sample`` None = every node."""

    ranks: int
    tp: int = 8
    pp: int = 4
    gpus_per_node: int = P5_GPUS
    efa_per_node: int = P5_EFA_DEVICES
    duration_s: float = 600.0
    scrape_s: float = 15.0
    step_s: float = 2.0
    straggler: int | None = None
    magnitude: float = 0.2
    onset_s: float = 240.0
    nodes_sample: int | None = None
    seed: int = 0
    run: str = "sim-run"
    start_time: float = 1_750_000_000.0
    noise: Noise = field(default_factory=Noise)

    def __post_init__(self) -> None:
        for name in ("ranks", "tp", "pp", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.efa_per_node < 0:
            raise ValueError(f"efa_per_node must be >= 0, got {self.efa_per_node}")
        if self.ranks % (self.tp * self.pp):
            raise ValueError(f"{self.ranks} ranks are not a multiple of tp x pp = {self.tp * self.pp}")
        if self.ranks % self.gpus_per_node:
            raise ValueError(f"{self.ranks} ranks do not fill whole nodes of {self.gpus_per_node} GPUs")
        if self.duration_s <= 0 or self.scrape_s <= 0 or self.step_s <= 0:
            raise ValueError("duration, scrape interval and step time must be positive")
        if self.straggler is not None and not 0 <= self.straggler < self.ranks:
            raise ValueError(f"straggler rank must be between 0 and {self.ranks - 1}, got {self.straggler}")
        if self.nodes_sample is not None and self.nodes_sample < 1:
            raise ValueError(f"nodes_sample must be at least 1, got {self.nodes_sample}")

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, dp=self.ranks // (self.tp * self.pp))

    @property
    def nodes(self) -> int:
        return self.ranks // self.gpus_per_node

    def sampled_nodes(self) -> list[int]:
        """Node indices that get node-exporter series: evenly spread, the straggler's included."""
        n = self.nodes
        k = n if self.nodes_sample is None else min(self.nodes_sample, n)
        picked = sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if k > 1 else [0]
        if self.straggler is not None:
            mine = self.straggler // self.gpus_per_node
            if mine not in picked:
                picked[int(np.argmin([abs(p - mine) for p in picked]))] = mine
                picked.sort()
        return picked

    def training_job(self) -> TrainingJob:
        job = TrainingJob(self.layout, nodes=self.nodes, gpus_per_node=self.gpus_per_node, base_step_s=self.step_s,
                          seed=self.seed, noise=self.noise, run=self.run, start_time=self.start_time)
        if self.straggler is not None:
            job.add_fault(Fault("slowdown", rank=self.straggler, start_s=self.onset_s, magnitude=self.magnitude))
        return job

    def ground_truth(self, samples: int | None = None) -> dict[str, Any]:
        job = self.training_job()
        d = asdict(self)
        d.pop("noise")
        straggler = None
        if self.straggler is not None:
            r = self.straggler
            straggler = {"rank": r, "node": job.node_of(r), "pp": int(job.coords["pp"][r]),
                         "magnitude": self.magnitude, "start": self.start_time + self.onset_s,
                         "expect": ["straggler"]}
        return {"job": d, "run": self.run, "world": self.ranks, "layout": asdict(self.layout), "nodes": self.nodes,
                "nodes_with_exporter": [job.node_names[i] for i in self.sampled_nodes()],
                "straggler": straggler, "samples": samples}


@dataclass
class ScaleTelemetry:
    """Cumulative counters and gauges at every scrape, per series (rows = scrapes)."""

    job: ScaleJob
    node_names: list[str]
    local_rank: np.ndarray
    coords: dict[str, np.ndarray]
    times: np.ndarray  # job time of each scrape (K,)
    rank: dict[str, np.ndarray]  # steps, step_seconds, tokens, last_step -> (K, world)
    sections: dict[str, np.ndarray]  # section -> (K, world) seconds total
    section_counts: dict[str, np.ndarray]
    sampled: list[int]  # node indices with node-exporter series
    gpu: dict[str, np.ndarray]  # family -> (K, len(sampled) * gpus_per_node)
    efa: dict[str, np.ndarray]  # counter -> (K, len(sampled) * efa_per_node)


def simulate(job: ScaleJob) -> ScaleTelemetry:
    """Run the job scrape by scrape, keeping only what a scrape would have read."""
    tj = job.training_job()
    K = int(math.floor(job.duration_s / job.scrape_s + 1e-9)) + 1
    times = np.arange(K) * job.scrape_s
    world = job.ranks
    cum = {k: np.zeros(world) for k in ("steps", "step_seconds", "tokens")}
    last_end = math.nan
    rank = {k: np.zeros((K, world)) for k in ("steps", "step_seconds", "tokens")}
    rank["last_step"] = np.full((K, world), np.nan)
    sec_cum: dict[str, np.ndarray] = {}
    cnt_cum: dict[str, np.ndarray] = {}
    sections: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for k, t in enumerate(times):
        for rec in tj.advance(float(t)):
            cum["steps"] += 1
            cum["step_seconds"] += rec.end_s - rec.start_s
            cum["tokens"] += tj.tokens_per_step
            last_end = rec.end_s
            for name, v in rec.sections.items():
                if name not in sec_cum:
                    sec_cum[name] = np.zeros(world)
                    cnt_cum[name] = np.zeros(world)
                    sections[name] = np.zeros((K, world))
                    counts[name] = np.zeros((K, world))
                sec_cum[name] += v
                cnt_cum[name] += 1
        for name in ("steps", "step_seconds", "tokens"):
            rank[name][k] = cum[name]
        rank["last_step"][k] = last_end
        for name in sec_cum:
            sections[name][k] = sec_cum[name]
            counts[name][k] = cnt_cum[name]
    sampled = job.sampled_nodes()
    gpu, efa = _node_side(job, times, len(sampled))
    return ScaleTelemetry(job, tj.node_names, tj.local_rank, tj.coords, times, rank, sections, counts, sampled,
                          gpu, efa)


def _node_side(job: ScaleJob, times: np.ndarray, n_nodes: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Healthy GPUs under load and busy EFA devices for ``n_nodes`` nodes."""
    rng = np.random.default_rng(job.seed + 7919)
    K, G, E = times.size, n_nodes * job.gpus_per_node, n_nodes * job.efa_per_node
    zeros = np.zeros((K, G))
    gpu = {name: zeros for name in (*GPU_GAUGES, *GPU_COUNTERS)}
    gpu["DCGM_FI_DEV_SM_CLOCK"] = MAX_SM_CLOCK - np.round(np.abs(rng.normal(0, 8, (K, G))))
    gpu["DCGM_FI_DEV_GPU_TEMP"] = np.round(62 + rng.normal(0, 1.5, (K, G)))
    gpu["DCGM_FI_DEV_POWER_USAGE"] = np.round(610 + rng.normal(0, 15, (K, G)), 3)
    gpu["DCGM_FI_DEV_GPU_UTIL"] = np.full((K, G), 98.0)
    dt = np.diff(times, prepend=times[0])[:, None]
    efa = {}
    for c in EFA_COUNTERS:
        lam = _EFA_RATE.get(c, 0.0)
        if lam >= 1e3:
            inc = np.round(lam * dt * (1 + rng.normal(0, 0.02, (K, E))))
        else:
            inc = rng.poisson(lam * dt * np.ones((1, E))).astype(float)
        efa[c] = np.cumsum(inc, axis=0)
    return gpu, efa


# ---- text ----------------------------------------------------------------------------------

def _value_strings(row: np.ndarray) -> list[str]:
    """Text of each value: integers without a fraction (most counters), others exactly."""
    if np.all(np.mod(row, 1) == 0) and np.all(np.abs(row) < 1e15):
        return list(map(str, row.astype(np.int64).tolist()))
    return [str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v) for v in row.tolist()]


@dataclass(frozen=True)
class _Cut:
    """A place where the text may be cut into separate files: before a family (``meta`` empty)
    or between two scrapes of one (``meta``: the family's TYPE/HELP lines, which a file that
    starts there needs)."""

    meta: str = ""


class _Writer:
    """Family-major text: one family's samples for every scrape, then the next family."""

    def __init__(self, tel: ScaleTelemetry, fmt: str, marks: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        self.tel = tel
        self.fmt = fmt
        t = tel.job.start_time + tel.times
        if fmt == "openmetrics":
            self.ts = [f"{x:.3f}" for x in t]
        else:
            self.ts = [str(int(round(x * 1000))) for x in t]
        self.samples = 0
        self.buf: list[str] = []
        self.size = 0
        self.marks = marks

    def _cut(self, meta: str) -> Iterator[str | _Cut]:
        if self.marks:
            if self.buf:
                yield "".join(self.buf)
                self.buf, self.size = [], 0
            yield _Cut(meta)

    def _put(self, s: str) -> Iterator[str]:
        self.buf.append(s)
        self.size += len(s)
        if self.size >= _CHUNK:
            out = "".join(self.buf)
            self.buf, self.size = [], 0
            yield out

    def family(self, name: str, typ: str, help_: str, labels: list[str], values: np.ndarray | list[np.ndarray]
               ) -> Iterator[str | _Cut]:
        """``values``: (K, len(labels)) array, or one (K,) array per label set. NaN = no sample."""
        meta = f"# TYPE {name} {typ}\n# HELP {name} {help_}\n" if self.fmt == "openmetrics" else f"# TYPE {name} {typ}\n"
        yield from self._cut("")
        yield from self._put(meta)
        sample = f"{name}_total" if typ == "counter" else name
        prefixes = [f"{sample}{lb} " for lb in labels]
        mat = values if isinstance(values, np.ndarray) else np.stack(values, axis=1)
        for k, ts in enumerate(self.ts):
            if k:
                yield from self._cut(meta)
            row = mat[k]
            keep = ~np.isnan(row)
            if keep.all():
                pre, vals = prefixes, _value_strings(row)
            else:
                idx = np.flatnonzero(keep)
                pre, vals = [prefixes[i] for i in idx], _value_strings(row[idx])
            tail = f" {ts}\n"
            yield from self._put("".join([p + v + tail for p, v in zip(pre, vals, strict=True)]))
            self.samples += len(vals)

    def finish(self) -> Iterator[str]:
        if self.fmt == "openmetrics":
            self.buf.append("# EOF\n")
        if self.buf:
            yield "".join(self.buf)
            self.buf, self.size = [], 0


def iter_chunks(tel: ScaleTelemetry, fmt: str = "openmetrics", counter: list[int] | None = None) -> Iterator[str]:
    """The replay text in chunks of about a megabyte. ``counter``, if given, receives the number
    of samples written once the iterator is exhausted (``counter[0]``)."""
    for chunk in _stream(tel, fmt, counter, marks=False):
        assert isinstance(chunk, str)
        yield chunk


def _stream(tel: ScaleTelemetry, fmt: str, counter: list[int] | None, marks: bool) -> Iterator[str | _Cut]:
    job = tel.job
    w = _Writer(tel, fmt, marks)
    world, gpn = job.ranks, job.gpus_per_node
    K = tel.times.size
    node_of = [tel.node_names[r // gpn] for r in range(world)]
    lr = tel.local_rank.tolist()
    rank_lbl = [{"job": PROBE_JOB, "instance": f"{node_of[r]}:{PROBE_PORT + lr[r]}", "run": job.run, "rank": r,
                 "local_rank": lr[r], "node": node_of[r]} for r in range(world)]
    rl = [_labels(d) for d in rank_lbl]
    sampled = [tel.node_names[i] for i in tel.sampled]
    node_lbl = [_labels({"job": NODE_JOB, "instance": f"{n}:{NODE_PORT}"}) for n in sampled]
    ones_r = np.ones((K, world))
    ones_n = np.ones((K, len(sampled)))

    yield from w.family("up", "gauge", "1 if the target answered the scrape.", rl + node_lbl,
                        np.hstack([ones_r, ones_n]))
    info = []
    coords = {k: v.tolist() for k, v in tel.coords.items()}
    for r, d in enumerate(rank_lbl):
        ni = r // gpn
        info.append(_labels({**d, "world_size": world, "gpu": lr[r], "gpu_uuid": gpu_uuid(ni, lr[r]),
                             **{k: coords[k][r] for k in ("pp", "tp", "dp", "cp")}}))
    yield from w.family("rankwatch_rank_info", "gauge", "Static identity of a training rank.", info, ones_r)
    yield from w.family("rankwatch_steps", "counter", "Completed training steps.", rl, tel.rank["steps"])
    yield from w.family("rankwatch_step_seconds", "counter", "Summed wall time of completed steps.", rl,
                        tel.rank["step_seconds"])
    names = list(tel.sections)
    sec_lbl = [_labels({**d, "section": s}) for s in names for d in rank_lbl]
    if names:
        yield from w.family("rankwatch_section_seconds", "counter", "Summed time inside a section.", sec_lbl,
                            np.hstack([tel.sections[s] for s in names]))
        yield from w.family("rankwatch_section_count", "counter", "Completed sections.", sec_lbl,
                            np.hstack([tel.section_counts[s] for s in names]))
    yield from w.family("rankwatch_tokens", "counter", "Tokens processed by this rank.", rl, tel.rank["tokens"])
    yield from w.family("rankwatch_last_step_timestamp_seconds", "gauge", "Unix time the last step finished.", rl,
                        job.start_time + tel.rank["last_step"])
    yield from w.family("rankwatch_step", "gauge", "The training loop's own step number.", rl, tel.rank["steps"])

    # node exporters of the sampled nodes: identity, GPU counts, dcgm-named GPU series, EFA series
    yield from w.family("rankwatch_node_info", "gauge", "Host name of this node exporter's target.",
                        [lb[:-1] + f',Hostname="{n}"}}' for lb, n in zip(node_lbl, sampled, strict=True)], ones_n)
    yield from w.family("rankwatch_gpu_expected", "gauge", "GPUs this node should have.", node_lbl, ones_n * gpn)
    yield from w.family("rankwatch_gpu_answering", "gauge", "GPUs that answered NVML at the last scrape.", node_lbl,
                        ones_n * gpn)
    gpu_lbl = []
    for ni, node in zip(tel.sampled, sampled, strict=True):
        for gi in range(gpn):
            gpu_lbl.append({"gpu": gi, "UUID": gpu_uuid(ni, gi), "pci_bus_id": f"00000000:{0x18 + gi * 0x10:02X}:00.0",
                            "device": f"nvidia{gi}", "modelName": GPU_MODEL, "Hostname": node,
                            "DCGM_FI_DRIVER_VERSION": DRIVER, "job": NODE_JOB, "instance": f"{node}:{NODE_PORT}"})
    gl = [_labels(d) for d in gpu_lbl]
    for name in (*GPU_GAUGES, *GPU_COUNTERS):
        yield from w.family(name, "gauge", _DCGM_HELP[name], gl, tel.gpu[name])
    zeros = np.zeros((K, len(gl)))
    health = [_labels({**d, "health_error_code": "DCGM_FR_OK", "health_watch": h})
              for h in HEALTH_WATCHES for d in gpu_lbl]
    yield from w.family(HEALTH_STATUS.name, "gauge", HEALTH_STATUS.help, health, np.tile(zeros, len(HEALTH_WATCHES)))
    xid = [_labels({**d, "xid": x}) for x in WATCHED_XIDS for d in gpu_lbl]
    yield from w.family("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "Count of XID errors seen since the exporter started.",
                        xid, np.tile(zeros, len(WATCHED_XIDS)))
    efa_lbl = [_labels({"device": efa_device(dv), "port": 1, "job": NODE_JOB, "instance": f"{n}:{NODE_PORT}"})
               for n in sampled for dv in range(job.efa_per_node)]
    if efa_lbl:
        for c in EFA_COUNTERS:
            yield from w.family(f"node_amazonefa_{c}", "gauge", f"EFA hw counter {c}.", efa_lbl, tel.efa[c])
    yield from w.finish()
    if counter is not None:
        counter[:] = [w.samples]


def write(tel: ScaleTelemetry, out: TextIO, fmt: str = "openmetrics") -> int:
    """Write the replay text to ``out``; returns the number of samples."""
    n = [0]
    for chunk in iter_chunks(tel, fmt, n):
        out.write(chunk)
    return n[0]


def write_parts(tel: ScaleTelemetry, out_dir: str | Path, name: str, max_bytes: int,
                counter: list[int] | None = None) -> Iterator[Path]:
    """The OpenMetrics text cut into files of about ``max_bytes`` (plus at most one scrape of one
    family), each a valid replay file: cuts fall between families or between two scrapes of one
    family, whose TYPE/HELP lines then open the next file, and every file ends in ``# EOF``.
    Yields each path as soon as its file is complete: the caller can backfill and delete one
    part while the next is written, so the whole text never sits on disk. ``counter`` receives
    the total number of samples at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eof = "# EOF\n"
    part, size = 0, 0
    fh: TextIO | None = None
    path = out / name
    for chunk in _stream(tel, "openmetrics", counter, marks=True):
        if isinstance(chunk, _Cut):
            if fh is not None and size >= max_bytes:
                fh.write(eof)
                fh.close()
                fh = None
                yield path
            if fh is None and chunk.meta:  # a family goes on in the next file
                chunk = chunk.meta
            else:
                continue
        if fh is None:
            path = out / f"{name}.part{part:03d}.om"
            fh = path.open("w", encoding="utf-8", buffering=1 << 20)
            part += 1
            size = 0
        if chunk.endswith(eof):  # the whole text's end marker: each part gets its own
            chunk = chunk[: -len(eof)]
        fh.write(chunk)
        size += len(chunk)
    if fh is not None:
        fh.write(eof)
        fh.close()
        yield path


def write_replay(job: ScaleJob, out_dir: str | Path, name: str = "scale", fmt: str = "openmetrics"
                 ) -> tuple[Path, Path, int]:
    """Write ``<name>.om`` (or ``.prom``) and ``<name>.truth.json``; returns paths and samples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tel = simulate(job)
    path = out / f"{name}.{'om' if fmt == 'openmetrics' else 'prom'}"
    with path.open("w", encoding="utf-8", buffering=1 << 20) as fh:
        n = write(tel, fh, fmt)
    truth = out / f"{name}.truth.json"
    truth.write_text(json.dumps(job.ground_truth(n), indent=2) + "\n", encoding="utf-8")
    return path, truth, n
