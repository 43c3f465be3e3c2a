"""Scale of the detector core (issue 4, benchmark 3, core part): one evaluation cycle for
256, 8 192 and 100 000 ranks — time and peak memory. Target: <= 1 s and <= 1 GiB at 100 000.

Measures, on a synthetic snapshot (pp stages known, one slowed rank, per-rank noise):
* ``score_ranks``: the statistics core (arrays, peer groups, median/MAD, slow signal);
* ``DetectorCore.evaluate``: the whole rank path of a cycle (episodes, hang, throughput),
  on the second cycle so that state exists;
* the same without layout labels (peer groups by clustering);
* ``extract``: the one Python pass over the ``RankObs`` list inside ``score_ranks`` (the rest is numpy).
Time is the median of ``--repeat`` runs, as wall time and as this process's CPU time (the
latter is what to read on a shared, loaded machine); peak memory is tracemalloc's peak during one cycle
(Python and numpy allocations), measured in a separate run so it does not slow the timing.
The snapshot itself (what the source builds from PromQL) is built outside the timed region.

    .venv/bin/python bench/bench_detector_scale.py [--sizes 256,8192,100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwatch.detectors.config import DetectorConfig  # noqa: E402
from rankwatch.detectors.core import DetectorCore  # noqa: E402
from rankwatch.detectors.model import RankObs, Snapshot  # noqa: E402
from rankwatch.detectors.straggler import extract, score_ranks  # noqa: E402

T0 = 1_750_000_000.0


def snapshot(n: int, t: float, layout: bool, seed: int = 0) -> Snapshot:
    rng = np.random.default_rng(seed)
    pp = 8 if n >= 64 else 2
    stage = np.arange(n) * pp // n
    weight = np.where(stage == 0, 1.08, np.where(stage == pp - 1, 1.2, 1.0))
    comp = weight * (1 + rng.normal(0, 0.005, n))
    comp[n // 3] *= 1.2
    ranks = []
    for r in range(n):
        c = float(comp[r])
        ranks.append(RankObs(run="big", rank=r, node=f"node-{r // 8:05d}", local_rank=r % 8, gpu=str(r % 8),
                             pp=int(stage[r]) if layout else None, up=True, step=100.0 + t / 1.5,
                             last_step_time=T0 + t, steps_rate=1 / 1.5, step_seconds=1.5,
                             sections={"dataloader": 0.02, "forward": c * 0.35, "backward": c * 0.6,
                                       "optimizer": c * 0.05, "comm": 1.5 - c - 0.02}))
    return Snapshot(time=T0 + t, window_s=15.0, ranks=ranks)


def measure(n: int, layout: bool, repeat: int) -> dict[str, float]:
    cfg = DetectorConfig(warmup_s=0.0)
    snaps = [snapshot(n, 15.0 * (k + 1), layout, seed=k) for k in range(repeat + 1)]
    times_core, times_stats, cpu_core, cpu_stats, cpu_extract = [], [], [], [], []
    core = DetectorCore(cfg)
    core.evaluate(snaps[0])
    for s in snaps[1:]:
        c = time.process_time()
        extract(s.ranks, cfg, s.window_s)
        cpu_extract.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        score_ranks(s.ranks, cfg, s.window_s, core.compute_basis, core.evidence, 15.0)
        times_stats.append(time.perf_counter() - t)
        cpu_stats.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        core.evaluate(s)
        times_core.append(time.perf_counter() - t)
        cpu_core.append(time.process_time() - c)
    core = DetectorCore(cfg)
    core.evaluate(snaps[0])
    tracemalloc.start()
    core.evaluate(snaps[1])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"stats_s": statistics.median(times_stats), "cycle_s": statistics.median(times_core),
            "stats_cpu": statistics.median(cpu_stats), "cycle_cpu": statistics.median(cpu_core), "peak_mib": peak / 2**20,
            "extract_cpu": statistics.median(cpu_extract)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,8192,100000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    print("path: synthetic Snapshot -> DetectorCore (rank path), median of "
          f"{args.repeat} cycles; peak = tracemalloc peak during one cycle")
    print(f"{'ranks':>7} {'layout':>8} {'score_ranks wall/CPU':>22} {'full cycle wall/CPU':>22} {'peak MiB':>9} "
          f"{'Python pass CPU':>16}")
    for n in sizes:
        for layout in (True, False):
            m = measure(n, layout, args.repeat)
            print(f"{n:7d} {'pp' if layout else 'cluster':>8} {m['stats_s'] * 1000:10.0f} / {m['stats_cpu'] * 1000:6.0f} ms "
                  f"{m['cycle_s'] * 1000:10.0f} / {m['cycle_cpu'] * 1000:6.0f} ms {m['peak_mib']:9.1f} "
                  f"{m['extract_cpu'] * 1000:13.0f} ms")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
