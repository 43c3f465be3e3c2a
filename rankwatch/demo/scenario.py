"""The demo's cluster shape, intervals and scripted timeline, as plain data.

The timeline is shared by two processes that never talk to each other: the cluster worker
(which injects the faults into the simulated GPUs, NICs and training job) and the demo's
front end (which judges the detector). Both derive it from the same ``DemoConfig`` and the same
start time, so it travels as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rankwatch.demo.scoring import Expect, Incident
from rankwatch.errors import ConfigError


@dataclass
class DemoConfig:
    nodes: int = 32
    gpus_per_node: int = 8
    tp: int = 8
    pp: int = 4
    efa_per_node: int = 4
    run: str = "llama70b-cpt"
    seed: int = 7
    # Compressed time: one simulated training step every step_seconds of wall time.
    step_seconds: float = 0.5
    tokens_per_step: int = 4096 * 8  # per rank: micro-batches × sequence length
    # Probes are scraped every scrape_interval, node exporters (about 900 series each, 20 ms
    # of CPU per scrape) every node_scrape_interval: 2 s keeps the whole demo near one core of
    # two. The detector evaluates every eval_interval over a window of the same length (three
    # scrapes): non-overlapping windows, so that its persistence counts independent evidence
    # and one GC pause is seen once.
    scrape_interval: float = 2.0
    node_scrape_interval: float = 2.0
    eval_interval: float = 6.0
    window: float = 6.0
    warmup_seconds: float = 16.0
    benign_seconds: float = 20.0
    incident_seconds: float = 32.0
    recovery_seconds: float = 20.0
    # After the last recovery, how long to keep watching for late events (resolutions).
    tail_seconds: float = 4.0
    address_prefix: str = "127.66"  # each simulated node gets its own loopback address

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"demo: --{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")

        for name in ("nodes", "gpus_per_node", "tp", "pp", "efa_per_node", "step_seconds", "scrape_interval",
                     "node_scrape_interval", "eval_interval", "window", "incident_seconds"):
            positive(name)
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(f"demo: {self.nodes} nodes × {self.gpus_per_node} GPUs = {self.world_size} ranks is not "
                              f"divisible by tp {self.tp} × pp {self.pp}")
        if self.world_size < 4 or self.nodes < 2:
            raise ConfigError("demo: need at least 2 nodes and 4 ranks (a straggler needs peers)")
        if self.window < 3 * self.scrape_interval or self.window < 2 * self.node_scrape_interval:
            raise ConfigError(f"demo: --window {self.window} must be at least 3 × --scrape-interval "
                              f"({self.scrape_interval}) and 2 × the node exporters' interval "
                              f"({self.node_scrape_interval}) for rate() to have samples")
        if self.nodes > 250 * 250:
            raise ConfigError("demo: at most 62 500 nodes")
        octets = self.address_prefix.split(".")
        if len(octets) != 2 or octets[0] != "127" or not octets[1].isdigit() or not 0 <= int(octets[1]) <= 255:
            raise ConfigError(f"demo: --address-prefix {self.address_prefix!r} must be 127.N (a loopback /16)")

    # ----- naming shared by the worker and the judge -----
    def node_name(self, i: int) -> str:
        width = max(2, len(str(self.nodes - 1)))
        return f"node-{i:0{width}d}"

    def node_address(self, i: int) -> str:
        return f"{self.address_prefix}.{i // 250}.{i % 250 + 1}"

    def rank_of(self, node: int, local_rank: int) -> int:
        return node * self.gpus_per_node + local_rank

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DemoConfig:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class FaultSpec:
    """One scripted change, in seconds after the timeline start. ``kind`` is one of
    thermal, efa_degraded, slow_dataloader or xid79. Benign noise is not scripted here: the
    simulated job makes it all along (``cluster.build_job``)."""

    name: str
    kind: str
    start: float
    duration: float | None  # None: still running (see Timeline.placed)
    node: int | None = None
    local_rank: int | None = None
    device: int | None = None  # EFA device index on the node
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> float | None:
        return None if self.duration is None else self.start + self.duration


@dataclass(frozen=True)
class Timeline:
    faults: tuple[FaultSpec, ...]
    total_seconds: float
    slots: tuple[tuple[str, str, float, float], ...]  # (name, title, start, end) for the progress line

    def to_json(self) -> str:
        return json.dumps({"faults": [asdict(f) for f in self.faults], "total_seconds": self.total_seconds,
                           "slots": [list(s) for s in self.slots]})

    @classmethod
    def from_json(cls, text: str) -> Timeline:
        data = json.loads(text)
        return cls(tuple(FaultSpec(**f) for f in data["faults"]), data["total_seconds"],
                   tuple(tuple(s) for s in data["slots"]))

    def nominal_seconds(self, i: int) -> float:
        """Slot ``i``'s scripted length; the last slot includes the tail after it."""
        name, _title, start, end = self.slots[i]
        return (self.total_seconds if i == len(self.slots) - 1 else end) - start

    def placed(self, starts: Sequence[float], *, end: float | None = None, now: float | None = None) -> Timeline:
        """The timeline as played: slot ``i`` began ``starts[i]`` seconds after t0 and lasted
        until the next one began (the demo holds a slot until the detector has seen what the
        slot is for: ``runner.Pacer``). The last slot started ends at ``end``. While ``end`` is
        None that slot is still running: its fault is open-ended (``duration`` None) and slots
        not started yet carry no fault; for display, the running slot lasts its scripted
        length or until just after ``now``, and the rest follow at their scripted lengths."""
        if not 1 <= len(starts) <= len(self.slots):
            raise ValueError(f"{len(starts)} slot starts for a timeline of {len(self.slots)} slots")
        by_slot = {f.name: f for f in self.faults}
        running = len(starts) - 1
        slots: list[tuple[str, str, float, float]] = []
        faults: list[FaultSpec] = []
        t = 0.0
        for i, (name, title, _s, _e) in enumerate(self.slots):
            if i < len(starts):
                t = starts[i]
            if i < running:
                stop = starts[i + 1]
            elif i == running and end is not None:
                stop = end
            else:  # running or not started yet: a projection (the running slot goes on past now)
                stop = max(t + self.nominal_seconds(i), now + 1.0 if now is not None and i == running else 0.0)
            f = by_slot.get(name)
            if f is not None and i <= running:
                open_ended = i == running and end is None
                faults.append(replace(f, start=t, duration=None if open_ended else stop - t))
            slots.append((name, title, t, stop))
            t = stop
        return Timeline(tuple(faults), t, tuple(slots))


