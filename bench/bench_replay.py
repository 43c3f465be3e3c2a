"""Replay speed end to end: `rankwatch detect --replay` on a 30-minute export of a 64-rank job
(target: >= 200 000 samples/s, i.e. ~200 000 samples in <= 2 s after start-up).

The export comes from rankwatch.sim.scenario (8 tp x 4 pp x 2 dp on 8 nodes, probe + GPU + EFA
series as Prometheus would have scraped them). Phases, timed separately and repeated:

* backfill: the file cut at metric-family boundaries, promtool processes in parallel into one TSDB;
* start-up: a temporary Prometheus opening that TSDB (reported apart: a fixed cost per replay);
* queries: the detector's live PromQL as range queries (step = interval), split into Snapshots;
* evaluate: the detector core on every Snapshot.

Baselines in the same run: prometheus_client's OpenMetrics parser on a prefix of the same file,
a single promtool process on the whole file, the backfill without the sample-order check
(``ReplayDataset(check_order=False)``, as before issue 15) alternating with the checked one, and
(``--baseline``) the query phase as it was before the I/O tuning — gzip responses and the
standard library's JSON decoder — on the same temporary Prometheus, alternately before and after
the tuned one.

    .venv/bin/python bench/bench_replay.py [--duration 1800] [--scrape 15] [--repeats 3] [--baseline]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
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


def parser_baseline(path: Path, max_bytes: int) -> tuple[int, float]:
    """(samples, seconds) for prometheus_client's OpenMetrics parser on a family-aligned prefix."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from rankwatch.detectors.replay import split_points

    size = path.stat().st_size
    parts = max(2, size // max_bytes)
    cut = split_points(path, int(parts))[1]
    with open(path, "rb") as f:
        lines = f.read(cut).decode().splitlines()
    # The export is time-major inside a family (promtool accepts that); prometheus_client wants
    # each series' samples together: regroup them (stable sort by series), untimed.
    out: list[str] = []
    block: list[str] = []
    for line in lines + ["# EOF"]:
        if line.startswith("#"):
            out += sorted(block, key=lambda s: s.rsplit(" ", 2)[0])
            block = []
            out.append(line)
        else:
            block.append(line)
    text = "\n".join(out) + "\n"
    t0 = time.perf_counter()
    n = sum(len(fam.samples) for fam in text_string_to_metric_families(text))
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--scrape", type=float, default=15.0, help="scrape interval of the export (default 15 s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parser-bytes", type=int, default=4_000_000, help="prefix size for the parser baseline")
    ap.add_argument("--baseline", action="store_true", help="also time the pre-tuning query path on each dataset")
    args = ap.parse_args(argv)

    from rankwatch import promserver
    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import MAX_BLOCK_DURATION, ReplayDataset
    from rankwatch.detectors.service import align_down, align_up
    from rankwatch.detectors.source import PromSource
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    # windows must hold two scrapes for rate(): 2 x the scrape interval
    cfg = DetectorConfig(interval_s=15.0, window_s=max(15.0, 2 * args.scrape))
    sc = Scenario("replay-bench", layout=Layout(tp=8, pp=4, dp=2), nodes=8, duration_s=args.duration,
                  scrape_s=args.scrape, faults=[Fault("slowdown", rank=37, start_s=600, end_s=1200, magnitude=0.2)])
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        om, _, samples = write_replay(sc, tmp)
        mb = om.stat().st_size / 1e6
        print(f"export: {sc.layout.world} ranks, {args.duration / 60:.0f} min, scrape {args.scrape:g} s: "
              f"{samples} samples, {mb:.1f} MB")
        pn, ps = parser_baseline(om, args.parser_bytes)
        print(f"baseline prometheus_client OpenMetrics parser: {pn} samples in {ps:.2f} s = {pn / ps:,.0f} samples/s")
        tsdb = Path(tmp) / "single"
        t0 = time.perf_counter()
        res = promserver.promtool("tsdb", "create-blocks-from", "openmetrics", f"--max-block-duration={MAX_BLOCK_DURATION}",
                                  str(om), str(tsdb), timeout=600)
        single = time.perf_counter() - t0
        assert res.returncode == 0, res.stderr
        print(f"baseline one promtool process: {single:.2f} s = {samples / single:,.0f} samples/s")

        from rankwatch.detectors.replay import scan_samples

        scan_cpu = []
        for _ in range(3):
            c0 = time.process_time()
            scan = scan_samples(om)
            scan_cpu.append(time.process_time() - c0)
        assert scan.samples == samples and scan.dropped == 0
        print(f"sample-order check alone: {statistics.median(scan_cpu):.2f} s CPU "
              f"= {samples / statistics.median(scan_cpu):,.0f} samples/s (median of 3)")
        # backfill with and without the order check, alternating which goes first
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}  # (wall, CPU) per backfill
        for k in range(2 * args.repeats):
            check = k % 2 == (k // 2) % 2
            with ReplayDataset(om, check_order=check) as ds:
                runs[check].append((ds.timings["backfill_s"], ds.timings["backfill_cpu_s"]))
                assert ds.samples == samples
        for i, what in ((0, "wall"), (1, "CPU incl. promtool")):
            on, off = (statistics.median(r[i] for r in runs[c]) for c in (True, False))
            print(f"backfill (split + promtool) {what}, median of {args.repeats}: with the order check {on:.2f} s, "
                  f"without {off:.2f} s = {on / off:.2f}x (runs: {' '.join(f'{r[i]:.2f}' for r in runs[True])} / "
                  f"{' '.join(f'{r[i]:.2f}' for r in runs[False])})")

        cpu: dict[bool, list[tuple[float, float]]] = {False: [], True: []}  # (ours, Prometheus') per run

        def replay(url: str, start: float, end: float, baseline: bool) -> tuple[float, float, int, list]:
            if baseline:
                client = PromClient(PromConnection(url=url, timeout_s=60, compress=True))
                client.loads = json.loads
                src = PromSource(client, cfg.window_s, cfg.efa_error_counters)
            else:
                src = PromSource(PromClient(PromConnection(url=url, timeout_s=60)), cfg.window_s,
                                 cfg.efa_error_counters)
            core = DetectorCore(cfg)
            q_s = e_s = 0.0
            n_eval = 0
            events: list = []
            c0, p0 = time.process_time(), proc_cpu(prom_pid)
            it = iter(src.snapshots(start, end, cfg.interval_s))
            while True:
                a = time.perf_counter()
                snap = next(it, None)
                b = time.perf_counter()
                q_s += b - a
                if snap is None:
                    break
                events += core.evaluate(snap)
                e_s += time.perf_counter() - b
                n_eval += 1
            cpu[baseline].append((time.process_time() - c0, proc_cpu(prom_pid) - p0))
            src.close()
            return q_s, e_s, n_eval, events

        rows, base_rows = [], []
        digests: set[str] = set()  # of the events: compare across checkouts (A/B of two trees)
        for k in range(args.repeats):
            with ReplayDataset(om) as ds:
                start, end = align_up(ds.min_time, cfg.interval_s), align_down(ds.max_time, cfg.interval_s)
                prom_pid = ds.prometheus.proc.pid if ds.prometheus else None
                if args.baseline and k % 2 == 1:  # alternate which path meets a cold Prometheus
                    bq, be, bn, bev = replay(ds.url, start, end, baseline=True)
                q_s, e_s, n_eval, events = replay(ds.url, start, end, baseline=False)
                rows.append((ds.timings["backfill_s"], ds.timings["startup_s"], q_s, e_s, n_eval, len(events)))
                digests.add(hashlib.sha256(json.dumps([e.to_json() for e in events], sort_keys=True,
                                                      default=str).encode()).hexdigest()[:16])
                if args.baseline:
                    if k % 2 == 0:
                        bq, be, bn, bev = replay(ds.url, start, end, baseline=True)
                    # the tuning must not change a verdict
                    assert [e.to_json() for e in bev] == [e.to_json() for e in events]
                    base_rows.append((ds.timings["backfill_s"], ds.timings["startup_s"], bq, be, bn, len(bev)))
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("run  backfill  start-up  queries  evaluate  | after start-up  samples/s   (evaluations, events)")
    totals = []
    for k, (bf, su, q, e, n, ev) in enumerate(rows, 1):
        after = bf + q + e
        totals.append(after)
        print(f"{k:3d}  {bf:7.2f}s  {su:7.2f}s  {q:6.2f}s  {e:7.2f}s  | {after:12.2f}s  {samples / after:10,.0f}   ({n}, {ev})")
    for k, (_bf, _su, q, e, n, ev) in enumerate(base_rows, 1):
        print(f"{k:3d}  baseline query path (gzip, stdlib json): queries {q:6.2f}s  "
              f"evaluate {e:6.2f}s  ({n}, {ev}, same events)")
    if base_rows:
        # with prefetch the next chunk is fetched during the caller's evaluation: compare sums
        print(f"queries + evaluate, tuned/baseline median: {statistics.median(r[2] + r[3] for r in rows):.2f} s / "
              f"{statistics.median(r[2] + r[3] for r in base_rows):.2f} s = "
              f"{statistics.median(r[2] + r[3] for r in rows) / statistics.median(r[2] + r[3] for r in base_rows):.2f}")
    for name, b in (("tuned", False), ("baseline", True)):
        if cpu[b]:
            print(f"CPU for queries + evaluate ({name}, median): detector {statistics.median(c for c, _ in cpu[b]):.2f} s, "
                  f"Prometheus {statistics.median(p for _, p in cpu[b]):.2f} s")
    best, med = min(totals), statistics.median(totals)
    print(f"end to end after start-up: median {med:.2f} s = {samples / med:,.0f} samples/s, best {best:.2f} s = "
          f"{samples / best:,.0f} samples/s; {samples / med / (pn / ps):.0f}x the prometheus_client parser alone")
    print(f"events digest: {' '.join(sorted(digests))} (one value: every run gave the same events)")
    print(f"target >= 200 000 samples/s: {'met' if samples / med >= 200_000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
