"""The simulated cluster, as two worker processes started by the demo (``runner``).

``--role nodes``: one real node exporter per simulated node (the GPU collector over a
``SimulatedNVML``, the EFA collector over a ``FakeEfaSysfs`` tree), each on its own loopback
address (``127.66.x.y:9410``, as a real node's IP), so Prometheus' ``instance`` names the node.

``--role ranks``: the simulated training job (``rankwatch.sim.training``) feeding one real
``rankwatch.Probe`` per rank, each on its node's address at ``9420 + local_rank``.

Each role runs as several shard processes (``--first``/``--count``): 256 HTTP servers in one
Python process queue behind one GIL and their scrapes take seconds; a few shards keep every
scrape in milliseconds and use every core. Every shard simulates the whole (cheap, vectorised,
deterministic) job and serves its own members.

All wait for ``start.json`` (the timeline's start time), then play the same scripted timeline
(``scenario.Timeline``) until killed. Before that they write ``--ready`` with their targets.
The front end decides when each slot of the timeline begins (it holds a slot until the
detector has seen what the slot is for) and publishes the start times in ``--schedule``;
every worker rereads that file each tick, before it advances, so all play the same faults at
the same job times."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from rankwatch.demo.scenario import DemoConfig, Timeline
from rankwatch.sim import faults as node_faults
from rankwatch.sim.faults import NODE_FAULTS

log = logging.getLogger("rankwatch.demo.cluster")

NODE_EXPORTER_PORT = 9410
PROBE_BASE_PORT = 9420
TICK_S = 0.25
COUNTER_PERIOD_S = 1.0


def node_targets(cfg: DemoConfig) -> list[str]:
    """``host:port`` of every node exporter: each node has its own loopback address."""
    return [f"{cfg.node_address(i)}:{NODE_EXPORTER_PORT}" for i in range(cfg.nodes)]


def probe_targets(cfg: DemoConfig) -> list[str]:
    """``host:port`` of every rank's probe, in rank order (torchrun placement)."""
    return [f"{cfg.node_address(r // cfg.gpus_per_node)}:{PROBE_BASE_PORT + r % cfg.gpus_per_node}"
            for r in range(cfg.world_size)]


def _skip_reverse_dns() -> None:
    """``http.server`` resolves the address it binds back to a host name (``socket.getfqdn``),
    only to fill the WSGI ``SERVER_NAME``. For 127.66.x.y that is a DNS round trip per server:
    80 ms each here, seconds each with an unreachable resolver, times 288 servers. This worker
    process only serves loopback, so answer those lookups with the address itself."""
    real = socket.getfqdn

    def getfqdn(name: str = "") -> str:
        return name if name.startswith("127.") else real(name)

    socket.getfqdn = getfqdn


def _in_parallel(calls: list[Callable[[], object]]) -> None:
    """Run the stop calls together: each HTTP server's shutdown waits up to half a second for
    its poll loop, which one after another is half a minute for 64 probes."""
    with ThreadPoolExecutor(max_workers=32) as pool:
        for fut in [pool.submit(c) for c in calls]:
            try:
                fut.result(timeout=10)
            except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
                log.warning("stopping a simulated endpoint failed: %s", exc)


def _write_ready(path: Path, targets: list[str], **extra: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"targets": targets, **extra}))
    tmp.rename(path)


def _wait_start(path: Path, stop: threading.Event) -> float | None:
    while not stop.is_set():
        if path.exists():
            return float(json.loads(path.read_text())["t0"])
        stop.wait(0.05)
    return None


