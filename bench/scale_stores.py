"""Load a large simulated job (``rankwatch.sim.scale``) into a real Prometheus and a real
VictoriaMetrics — the harness of the scale benchmarks — and measure what the data costs.

* Prometheus: the OpenMetrics text is cut at family boundaries into parts (``write_parts``);
  each part is backfilled by ``promtool tsdb create-blocks-from openmetrics`` (up to two at a
  time, while the next part is written) and deleted, so at most a few parts are ever on disk;
  then a Prometheus is started over the TSDB (overlapping blocks are fine since 2.39).
* VictoriaMetrics: the Prometheus text form (millisecond timestamps) is streamed in one chunked
  request into ``/api/v1/import/prometheus``: no file at all.

As a script it prints, per job size, the samples, the text's size (counted as it streams, not
written) and, with ``--load``, the time to generate, backfill and import:

    .venv/bin/python bench/scale_stores.py --ranks 2048 4096 16384 --pp 8 [--nodes-sample 64] [--load]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankwatch import promserver  # noqa: E402
from rankwatch.errors import RankwatchError  # noqa: E402
from rankwatch.sim.scale import ScaleJob, ScaleTelemetry, iter_chunks, simulate, write_parts  # noqa: E402

REPLAY_CONFIG = "global:\n  scrape_interval: 1h\n"  # scrapes nothing: it only serves the backfilled data


@dataclass
class Loaded:
    """Servers holding the data, and what loading it cost."""

    prometheus: promserver.ManagedProcess | None = None
    victoria: promserver.ManagedProcess | None = None
    samples: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    parts: int = 0
    peak_part_bytes: int = 0

    def close(self) -> None:
        for p in (self.prometheus, self.victoria):
            if p is not None:
                p.stop()
        self.prometheus = self.victoria = None


def backfill_prometheus(tel: ScaleTelemetry, workdir: Path, *, part_bytes: int = 256 << 20,
                        parallel: int = 2) -> tuple[promserver.ManagedProcess, dict[str, float], int, int, int]:
    """Backfill ``tel`` part by part and start a Prometheus over it. Returns the server, timings
    (``write_backfill_s``: wall time of writing and backfilling, overlapped; ``promtool_s``: sum
    of promtool's wall times; ``prometheus_start_s``), samples, parts and the largest part."""
    tsdb = workdir / "tsdb"
    tsdb.mkdir(parents=True, exist_ok=True)
    parts_dir = workdir / "parts"
    pending: list[Future] = []
    promtool_s = [0.0]
    n = [0]
    count, peak = 0, 0

    def backfill(path: Path) -> None:
        t = time.perf_counter()
        res = promserver.promtool("tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=1000h",
                                  str(path), str(tsdb), timeout=3600)
        promtool_s[0] += time.perf_counter() - t
        path.unlink(missing_ok=True)
        if res.returncode != 0:
            raise RankwatchError(f"promtool failed on {path.name}: {(res.stderr or res.stdout).strip()[-800:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for path in write_parts(tel, parts_dir, "scale", part_bytes, n):
            count += 1
            peak = max(peak, path.stat().st_size)
            pending.append(pool.submit(backfill, path))
            # bound the disk: never more than `parallel` parts waiting beside the one being written
            while sum(not f.done() for f in pending) > parallel:
                next(f for f in pending if not f.done()).result()
        for f in pending:
            f.result()
    t1 = time.perf_counter()
    shutil.rmtree(parts_dir, ignore_errors=True)
    prom = promserver.start_prometheus(REPLAY_CONFIG, workdir=workdir / "prom", storage_dir=tsdb, timeout=300)
    t2 = time.perf_counter()
    return prom, {"write_backfill_s": t1 - t0, "promtool_s": promtool_s[0], "prometheus_start_s": t2 - t1}, n[0], count, peak


def import_victoria(tel: ScaleTelemetry, workdir: Path, extra_args: list[str] | None = None
                    ) -> tuple[promserver.ManagedProcess, dict[str, float], int]:
    """Start a VictoriaMetrics and stream ``tel`` into it. Timings: ``victoria_import_s``
    (generating the text and importing it, overlapped, flush included)."""
    vm = promserver.start_victoria_metrics(workdir=workdir / "vm", extra_args=extra_args)
    n = [0]
    t0 = time.perf_counter()
    try:
        promserver.victoria_import(vm.url, iter_chunks(tel, "prometheus", n), timeout=3600)
    except BaseException:
        vm.stop()
        raise
    return vm, {"victoria_import_s": time.perf_counter() - t0}, n[0]


def detector_rules_file(workdir: Path) -> Path:
    """The rankwatch.detector_inputs group of the shipped rules, alone in a file (what the stores are
    given to evaluate, or to backfill)."""
    import yaml

    from rankwatch.assets import rule_files

    groups = [g for f in rule_files() for g in (yaml.safe_load(f.read_text()) or {}).get("groups", [])
              if g.get("name") == "rankwatch.detector_inputs"]
    if not groups:
        raise RankwatchError("no rankwatch.detector_inputs rule group in alerts/")
    path = workdir / "detector-rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def backfill_rules_prometheus(prom: promserver.ManagedProcess, tsdb: Path, start: float, end: float,
                              workdir: Path, eval_s: float = 15.0) -> tuple[promserver.ManagedProcess, float]:
    """Evaluate the detector's recording rules over ``start..end`` (and a minute past it, as a
    live Prometheus would go on evaluating them) with promtool (range queries
    against ``prom``), add the blocks to its TSDB and restart it over them. Returns the new
    server and the seconds it took."""
    t0 = time.perf_counter()
    rules = detector_rules_file(workdir)
    out = workdir / "rule-blocks"
    res = promserver.promtool("tsdb", "create-blocks-from", "rules", f"--start={int(start)}", f"--end={int(end) + 60}",
                              f"--url={prom.url}", f"--output-dir={out}", f"--eval-interval={int(eval_s)}s",
                              str(rules), timeout=3600)
    if res.returncode != 0:
        raise RankwatchError(f"promtool could not backfill the rules: {(res.stderr or res.stdout).strip()[-800:]}")
    prom.stop()
    for block in out.iterdir():
        if block.is_dir():
            shutil.move(str(block), str(tsdb / block.name))
    new = promserver.start_prometheus(REPLAY_CONFIG, workdir=workdir / "prom-rules", storage_dir=tsdb, timeout=300)
    return new, time.perf_counter() - t0


def replay_rules_victoria(vm: promserver.ManagedProcess, start: float, end: float, workdir: Path,
                          eval_s: float = 15.0) -> float:
    """Evaluate the detector's recording rules over ``start..end`` with vmalert's replay mode,
    writing the results into ``vm``. Returns the seconds it took."""
    import subprocess
    from datetime import UTC, datetime

    def rfc(x: float) -> str:
        return datetime.fromtimestamp(x, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    t0 = time.perf_counter()
    rules = detector_rules_file(workdir)
    res = subprocess.run(["vmalert", f"-rule={rules}", f"-datasource.url={vm.url}", f"-remoteWrite.url={vm.url}",
                          f"-replay.timeFrom={rfc(start)}", f"-replay.timeTo={rfc(end + 60)}",
                          f"-evaluationInterval={int(eval_s)}s", f"-datasource.queryStep={int(eval_s)}s",
                          "-replay.disableProgressBar",
                          "-replay.rulesDelay=0s", "-httpListenAddr=127.0.0.1:0"],
                         capture_output=True, text=True, timeout=3600)
    dropped = [line for line in (res.stderr + res.stdout).splitlines() if "dropping" in line]
    if res.returncode != 0 or dropped:  # vmalert exits 0 when its writes were refused
        raise RankwatchError(f"vmalert could not replay the rules: {(dropped or [(res.stderr or res.stdout).strip()])[-1][-800:]}")
    r = requests.get(vm.url + "/internal/force_flush", timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def load(job: ScaleJob, workdir: Path, *, prometheus: bool = True, victoria: bool = True,
         part_bytes: int = 256 << 20, victoria_args: list[str] | None = None) -> Loaded:
    """Simulate ``job`` once and load it into the stores asked for."""
    out = Loaded()
    t = time.perf_counter()
    tel = simulate(job)
    out.timings["simulate_s"] = time.perf_counter() - t
    try:
        if prometheus:
            out.prometheus, tm, out.samples, out.parts, out.peak_part_bytes = backfill_prometheus(
                tel, workdir, part_bytes=part_bytes)
            out.timings.update(tm)
        if victoria:
            out.victoria, tm, out.samples = import_victoria(tel, workdir, victoria_args)
            out.timings.update(tm)
    except BaseException:
        out.close()
        raise
    return out


def text_size(tel: ScaleTelemetry, fmt: str = "openmetrics") -> tuple[int, int, float]:
    """(samples, bytes, seconds) of the text, counted as it streams: nothing is written."""
    n = [0]
    size = 0
    t = time.perf_counter()
    for chunk in iter_chunks(tel, fmt, n):
        size += len(chunk)
    return n[0], size, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2048, 4096, 16384], help="job sizes (default: 2048 4096 16384)")
    ap.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16], help="pp per size, or one for all (default: 4 8 16)")
    ap.add_argument("--nodes-sample", default="all", help="node exporters written: all or N (default: all)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of job (default: 600)")
    ap.add_argument("--scrape", type=float, default=15.0, help="scrape interval (default: 15)")
    ap.add_argument("--load", action="store_true", help="also backfill into Prometheus and import into VictoriaMetrics")
    ap.add_argument("--workdir", default=None, help="where the TSDBs go (default: a temporary directory)")
    args = ap.parse_args(argv)
    pps = args.pp if len(args.pp) == len(args.ranks) else args.pp[:1] * len(args.ranks)
    sample = None if args.nodes_sample == "all" else int(args.nodes_sample)
    load_avg = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")
    print(f"{'ranks':>6} {'pp':>3} {'nodes':>6} {'exporters':>9} {'series':>10} {'samples':>11} {'OpenMetrics':>12} "
          f"{'B/sample':>8} {'simulate':>9} {'text':>8}")
    for ranks, pp in zip(args.ranks, pps, strict=True):
        job = ScaleJob(ranks=ranks, pp=pp, nodes_sample=sample, duration_s=args.duration, scrape_s=args.scrape,
                       straggler=ranks // 3)
        t = time.perf_counter()
        tel = simulate(job)
        sim_s = time.perf_counter() - t
        samples, size, text_s = text_size(tel)
        series = samples // tel.times.size
        print(f"{ranks:>6} {pp:>3} {job.nodes:>6} {len(tel.sampled):>9} {series:>10,} {samples:>11,} "
              f"{size / 1e9:>10.2f} GB {size / samples:>8.0f} {sim_s:>8.1f}s {text_s:>7.1f}s", flush=True)
        if args.load:
            with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.workdir) as tmp:
                loaded = load(job, Path(tmp))
                try:
                    tm = loaded.timings
                    print(f"       load: {loaded.parts} parts (largest {loaded.peak_part_bytes / 1e6:.0f} MB); "
                          f"write+backfill {tm['write_backfill_s']:.1f} s (promtool {tm['promtool_s']:.1f} s), "
                          f"Prometheus start {tm['prometheus_start_s']:.1f} s; VictoriaMetrics import "
                          f"{tm['victoria_import_s']:.1f} s ({samples / tm['victoria_import_s']:,.0f} samples/s)",
                          flush=True)
                finally:
                    loaded.close()
    load_avg = os.getloadavg()
    print(f"load average at the end {load_avg[0]:.1f} {load_avg[1]:.1f} {load_avg[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
