"""Sizing: series per node and per rank, samples per second, Prometheus and VictoriaMetrics
memory per million series (live scraping at two cluster sizes), and what the shipped relabel
rules save. The figures behind docs/sizing.md.

1. **Series per target**: a real Prometheus scrapes one p5 node exporter (8 GPUs, 32 EFA
   devices) and the 8 probes of its ranks (five sections) three times over: as shipped, with
   ``deploy/prometheus/relabel-drop-unused.yml`` and with ``relabel-detector-only.yml``;
   ``scrape_samples_post_metric_relabeling`` + the 5 series Prometheus adds per target.
2. **Samples per second** at 15 s and 30 s scrapes, and the AMP ingestion bill, for a 32-node
   and a 2 048-node cluster (arithmetic on the measured series; prices: ``AMP_PRICE``).
3. **Memory**: a real Prometheus and a real VictoriaMetrics, side by side, live-scrape a fleet of
   N nodes and 8 N ranks (``bench/fleet.py``: every body a real exporter's or probe's) every
   15 s, at two sizes (default 32 and 256 nodes = 256 and 2 048 ranks). After the series exist
   and a few scrapes more, RSS, heap, series and CPU are read; memory per million series is the
   slope between the two sizes (fixed costs cancel).

    .venv/bin/python bench/bench_sizing.py [--sizes 32 256] [--scrapes 6]   # ~6 min
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import Fleet  # noqa: E402

from rankwatch import promserver  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SYNTHETIC_PER_TARGET = 5  # up, scrape_duration_seconds, scrape_samples_scraped, ..._post_metric_relabeling, scrape_series_added
RELABEL = {"drop-unused": REPO / "deploy/prometheus/relabel-drop-unused.yml",
           "detector-only": REPO / "deploy/prometheus/relabel-detector-only.yml"}
# Amazon Managed Service for Prometheus, metric samples ingested, per month and account/Region
# (US East (N. Virginia)): (samples in the tier, USD per sample). The stored copy of
# https://aws.amazon.com/prometheus/pricing/ read on 2026-12-06 holds the free tier (40 M
# samples) but not the table; the tiers are AWS's as quoted from that page by infracost issue
# #2477 (2023-05-30) and VictoriaMetrics' "Pricing comparison for Managed Prometheus"
# (2022-04-04), which agree: $0.90 / $0.35 / $0.16 per 10 M samples. Check the live page.
AMP_PRICE = ((2e9, 0.90 / 10e6), (250e9, 0.35 / 10e6), (float("inf"), 0.16 / 10e6))
AMP_STORAGE_PER_GB_MONTH = 0.03
MONTH_S = 730 * 3600  # AWS bills a month as 730 hours


def amp_ingestion_usd(samples: float) -> float:
    cost, left = 0.0, samples
    for size, price in AMP_PRICE:
        take = min(left, size)
        cost += take * price
        left -= take
        if left <= 0:
            break
    return cost


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024.0
    return float("nan")


def self_metrics(url: str) -> dict[str, float]:
    """name -> value summed over label sets, from a server's own /metrics."""
    out: dict[str, float] = {}
    text = requests.get(url + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def relabel_rules(name: str) -> dict[str, list]:
    return yaml.safe_load(RELABEL[name].read_text())


def series_per_target(tmp: Path) -> dict[str, dict[str, float]]:
    """{variant: {"node": series, "rank": series}} from a real Prometheus scraping one node and
    its 8 ranks as shipped and through each relabel file."""
    fleet = Fleet(1)
    try:
        port = fleet.serve()
        jobs = fleet.jobs(port)
        for variant in RELABEL:
            rules = relabel_rules(variant)
            jobs += fleet.jobs(port, f"-{variant}", rules["node_exporter"], rules["probe"])
        prom = promserver.start_prometheus(fleet.scrape_config(port, "2s", jobs), workdir=tmp / "targets")
        try:
            q = "scrape_samples_post_metric_relabeling"
            promserver.wait_for_series(prom.url, q, min_series=len(jobs) // 2 * 9, timeout=60)
            time.sleep(4.5)  # a second scrape: the probe's sections all exist
            rows = promserver.query(prom.url, f"avg by (job) ({q})")
        finally:
            prom.stop()
    finally:
        fleet.close()
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        job = r["metric"]["job"]
        kind = "node" if job.startswith("rankwatch-node") else "rank"
        variant = job.split("-", 2)[2] if job.count("-") >= 2 else "as shipped"
        out.setdefault(variant, {})[kind] = float(r["value"][1]) + SYNTHETIC_PER_TARGET
    return out


def live_memory(nodes: int, scrapes: int, tmp: Path) -> dict[str, float]:
    """Prometheus and VictoriaMetrics live-scraping ``nodes`` p5 nodes and their 8 ranks each."""
    fleet = Fleet(nodes)
    res: dict[str, float] = {"nodes": nodes, "ranks": nodes * 8}
    prom = vm = None
    try:
        port = fleet.serve()
        cfg = fleet.scrape_config(port, "15s")
        wd = tmp / f"live{nodes}"
        prom = promserver.start_prometheus(cfg, workdir=wd / "prom", timeout=120)
        (wd / "vm").mkdir(parents=True, exist_ok=True)
        (wd / "vm" / "scrape.yml").write_text(cfg)
        vm = promserver.start_victoria_metrics(workdir=wd / "vm", extra_args=[f"-promscrape.config={wd / 'vm' / 'scrape.yml'}"],
                                               timeout=120)
        targets = nodes * 9
        t0 = time.monotonic()
        while True:  # every target scraped at least once
            m = self_metrics(prom.url)
            up = promserver.query(prom.url, "count(up == 1)")
            if up and int(float(up[0]["value"][1])) >= targets and m["prometheus_tsdb_head_series"] > 0:
                break
            if time.monotonic() - t0 > 180:
                raise RuntimeError(f"only {up} of {targets} targets up after 180 s")
            time.sleep(2)
        time.sleep(15 * 2)  # two more rounds: every series created in both stores
        p_cpu0, v_cpu0, f_cpu0 = proc_cpu(prom.proc.pid), proc_cpu(vm.proc.pid), time.process_time()
        pm0, vm0 = self_metrics(prom.url), self_metrics(vm.url)
        t_start = time.monotonic()
        peak_p = peak_v = 0.0
        while time.monotonic() - t_start < 15 * scrapes:
            peak_p = max(peak_p, proc_rss(prom.proc.pid))
            peak_v = max(peak_v, proc_rss(vm.proc.pid))
            time.sleep(3)
        dt = time.monotonic() - t_start
        pm1, vm1 = self_metrics(prom.url), self_metrics(vm.url)
        res.update({
            "series": pm1["prometheus_tsdb_head_series"],
            "samples_per_s": (pm1["prometheus_tsdb_head_samples_appended_total"]
                              - pm0["prometheus_tsdb_head_samples_appended_total"]) / dt,
            "prom_rss": proc_rss(prom.proc.pid), "prom_rss_peak": peak_p,
            "prom_heap": pm1["go_memstats_heap_inuse_bytes"],
            "prom_cpu": (proc_cpu(prom.proc.pid) - p_cpu0) / dt,
            "vm_series": vm1.get("vm_new_timeseries_created_total", float("nan")),
            "vm_rows_per_s": (vm1.get("vm_rows_added_to_storage_total", 0) - vm0.get("vm_rows_added_to_storage_total", 0)) / dt,
            "vm_rss": proc_rss(vm.proc.pid), "vm_rss_peak": peak_v,
            "vm_heap": vm1.get("go_memstats_heap_inuse_bytes", float("nan")),
            "vm_cpu": (proc_cpu(vm.proc.pid) - v_cpu0) / dt,
            "fleet_cpu": (time.process_time() - f_cpu0) / dt,
            "abandoned": fleet.abandoned, "requests": fleet.requests,
        })
    finally:
        for p in (prom, vm):
            if p is not None:
                p.stop()
        fleet.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[32, 256], metavar="NODES",
                    help="the two fleet sizes in p5 nodes, 8 ranks each (default: 32 256)")
    ap.add_argument("--scrapes", type=int, default=6, help="15 s scrapes measured per size, after the ramp (default: 6)")
    ap.add_argument("--skip-live", action="store_true", help="only series per target and the arithmetic")
    args = ap.parse_args(argv)
    la = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="bench-sizing-") as tmp_s:
        tmp = Path(tmp_s)
        per = series_per_target(tmp)
        print("\nseries per target (real scrape by Prometheus, + 5 it adds per target):")
        print(f"{'variant':<16} {'per node':>9} {'per rank':>9} {'per rank, node included':>24}")
        for variant in ("as shipped", *RELABEL):
            s = per[variant]
            print(f"{variant:<16} {s['node']:>9.0f} {s['rank']:>9.0f} {s['rank'] + s['node'] / 8:>24.1f}")
        print("\nsamples/s and AMP ingestion per month (730 h; detector's own 2 series per rank added):")
        print(f"{'cluster':<22} {'variant':<14} {'series':>10} {'15 s: samples/s':>16} {'USD/month':>10} "
              f"{'30 s: samples/s':>16} {'USD/month':>10}")
        for nodes in (32, 2048):
            for variant in ("as shipped", *RELABEL):
                s = per[variant]
                series = nodes * s["node"] + nodes * 8 * (s["rank"] + 2)
                cells = []
                for interval in (15, 30):
                    rate = series / interval
                    cells.append(f"{rate:>16,.0f} {amp_ingestion_usd(rate * MONTH_S):>10,.0f}")
                print(f"{nodes:>5} nodes x 8 GPUs   {variant:<14} {series:>10,.0f} {cells[0]} {cells[1]}")
        if args.skip_live:
            return 0
        print("\nlive scraping every 15 s (Prometheus 2.42 and VictoriaMetrics 1.79 side by side):")
        rows = [live_memory(n, args.scrapes, tmp) for n in args.sizes]
        mib = 1 << 20
        print(f"{'nodes':>5} {'ranks':>6} {'series':>9} {'samples/s':>9} | {'Prom RSS':>9} {'peak':>6} {'heap':>6} "
              f"{'CPU':>5} | {'VM RSS':>7} {'peak':>6} {'heap':>6} {'CPU':>5} | fleet CPU")
        for r in rows:
            print(f"{r['nodes']:>5.0f} {r['ranks']:>6.0f} {r['series']:>9,.0f} {r['samples_per_s']:>9,.0f} | "
                  f"{r['prom_rss'] / mib:>7.0f}Mi {r['prom_rss_peak'] / mib:>6.0f} {r['prom_heap'] / mib:>6.0f} "
                  f"{r['prom_cpu']:>5.2f} | {r['vm_rss'] / mib:>5.0f}Mi {r['vm_rss_peak'] / mib:>6.0f} "
                  f"{r['vm_heap'] / mib:>6.0f} {r['vm_cpu']:>5.2f} | {r['fleet_cpu']:.2f} "
                  f"({r['abandoned']:.0f} of {r['requests']:.0f} scrapes timed out)")
        a, b = rows
        ds = (b["series"] - a["series"]) / 1e6
        for who in ("prom", "vm"):
            name = "Prometheus" if who == "prom" else "VictoriaMetrics"
            print(f"{name}: {(b[f'{who}_rss'] - a[f'{who}_rss']) / ds / (1 << 30):.2f} GiB RSS per million series "
                  f"(peak {(b[f'{who}_rss_peak'] - a[f'{who}_rss_peak']) / ds / (1 << 30):.2f}, heap "
                  f"{(b[f'{who}_heap'] - a[f'{who}_heap']) / ds / (1 << 30):.2f}); "
                  f"{b[f'{who}_cpu'] / b['samples_per_s'] * 1e5:.2f} cores per 100 000 samples/s")
    la = os.getloadavg()
    print(f"load average at the end {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