class ScheduleFile:
    """The slot start times the front end publishes (``{"starts": [...]}``, seconds after t0,
    replaced atomically); ``read`` returns them when the file changed since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None

    def read(self) -> list[float] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return [float(x) for x in json.loads(self.path.read_text())["starts"]]


def write_schedule(path: Path, starts: list[float]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"starts": starts}))
    tmp.rename(path)


def _training_faults(cfg: DemoConfig, timeline: Timeline) -> list[Any]:
    from rankwatch.sim.training import Fault

    out = []
    for f in timeline.faults:
        if f.kind == "thermal":
            out.append(Fault("thermal", node=f.node, gpu=f.local_rank, start_s=f.start, end_s=f.end,
                             magnitude=float(f.params.get("slowdown", 0.25))))
        elif f.kind == "efa_degraded":
            out.append(Fault("efa", node=f.node, start_s=f.start, end_s=f.end,
                             magnitude=float(f.params.get("slowdown", 0.06))))
        elif f.kind == "slow_dataloader":
            assert f.node is not None and f.local_rank is not None
            out.append(Fault("dataloader", rank=cfg.rank_of(f.node, f.local_rank), start_s=f.start, end_s=f.end,
                             magnitude=float(f.params.get("extra_steps", 0.4))))
        elif f.kind == "xid79":
            out.append(Fault("xid79", node=f.node, gpu=f.local_rank, start_s=f.start, end_s=f.end))
        else:
            raise ValueError(f"unknown fault kind {f.kind!r} in the demo timeline")
    return out


def eval_times(timeline: Timeline, starts: list[float]) -> list[float]:
    """When the job runs an evaluation step: in the middle of the benign slot and of the first
    two recoveries (at half their scripted length after they began). A real job evaluates every
    few hundred steps; in compressed time a periodic evaluation would land inside incidents,
    where it says nothing about the detector."""
    out = []
    for i, slot in enumerate(timeline.slots[: len(starts)]):
        if slot[0] == "benign" or slot[0].startswith("recover-"):
            out.append(starts[i] + timeline.nominal_seconds(i) / 2)
    return out[:3]


def build_job(cfg: DemoConfig, t0: float = 0.0) -> Any:
    """The simulated training job with the benign noise: GC pauses, sequence-length imbalance,
    heavier first and last pipeline stages, a warm-up, and a few evaluation steps
    (``eval_times``). Faults come from the schedule (``schedule_job``). Deterministic: every
    worker builds the same job and, given the same schedule, plays the same steps."""
    from rankwatch.sim.training import Layout, Noise, TrainingJob

    class ScriptedEvalJob(TrainingJob):
        """Evaluation in the first step that starts at or after each of ``eval_at`` (job
        seconds), instead of every N steps (the simulator's ``Noise.eval_every``, applied to
        one step at a time)."""

        eval_at: tuple[float, ...] = ()
        eval_steps: dict[float, int]  # eval time -> the step that runs it

        def _step_sections(self, t: float) -> dict[str, Any]:
            # a step drawn again (advance() stops inside a running step) keeps its evaluation
            assigned = self.eval_steps
            for e in self.eval_at:
                if e <= t and e not in assigned:
                    assigned[e] = self.step + 1
            periodic = self.noise
            self.noise = dataclasses.replace(periodic, eval_every=1 if self.step + 1 in assigned.values() else 0)
            try:
                return super()._step_sections(t)
            finally:
                self.noise = periodic

    layout = Layout(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp)
    noise = Noise(warmup_s=max(1.0, cfg.warmup_seconds / 4), eval_every=0, eval_factor=2.0, checkpoint_every=0)
    nodes = [cfg.node_name(i) for i in range(cfg.nodes)]
    job = ScriptedEvalJob(layout, nodes=nodes, gpus_per_node=cfg.gpus_per_node, base_step_s=cfg.step_seconds,
                          seed=cfg.seed, noise=noise, run=cfg.run, start_time=t0,
                          tokens_per_step=cfg.tokens_per_step)
    job.eval_steps = {}
    return job


def schedule_job(job: Any, cfg: DemoConfig, timeline: Timeline, starts: list[float]) -> None:
    """Give ``job`` the faults and evaluation steps of the slots begun so far (``starts``);
    the running slot's fault lasts until the next slot begins."""
    job.faults = []
    for f in _training_faults(cfg, timeline.placed(starts)):
        job.add_fault(f)
    job.eval_at = tuple(eval_times(timeline, starts))