def _pick(cfg: DemoConfig, fraction: float, local_rank: int) -> tuple[int, int]:
    """A node/GPU at about ``fraction`` of the cluster, so incidents land on different nodes
    and, at full scale, in different pipeline stages."""
    node = min(cfg.nodes - 1, int(cfg.nodes * fraction))
    return node, local_rank % cfg.gpus_per_node


def build_timeline(cfg: DemoConfig) -> Timeline:
    """Warm-up, a benign slot (the first evaluation step falls in it; GC pauses, sequence-length
    imbalance and the heavier last pipeline stage run throughout), then four incidents with
    recovery between them."""
    t = cfg.warmup_seconds
    faults: list[FaultSpec] = []
    slots: list[tuple[str, str, float, float]] = [("warmup", "warm-up", 0.0, t)]
    benign_end = t + cfg.benign_seconds
    slots.append(("benign", "benign noise: eval step, GC pauses, last-stage imbalance", t, benign_end))
    t = benign_end
    thermal_node, thermal_gpu = _pick(cfg, 0.1, 5)
    efa_node, _ = _pick(cfg, 0.55, 0)
    dl_node, dl_gpu = _pick(cfg, 0.45, 6)
    xid_node, xid_gpu = _pick(cfg, 0.8, 2)
    if dl_node == thermal_node and cfg.nodes > 2:
        dl_node = (thermal_node + 1) % cfg.nodes
    plan = [
        FaultSpec("thermal", "thermal", 0, cfg.incident_seconds, node=thermal_node, local_rank=thermal_gpu,
                  params={"slowdown": 0.25}),
        FaultSpec("efa", "efa_degraded", 0, cfg.incident_seconds, node=efa_node, device=0,
                  params={"slowdown": 0.06}),
        FaultSpec("dataloader", "slow_dataloader", 0, cfg.incident_seconds, node=dl_node, local_rank=dl_gpu,
                  params={"extra_steps": 0.4}),
        FaultSpec("xid79", "xid79", 0, cfg.incident_seconds, node=xid_node, local_rank=xid_gpu),
    ]
    titles = {
        "thermal": "GPU thermal throttling → straggler",
        "efa": "degraded EFA link",
        "dataloader": "slow dataloader on one rank",
        "xid79": "XID 79: GPU fell off the bus → job hangs",
    }
    for f in plan:
        placed = FaultSpec(f.name, f.kind, t, f.duration, f.node, f.local_rank, f.device, f.params)
        faults.append(placed)
        slots.append((f.name, titles[f.name], t, t + f.duration))
        t += f.duration
        slots.append((f"recover-{f.name}", "recovery", t, t + cfg.recovery_seconds))
        t += cfg.recovery_seconds
    return Timeline(tuple(faults), t + cfg.tail_seconds, tuple(slots))


def expected_incidents(cfg: DemoConfig, timeline: Timeline, t0: float) -> list[Incident]:
    """What the detector must say about each scripted slot (absolute Unix times)."""
    out: list[Incident] = []
    titles = {s[0]: s[1] for s in timeline.slots}
    benign = next(s for s in timeline.slots if s[0] == "benign")
    out.append(Incident("benign", titles["benign"], t0 + benign[2], t0 + benign[3], required=(), benign=True))
    run_drop = Expect("throughput_drop")
    for f in timeline.faults:
        assert f.node is not None
        node = cfg.node_name(f.node)
        node_ranks = frozenset(cfg.rank_of(f.node, lr) for lr in range(cfg.gpus_per_node))
        if f.kind == "thermal":
            assert f.local_rank is not None
            rank = cfg.rank_of(f.node, f.local_rank)
            required = (Expect("straggler", rank=rank),)
            allowed = (Expect("gpu_fault", node=node, gpu=str(f.local_rank)), run_drop)
        elif f.kind == "efa_degraded":
            required = (Expect("network", node=node),)
            # A slow link makes its node's ranks late into collectives: naming them is right too.
            allowed = (Expect("straggler", ranks=node_ranks), run_drop)
        elif f.kind == "slow_dataloader":
            assert f.local_rank is not None
            required = (Expect("straggler", rank=cfg.rank_of(f.node, f.local_rank)),)
            allowed = (run_drop,)
        elif f.kind == "xid79":
            assert f.local_rank is not None
            required = (Expect("gpu_fault", node=node, gpu=str(f.local_rank)), Expect("hang"))
            # The node's own account of the loss ("only 7 of 8 GPUs answer") names the right node.
            allowed = (Expect("gpu_fault", node=node), run_drop,
                       Expect("straggler", rank=cfg.rank_of(f.node, f.local_rank)), Expect("data_gap"))
        else:
            raise ValueError(f"unknown fault kind {f.kind}")
        end = math.inf if f.end is None else t0 + f.end
        out.append(Incident(f.name, titles[f.name], t0 + f.start, end, required, allowed))
    return out
