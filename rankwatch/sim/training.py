"""A simulated synchronous training job: per-rank, per-step section times with realistic noise
and injectable faults. Vectorised over ranks with numpy, deterministic for a seed.

Synchronous semantics: every rank's step ends at the same instant. Each rank first does its
own work (dataloader, forward, backward, optimizer, plus eval/checkpoint steps); the step's
collectives then complete when the slowest rank arrives, so

    comm_r = max_r'(busy_r') - busy_r + base_comm     (busy = own work)

and the straggler is the rank with the most own work and the least comm wait.

    job = TrainingJob(Layout(tp=8, pp=4, dp=8), nodes=32, gpus_per_node=8, base_step_s=2.0, seed=1)
    job.add_fault(Fault("thermal", node=3, gpu=5, start_s=300, end_s=900, magnitude=0.2))
    records = job.advance(600.0)          # StepRecords of every step that ended by t = 600 s
    job.hardware_faults_at(450.0)         # -> [HardwareFault(kind="thermal", node="node-03", gpu=5, ...)]

Times are seconds since the job started; ``job.start_time`` maps them to Unix time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SECTIONS = ("dataloader", "forward", "backward", "optimizer", "comm")
# Share of a nominal step spent in each part (stage weight 1, no noise).
SHARE = {"dataloader": 0.02, "forward": 0.30, "backward": 0.55, "optimizer": 0.05}
BASE_COMM_SHARE = 0.08

FAULT_KINDS = ("slowdown", "spike", "thermal", "dataloader", "xid79", "dbe", "efa", "hang", "job_slowdown")
HARDWARE_KINDS = ("thermal", "xid79", "dbe", "efa")


@dataclass(frozen=True)
class Layout:
    """Parallel layout. Ranks are ordered tp fastest, then cp, dp, pp (Megatron's default order),
    and placed on nodes like torchrun: node = rank // gpus_per_node, GPU = rank % gpus_per_node."""

    tp: int = 8
    pp: int = 4
    dp: int = 8
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def coords(self) -> dict[str, np.ndarray]:
        r = np.arange(self.world)
        return {
            "tp": r % self.tp,
            "cp": (r // self.tp) % self.cp,
            "dp": (r // (self.tp * self.cp)) % self.dp,
            "pp": r // (self.tp * self.cp * self.dp),
        }


@dataclass(frozen=True)
class Noise:
    """Benign noise; none of it may raise an alert."""

    jitter: float = 0.01  # lognormal sigma of every section, per rank and step
    seq_imbalance: float = 0.03  # sigma of per-step compute factor, shared by a dp replica
    gc_prob: float = 0.01  # chance a rank pauses for GC in a step
    gc_pause: float = 0.25  # GC pause, as a fraction of the nominal step
    eval_every: int = 100  # every N steps all ranks run an evaluation (0 = never)
    eval_factor: float = 2.0  # eval time in nominal steps
    checkpoint_every: int = 250  # every N steps all ranks write a checkpoint (0 = never)
    checkpoint_factor: float = 4.0
    first_stage_weight: float = 1.08  # embedding on the first pipeline stage
    last_stage_weight: float = 1.20  # loss / vocabulary projection on the last stage
    warmup_s: float = 45.0  # time constant of the warm-up slowdown
    warmup_extra: float = 0.8  # compute is (1 + extra) slower at t = 0, decaying exponentially


QUIET = Noise(jitter=0.0, seq_imbalance=0.0, gc_prob=0.0, eval_every=0, checkpoint_every=0,
              first_stage_weight=1.0, last_stage_weight=1.0, warmup_extra=0.0)


@dataclass(frozen=True)
class Fault:
    """An injected fault. ``rank`` for rank faults, ``node`` (index or name) and ``gpu`` (index)
    for hardware ones; ``end_s`` None = until the end. ``magnitude``: fractional slowdown
    (0.1 = 10 % slower compute) for slowdown/spike/thermal/job_slowdown, extra dataloader
    time in nominal steps for dataloader, comm slowdown fraction for efa."""

    kind: str
    rank: int | None = None
    node: int | str | None = None
    gpu: int | None = None
    start_s: float = 0.0
    end_s: float | None = None
    magnitude: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(FAULT_KINDS)})")

    def active(self, t: float) -> bool:
        return t >= self.start_s and (self.end_s is None or t < self.end_s)


@dataclass(frozen=True)
class HardwareFault:
    """What simulated NVML / EFA sysfs should show at a moment (see ``hardware_faults_at``)."""

    kind: str  # thermal | xid79 | dbe | efa
    node: str
    gpu: int | None
    magnitude: float
    start_s: float


@dataclass
class StepRecord:
    step: int  # the loop's own step number (1-based)
    start_s: float
    end_s: float  # same on every rank (synchronous)
    sections: dict[str, np.ndarray]  # section -> seconds per rank, shape (world,)


@dataclass
class TrainingJob:
    layout: Layout
    nodes: int | list[str] = 32
    gpus_per_node: int = 8
    base_step_s: float = 2.0
    seed: int = 0
    noise: Noise = field(default_factory=Noise)
    run: str = "sim-run"
    start_time: float = 1_750_000_000.0
    tokens_per_step: int = 4096 * 8

    def __post_init__(self) -> None:
        self.node_names = (list(self.nodes) if not isinstance(self.nodes, int)
                           else [f"node-{i:02d}" for i in range(self.nodes)])
        world = self.layout.world
        if world > len(self.node_names) * self.gpus_per_node:
            raise ValueError(f"{world} ranks do not fit on {len(self.node_names)} nodes x {self.gpus_per_node} GPUs")
        self.rng = np.random.default_rng(self.seed)
        self.coords = self.layout.coords()
        r = np.arange(world)
        self.node_index = r // self.gpus_per_node
        self.local_rank = r % self.gpus_per_node
        pp = self.coords["pp"]
        w = np.ones(world)
        if self.layout.pp > 1:
            w[pp == 0] = self.noise.first_stage_weight
            w[pp == self.layout.pp - 1] = self.noise.last_stage_weight
        self.stage_weight = w
        self.faults: list[Fault] = []
        self.t = 0.0
        self.step = 0

    # ---- identity -----------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.layout.world

    def node_of(self, rank: int) -> str:
        return self.node_names[int(self.node_index[rank])]

    def rank_of(self, node: int | str, gpu: int) -> int:
        ni = node if isinstance(node, int) else self.node_names.index(node)
        return int(ni * self.gpus_per_node + gpu)

    def node_name(self, node: int | str) -> str:
        return self.node_names[node] if isinstance(node, int) else node

    # ---- faults ---------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> None:
        if fault.kind in ("slowdown", "spike", "dataloader") and fault.rank is None:
            raise ValueError(f"{fault.kind} fault needs a rank")
        if fault.kind in ("thermal", "xid79", "dbe") and (fault.node is None or fault.gpu is None):
            raise ValueError(f"{fault.kind} fault needs a node and a gpu")
        if fault.kind == "efa" and fault.node is None:
            raise ValueError("efa fault needs a node")
        self.faults.append(fault)

    def fault_rank(self, f: Fault) -> int | None:
        if f.rank is not None:
            return f.rank
        if f.node is not None and f.gpu is not None:
            r = self.rank_of(f.node, f.gpu)
            return r if r < self.world else None
        return None

    def hardware_faults_at(self, t: float) -> list[HardwareFault]:
        """GPU and EFA faults active at job time ``t``, to drive simulated NVML and sysfs."""
        out = []
        for f in self.faults:
            if f.kind in HARDWARE_KINDS and f.active(t):
                node = self.node_name(f.node) if f.node is not None else self.node_of(f.rank or 0)
                out.append(HardwareFault(f.kind, node, f.gpu, f.magnitude, f.start_s))
        return out

    def hang_until(self, t: float) -> float | None:
        """If the job is hung at ``t``: when it resumes (inf = never); else None."""
        end = None
        for f in self.faults:
            if f.kind in ("hang", "xid79") and f.active(t):
                e = math.inf if f.end_s is None else f.end_s
                end = e if end is None else max(end, e)
        return end

    # ---- stepping ---------------------------------------------------------------------------
    def _step_sections(self, t: float) -> dict[str, np.ndarray]:
        n, nz, rng, base = self.world, self.noise, self.rng, self.base_step_s
        step_no = self.step + 1
        warm = 1.0 + nz.warmup_extra * math.exp(-t / nz.warmup_s) if nz.warmup_s > 0 else 1.0
        comp = self.stage_weight * warm
        if nz.seq_imbalance > 0:
            per_dp = np.exp(rng.normal(0, nz.seq_imbalance, self.layout.dp))
            seq = per_dp[self.coords["dp"]]
        else:
            seq = np.ones(n)

        def jit() -> np.ndarray:
            return np.exp(rng.normal(0, nz.jitter, n)) if nz.jitter > 0 else np.ones(n)

        s = {
            "dataloader": SHARE["dataloader"] * base * jit(),
            "forward": SHARE["forward"] * base * comp * seq * jit(),
            "backward": SHARE["backward"] * base * comp * seq * jit(),
            "optimizer": SHARE["optimizer"] * base * comp * jit(),
        }
        if nz.gc_prob > 0:
            gc = rng.random(n) < nz.gc_prob
            s["forward"] = s["forward"] + gc * nz.gc_pause * base
        if nz.eval_every and step_no % nz.eval_every == 0:
            s["eval"] = nz.eval_factor * base * jit()
        if nz.checkpoint_every and step_no % nz.checkpoint_every == 0:
            s["checkpoint"] = nz.checkpoint_factor * base * jit()
        slow = np.ones(n)
        net = 1.0
        for f in self.faults:
            if not f.active(t):
                continue
            if f.kind in ("slowdown", "spike", "thermal"):
                r = self.fault_rank(f)
                if r is not None:
                    slow[r] *= 1 + f.magnitude
            elif f.kind == "job_slowdown":
                slow *= 1 + f.magnitude
            elif f.kind == "dataloader":
                s["dataloader"] = s["dataloader"].copy()
                s["dataloader"][f.rank] += f.magnitude * base
            elif f.kind == "efa":
                net = max(net, 1 + f.magnitude)
        for k in ("forward", "backward", "optimizer"):
            s[k] = s[k] * slow
        busy = sum(s.values())
        comm_base = BASE_COMM_SHARE * base * net * jit()
        s["comm"] = busy.max() - busy + comm_base
        return s

    def advance(self, until_s: float) -> list[StepRecord]:
        """Run the job up to job time ``until_s``; return the steps that completed by then.

        A step still running at ``until_s`` is drawn again next call from the same random
        state, so any sequence of advance() calls gives the same steps."""
        out: list[StepRecord] = []
        while True:
            resume = self.hang_until(self.t)
            start = self.t
            stall = 0.0
            if resume is not None:
                if resume > until_s:
                    return out  # hung: no step completes before until_s
                stall = resume - self.t
            saved = self.rng.bit_generator.state
            sec = self._step_sections(start + stall)
            dur = float(sec["comm"][0] + sum(v[0] for k, v in sec.items() if k != "comm"))
            end = start + stall + dur
            if end > until_s:
                self.rng.bit_generator.state = saved
                return out
            if stall:
                # everyone was blocked in a collective while the job hung
                sec["comm"] = sec["comm"] + stall
            self.t = end
            self.step += 1
            out.append(StepRecord(self.step, start, end, sec))
