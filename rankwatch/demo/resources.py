"""What the demo cluster costs: Prometheus' own figures (head series, scrape duration, memory,
CPU, ingestion) from its self-scrape, and the CPU time of each demo process from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import requests

from rankwatch import promserver
from rankwatch.errors import RankwatchError


@dataclass
class PromResources:
    head_series: float | None
    samples_per_s: float | None
    scrape_targets: int
    scrape_median_ms: float | None
    scrape_p99_ms: float | None
    scrape_max_ms: float | None
    rss_mib: float | None
    rss_max_mib: float | None
    cpu_cores: float | None
    series_per_target: dict[str, float] = field(default_factory=dict)  # scrape job -> series per target

    def rows(self) -> list[tuple[str, str]]:
        def fmt(v: float | None, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        return [
            ("scrape targets", str(self.scrape_targets)),
            ("head series (prometheus_tsdb_head_series)", fmt(self.head_series, ",.0f")),
            ("samples appended / s", fmt(self.samples_per_s, ",.0f")),
            ("scrape duration median (scrape_duration_seconds)", fmt(self.scrape_median_ms, ".1f") + " ms"),
            ("scrape duration p99", fmt(self.scrape_p99_ms, ".1f") + " ms"),
            ("scrape duration max", fmt(self.scrape_max_ms, ".1f") + " ms"),
            ("memory RSS now / max (process_resident_memory_bytes)",
             f"{fmt(self.rss_mib, '.0f')} / {fmt(self.rss_max_mib, '.0f')} MiB"),
            ("CPU (rate of process_cpu_seconds_total)", fmt(self.cpu_cores, ".2f") + " cores"),
            *((f"series per target, {job}", f"{n:,.0f}") for job, n in sorted(self.series_per_target.items())),
        ]


def _scalar(url: str, promql: str) -> float | None:
    try:
        res = promserver.query(url, promql)
    except (RankwatchError, requests.RequestException, ValueError):
        return None
    if not res:
        return None
    return float(res[0]["value"][1])


def prometheus_resources(url: str, span_s: float, self_job: str = "prometheus") -> PromResources:
    """Figures over the last ``span_s`` seconds of the run (quantiles over every target's
    scrapes)."""
    w = f"{max(10, int(span_s))}s"
    sel = f'{{job="{self_job}"}}'
    not_self = f'{{job!="{self_job}"}}'
    targets = _scalar(url, f"count(up{not_self})")
    ms = 1000.0

    def scaled(v: float | None, k: float) -> float | None:
        return None if v is None else v * k

    per_target: dict[str, float] = {}
    try:
        series = promserver.query(url, 'count by (job) ({__name__!=""})')
        targets_by_job = promserver.query(url, "count by (job) (up)")
        n_targets = {r["metric"].get("job", ""): float(r["value"][1]) for r in targets_by_job}
        for r in series:
            job = r["metric"].get("job", "")
            if n_targets.get(job):
                # what the target serves plus the 5 series Prometheus adds per target (up, …)
                per_target[job] = float(r["value"][1]) / n_targets[job]
    except (RankwatchError, requests.RequestException, ValueError):
        pass
    return PromResources(
        series_per_target=per_target,
        head_series=_scalar(url, f"max(max_over_time(prometheus_tsdb_head_series{sel}[{w}]))"),
        samples_per_s=_scalar(url, f"sum(rate(prometheus_tsdb_head_samples_appended_total{sel}[{w}]))"),
        scrape_targets=int(targets or 0),
        scrape_median_ms=scaled(_scalar(url, f"quantile(0.5, quantile_over_time(0.5, scrape_duration_seconds{not_self}[{w}]))"), ms),
        scrape_p99_ms=scaled(_scalar(url, f"quantile(0.99, quantile_over_time(0.99, scrape_duration_seconds{not_self}[{w}]))"), ms),
        scrape_max_ms=scaled(_scalar(url, f"max(max_over_time(scrape_duration_seconds{not_self}[{w}]))"), ms),
        rss_mib=scaled(_scalar(url, f"max(last_over_time(process_resident_memory_bytes{sel}[{w}]))"), 1 / 2**20),
        rss_max_mib=scaled(_scalar(url, f"max(max_over_time(process_resident_memory_bytes{sel}[{w}]))"), 1 / 2**20),
        cpu_cores=_scalar(url, f"sum(rate(process_cpu_seconds_total{sel}[{w}]))"),
    )


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a live process and its reaped children, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields after the command: state is [0]; utime [11], stime [12], cutime [13], cstime [14].
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def prometheus_alerts(url: str, span_s: float) -> list[dict[str, str]]:
    """Every alert of the loaded rule files (``alerts/*.yml``) that was firing at some point of
    the last ``span_s`` seconds, with its identifying labels."""
    try:
        rows = promserver.query(url, f'max_over_time(ALERTS{{alertstate="firing"}}[{max(10, int(span_s))}s])')
    except (RankwatchError, requests.RequestException, ValueError):
        return []
    keep = ("alertname", "severity", "Hostname", "node", "gpu", "rank", "device", "instance", "run", "xid")
    out = [{k: r["metric"][k] for k in keep if k in r["metric"]} for r in rows]
    return sorted(out, key=lambda a: tuple(a.get(k, "") for k in keep))