class NodesRole:
    """Node exporters for every simulated node; NVML and EFA faults follow the job's
    ``hardware_faults_at`` (one source of truth with the ranks' slowdowns)."""

    def __init__(self, cfg: DemoConfig, timeline: Timeline, workdir: Path, members: range) -> None:
        from rankwatch.exporters.efa import EfaCollector
        from rankwatch.exporters.gpu import GpuCollector
        from rankwatch.exporters.node import NodeExporter, raise_open_files_limit
        from rankwatch.sim.nvml import SimulatedNVML
        from rankwatch.sim.sysfs import FakeEfaSysfs

        # Before the EFA collectors size their open-file budgets from the limit: with the
        # default soft limit only about half of this worker's nodes would keep theirs open.
        raise_open_files_limit()
        self.cfg = cfg
        self.timeline = timeline
        self.job = build_job(cfg)
        self.nvml: dict[str, Any] = {}
        self.sysfs: dict[str, Any] = {}
        self.exporters: list[Any] = []
        self.servers: list[Any] = []
        self.targets: list[str] = []
        for i in members:
            host = cfg.node_name(i)
            nvml = SimulatedNVML(host, gpu_count=cfg.gpus_per_node, seed=cfg.seed)
            sysfs = FakeEfaSysfs(workdir / "sysfs" / host, devices=cfg.efa_per_node, seed=cfg.seed * 1000 + i)
            collectors = [GpuCollector(nvml=nvml, hostname=host), EfaCollector(sysfs.root)]
            exporter = NodeExporter(collectors, hostname=host)
            addr = cfg.node_address(i)
            self.servers.append(exporter.serve(addr, NODE_EXPORTER_PORT))
            self.nvml[host] = nvml
            self.sysfs[host] = sysfs
            self.exporters.append(exporter)
            self.targets.append(f"{addr}:{NODE_EXPORTER_PORT}")
        self.applied: dict[tuple[str, str, int | None], Any] = {}
        self.hung = False

    def reschedule(self, starts: list[float]) -> None:
        schedule_job(self.job, self.cfg, self.timeline, starts)

    def apply(self, offset: float) -> None:
        # While the job hangs (XID 79 on any node) every GPU idles in a collective that never
        # completes: utilisation and power drop cluster-wide, on every shard's nodes.
        hung = self.job.hang_until(offset) is not None
        if hung != self.hung:
            self._set_activity(0.0 if hung else 1.0)
            self.hung = hung
        want = {(h.kind, h.node, h.gpu): h for h in self.job.hardware_faults_at(offset) if h.node in self.nvml}
        for key in [k for k in self.applied if k not in want]:
            self._clear(*key)
            del self.applied[key]
        for key, h in want.items():
            if key not in self.applied:
                self._inject(h)
                self.applied[key] = h

    def advance_counters(self, dt: float) -> None:
        for s in self.sysfs.values():
            s.advance(dt)

    def _set_activity(self, level: float) -> None:
        for nv in self.nvml.values():
            nv.set_activity(None, level)

    def _inject(self, h: Any) -> None:
        log.info("inject %s on %s gpu %s", h.kind, h.node, h.gpu)
        if h.kind in NODE_FAULTS:
            sysfs = self.sysfs[h.node]
            node_faults.inject(self.nvml[h.node], sysfs, h.kind, sysfs.devices[0] if h.kind == "efa" else h.gpu)

    def _clear(self, kind: str, node: str, gpu: int | None) -> None:
        log.info("clear %s on %s gpu %s", kind, node, gpu)
        if kind in NODE_FAULTS:
            sysfs = self.sysfs[node]
            node_faults.clear(self.nvml[node], sysfs, kind, sysfs.devices[0] if kind == "efa" else gpu)

    def close(self) -> None:
        _in_parallel([server.stop for server in self.servers])
        _in_parallel([e.close for e in self.exporters])
        for s in self.sysfs.values():
            s.close()


