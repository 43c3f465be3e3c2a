"""One live detector cycle for a 256-rank job, Prometheus queries included (target: <= 200 ms).

A simulated 256-rank job (8 tp x 4 pp x 8 dp on 32 nodes, 8 GPUs and 4 EFA devices each) from
rankwatch.sim.scenario is backfilled with promtool into a real Prometheus; the live path
(instant queries at an aligned time inside the data, snapshot, core evaluation, SQLite state
save) is then timed cycle by cycle, exactly as `rankwatch detector` runs it. Baselines in the
same run: the round trip of a trivial query (`vector(1)`), the same cycle with the queries
issued one after another instead of concurrently, and (``--baseline``) the same cycles through
the client as it was before the I/O tuning — gzip responses, the standard library's JSON
decoder, one request per query (EFA counters not merged) — timed alternately with the tuned
client on the same data; and (``--state-ab REF``) the same cycles saving the state with the
``DetectorState`` of git revision REF (``rankwatch/detectors/state.py`` as it was there: for
the issue's item 3, the one-JSON-text state before "write only the parts that changed"),
alternating, in turn first and second, with the current one on the same source.

    .venv/bin/python bench/bench_live_cycle.py [--layout 8x4x8] [--cycles 30] [--baseline] [--state-ab REF]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used, from /proc: load-independent cost."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def state_module_at(ref: str) -> object:
    """``rankwatch.detectors.state`` as it is at git revision ``ref`` of this checkout."""
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:rankwatch/detectors/state.py"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"--state-ab {ref}: {res.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="bench-state-")) / "state_at_ref.py"
    path.write_text(res.stdout)
    spec = importlib.util.spec_from_file_location("rankwatch.detectors._state_at_ref", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed_saves(state: object, out: list[float]) -> None:
    """Record the wall time of each ``state.save`` in ``out``."""
    save = state.save  # type: ignore[attr-defined]

    def wrapped(*a: object, **k: object) -> object:
        t0 = time.perf_counter()
        try:
            return save(*a, **k)
        finally:
            out.append(time.perf_counter() - t0)

    state.save = wrapped  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="8x4x8", help="tp x pp x dp (default 8x4x8 = 256 ranks)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of simulated job (default 900)")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the pre-tuning client (gzip, stdlib json, unmerged), alternating with the tuned one")
    ap.add_argument("--state-ab", metavar="REF", default=None,
                    help="also time cycles saving with the DetectorState of git revision REF, alternating with the "
                         "current one (default: off)")
    args = ap.parse_args(argv)

    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import DetectorService
    from rankwatch.detectors.source import PromSource
    from rankwatch.detectors.state import DetectorState
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    tp, pp, dp = (int(x) for x in args.layout.split("x"))
    lay = Layout(tp=tp, pp=pp, dp=dp)
    nodes = max(1, lay.world // 8)
    sc = Scenario("live-cycle", layout=lay, nodes=nodes, duration_s=args.duration,
                  faults=[Fault("slowdown", rank=lay.world // 3, start_s=args.duration / 3, magnitude=0.2)])
    cfg = DetectorConfig()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        t0 = time.perf_counter()
        om, _, samples = write_replay(sc, tmp)
        print(f"job: {lay.world} ranks on {nodes} nodes, {samples} samples over {args.duration:.0f} s "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        with ReplayDataset(om) as ds:
            print(f"backfill {ds.timings['backfill_s']:.2f} s, Prometheus start-up {ds.timings['startup_s']:.2f} s")
            client = PromClient(PromConnection(url=ds.url, timeout_s=30))
            src = PromSource(client, cfg.window_s, cfg.efa_error_counters)
            state = DetectorState(Path(tmp) / "state.sqlite")
            svc = DetectorService(src, DetectorCore(cfg), interval_s=cfg.interval_s, state=state)
            saves: list[float] = []
            ref_saves: list[float] = []
            ref = None
            if args.state_ab:
                old_state = state_module_at(args.state_ab).DetectorState(Path(tmp) / "state-ref.sqlite")
                ref = DetectorService(src, DetectorCore(cfg), interval_s=cfg.interval_s, state=old_state)
            base = None
            if args.baseline:
                old = PromClient(PromConnection(url=ds.url, timeout_s=30, compress=True))
                old.loads = json.loads
                base_src = PromSource(old, cfg.window_s, cfg.efa_error_counters, merge_instant=False)
                base = DetectorService(base_src, DetectorCore(cfg), interval_s=cfg.interval_s,
                                       state=DetectorState(Path(tmp) / "state-baseline.sqlite"))
            first = (ds.min_time // cfg.interval_s + 1) * cfg.interval_s
            times = [first + cfg.interval_s * k for k in range(int((ds.max_time - first) // cfg.interval_s) + 1)]
            # warm the core past its warm-up with the first cycles (not timed), then time the rest
            warm = times[: len(times) // 3]
            for t in warm:
                svc.run_cycle(t)
                if base is not None:
                    base.run_cycle(t)
                if ref is not None:
                    ref.run_cycle(t)
            timed_saves(state, saves)
            if ref is not None:
                timed_saves(ref.state, ref_saves)
            timed = times[len(warm):][: args.cycles]
            cycle, snap_s, eval_s = [], [], []
            for t in timed:
                a = time.perf_counter()
                snap = src.snapshot(t)
                b = time.perf_counter()
                svc.core.evaluate(snap)
                c = time.perf_counter()
                snap_s.append(b - a)
                eval_s.append(c - b)
            prom_pid = ds.prometheus.proc.pid if ds.prometheus else None
            cpu_ours, cpu_prom = [], []
            b_cycle: list[float] = []
            b_ours: list[float] = []
            b_prom: list[float] = []
            r_cycle: list[float] = []
            r_ours: list[float] = []
            r_prom: list[float] = []
            for k, t in enumerate(timed):
                runs = [(svc, cycle, cpu_ours, cpu_prom)]
                if base is not None:
                    runs.append((base, b_cycle, b_ours, b_prom))
                if ref is not None:
                    runs.append((ref, r_cycle, r_ours, r_prom))
                    if k % 2:  # in turn first and second: neither gets the warmer caches every time
                        runs.reverse()
                for s, wall, ours, prom in runs:
                    c0, p0 = time.process_time(), proc_cpu(prom_pid)
                    res = s.run_cycle(t + 0.0)  # the service path: snapshot + evaluate + SQLite save + publish
                    ours.append(time.process_time() - c0)
                    prom.append(proc_cpu(prom_pid) - p0)
                    assert not res.errors, res.errors
                    wall.append(res.duration_s)
            if base is not None:
                for t in timed[:5]:  # the tuning must not change what the core sees
                    assert src.snapshot(t) == base_src.snapshot(t)
            seq = []
            for t in timed[:10]:
                a = time.perf_counter()
                for q in src.instant_queries:
                    client.query(q.expr, t)
                seq.append(time.perf_counter() - a)
            rt = []
            for _ in range(50):
                a = time.perf_counter()
                client.query("vector(1)", timed[0])
                rt.append(time.perf_counter() - a)
            n_ranks = len(snap.ranks)
            src.close()
            state.close()
            if base is not None:
                base_src.close()
                base.close()
            if ref is not None:
                ref.close()

    def ms(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"median {statistics.median(xs) * 1e3:6.1f} ms  p90 {xs[int(0.9 * (len(xs) - 1))] * 1e3:6.1f} ms  "
                f"min {xs[0] * 1e3:6.1f} ms")

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{len(src.queries)} queries in {len(src.instant_queries)} requests per cycle, {n_ranks} ranks, {len(snap.gpus)} GPUs, {len(snap.nics)} NICs")
    print(f"live cycle (service: queries + snapshot + evaluate + state save): {ms(cycle)}")
    print(f"  snapshot (concurrent queries + join):                          {ms(snap_s)}")
    print(f"  core evaluate:                                                 {ms(eval_s)}")
    print(f"CPU per cycle (load-independent): detector {ms(cpu_ours)}")
    print(f"                                  Prometheus {ms(cpu_prom)}")
    print(f"baseline: the same requests one after another:                    {ms(seq)}")
    print(f"baseline: one trivial query round trip (vector(1)):               {ms(rt)}")
    if base is not None:
        print(f"baseline: pre-tuning client (gzip, stdlib json, 24 requests):     {ms(b_cycle)}")
        print(f"  its CPU per cycle: detector {ms(b_ours)}")
        print(f"                     Prometheus {ms(b_prom)}")
        print(f"  tuned/baseline median cycle: {statistics.median(cycle) / statistics.median(b_cycle):.2f}")
    if ref is not None:
        saves_t, ref_t = saves[-len(cycle):], ref_saves[-len(r_cycle):]
        print(f"state save, this tree:                                           {ms(saves_t)}")
        print(f"state save, DetectorState of {args.state_ab}:{' ' * max(1, 35 - len(args.state_ab))}{ms(ref_t)}")
        print(f"baseline: cycles saving with the DetectorState of {args.state_ab}:{' ' * max(1, 14 - len(args.state_ab))}"
              f"{ms(r_cycle)}")
        print(f"  its CPU per cycle: detector {ms(r_ours)}")
        print(f"  this tree/{args.state_ab} median cycle: {statistics.median(cycle) / statistics.median(r_cycle):.2f}, "
              f"median save: {statistics.median(saves_t) / statistics.median(ref_t):.2f}")
    med = statistics.median(cycle)
    print(f"target <= 200 ms: {'met' if med <= 0.2 else 'NOT met'} (median {med * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