class RanksRole:
    """The simulated training job and one real probe per rank."""

    def __init__(self, cfg: DemoConfig, timeline: Timeline, members: range) -> None:
        from rankwatch.exporters.identity import RankIdentity
        from rankwatch.exporters.probe import Probe

        self.cfg = cfg
        self.timeline = timeline
        self.job = build_job(cfg)
        self.members = members
        self.probes: list[Any] = []
        self.targets: list[str] = []
        for rank in members:
            node, local = divmod(rank, cfg.gpus_per_node)
            ident = RankIdentity(rank=rank, local_rank=local, world_size=cfg.world_size,
                                 local_world_size=cfg.gpus_per_node, node=cfg.node_name(node),
                                 gpu=local).with_layout(tp_size=cfg.tp, pp_size=cfg.pp)
            addr = cfg.node_address(node)
            probe = Probe(cfg.run, port=PROBE_BASE_PORT + local, addr=addr, identity=ident, wandb_run=None)
            self.probes.append(probe)
            self.targets.append(f"{addr}:{PROBE_BASE_PORT + local}")

    def reschedule(self, starts: list[float]) -> None:
        schedule_job(self.job, self.cfg, self.timeline, starts)

    def feed(self, t0: float, offset: float) -> int:
        """Advance the job to ``offset`` seconds and record every completed step in every probe."""
        records = self.job.advance(offset)
        tokens = self.cfg.tokens_per_step
        for rec in records:
            seconds = rec.end_s - rec.start_s
            names = list(rec.sections)
            columns = [rec.sections[n].tolist() for n in names]
            end_time = t0 + rec.end_s
            for rank, probe in zip(self.members, self.probes, strict=True):
                probe.record_step(seconds, {n: col[rank] for n, col in zip(names, columns, strict=True)},
                                  tokens=tokens, step=rec.step, end_time=end_time)
        return len(records)

    def close(self) -> None:
        _in_parallel([p.close for p in self.probes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rankwatch.demo.cluster")
    ap.add_argument("--role", choices=("nodes", "ranks"), required=True)
    ap.add_argument("--first", type=int, required=True, help="first node / rank of this shard")
    ap.add_argument("--count", type=int, required=True, help="nodes / ranks in this shard")
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--ready", type=Path, required=True)
    ap.add_argument("--start", type=Path, required=True)
    ap.add_argument("--schedule", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(args.spec.read_text())
    cfg = DemoConfig(**spec["config"])
    timeline = Timeline.from_json(json.dumps(spec["timeline"]))

    _skip_reverse_dns()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix=f"rankwatch-demo-{args.role}-") as tmp:
        members = range(args.first, args.first + args.count)
        role: Any = (NodesRole(cfg, timeline, Path(tmp), members) if args.role == "nodes"
                     else RanksRole(cfg, timeline, members))
        try:
            _write_ready(args.ready, role.targets)
            t0 = _wait_start(args.start, stop)
            if t0 is not None:
                schedule = ScheduleFile(args.schedule)
                if args.role == "nodes":
                    _run_nodes(role, t0, schedule, stop)
                else:
                    _run_ranks(role, t0, schedule, stop)
        finally:
            began = time.monotonic()
            role.close()
            log.info("%s shard stopped in %.1f s", args.role, time.monotonic() - began)
    return 0


def _follow(role: NodesRole | RanksRole, schedule: ScheduleFile) -> None:
    starts = schedule.read()
    if starts is not None:
        role.reschedule(starts)


def _run_nodes(role: NodesRole, t0: float, schedule: ScheduleFile, stop: threading.Event) -> None:
    # Faults switch within a tick of their scheduled time; the EFA counter files are rewritten
    # once a second (writing every file of every device costs ~4 ms per node).
    last = time.time()
    while not stop.is_set():
        _follow(role, schedule)
        now = time.time()
        role.apply(now - t0)
        if now - last >= COUNTER_PERIOD_S:
            role.advance_counters(now - last)
            last = now
        stop.wait(TICK_S)


def _run_ranks(role: RanksRole, t0: float, schedule: ScheduleFile, stop: threading.Event) -> None:
    while not stop.is_set():
        _follow(role, schedule)
        role.feed(t0, time.time() - t0)
        stop.wait(TICK_S)


if __name__ == "__main__":
    raise SystemExit(main())
