"""The chart attached to a Slack alert: the culprit rank's compute time per step against its
peers over the last hour (peer median with the 10–90 % band), like the throughput-degradation
figure on-call engineers know.

``render_compute_chart`` is pure (data in, PNG bytes out). The data comes from a Prometheus
range query when the config names a Prometheus, else from a series the detector put in the
event's evidence (``evidence["compute_series"] = {"t": [...], "culprit": [...],
"peer_median": [...], "peer_p10": [...], "peer_p90": [...]}``)."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from rankwatch.events import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeSeries:
    t: Sequence[float]  # Unix seconds
    culprit: Sequence[float]  # seconds of compute per step
    peer_median: Sequence[float]
    peer_p10: Sequence[float] | None = None
    peer_p90: Sequence[float] | None = None
    onset: float | None = None  # when the episode started (vertical marker)


def render_compute_chart(data: ComputeSeries, *, title: str, culprit_label: str = "culprit") -> bytes:
    """A PNG (about 900×380 px) of the culprit's compute time per step against its peers."""
    import matplotlib  # heavy, and only needed when a chart is sent

    matplotlib.use("Agg", force=False)
    from matplotlib.dates import DateFormatter
    from matplotlib.figure import Figure

    t = np.asarray(data.t, dtype=float)
    x = t.astype("datetime64[s]")
    fig = Figure(figsize=(9, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if data.peer_p10 is not None and data.peer_p90 is not None:
        ax.fill_between(x, np.asarray(data.peer_p10, float), np.asarray(data.peer_p90, float),
                        color="#9ecae1", alpha=0.5, linewidth=0, label="peers 10–90 %")
    ax.plot(x, np.asarray(data.peer_median, float), color="#3182bd", linewidth=1.5, label="peer median")
    ax.plot(x, np.asarray(data.culprit, float), color="#de2d26", linewidth=2.0, label=culprit_label)
    if data.onset is not None:
        ax.axvline(np.datetime64(int(data.onset), "s"), color="#636363", linestyle="--", linewidth=1, label="episode start")
    ax.set_ylabel("compute s / step")
    # The title holds the run label: "$" in it must be text, not matplotlib mathtext (a lone "$"
    # made savefig raise, so the chart was lost).
    ax.set_title(title, fontsize=11, parse_math=False)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    ax.set_xlabel("UTC")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def series_from_evidence(event: Event) -> ComputeSeries | None:
    raw = event.evidence.get("compute_series")
    if not isinstance(raw, Mapping):
        return None
    try:
        t = [float(v) for v in raw["t"]]
        culprit = [float(v) for v in raw["culprit"]]
        med = [float(v) for v in raw["peer_median"]]
    except (KeyError, TypeError, ValueError):
        return None
    if not t or len(t) != len(culprit) or len(t) != len(med):
        return None
    p10, p90 = raw.get("peer_p10"), raw.get("peer_p90")
    ok_band = isinstance(p10, list) and isinstance(p90, list) and len(p10) == len(t) == len(p90)
    return ComputeSeries(t, culprit, med, p10 if ok_band else None, p90 if ok_band else None,
                         onset=event.since if event.since is not None else event.time)


# Per-rank compute seconds per step, from the probe's raw counters (works without the recording
# rules of alerts/ loaded). Same definition as the detector: sections other than comm/dataloader.
_COMPUTE = ('sum by (rank) (rate(rankwatch_section_seconds_total{{run="{run}",section!~"comm|dataloader"}}[{w}]))'
            ' / max by (rank) (rate(rankwatch_steps_total{{run="{run}"}}[{w}]))')
# The pp stage (peers) comes from rankwatch_rank_info; without it every other rank is a peer.
COMPUTE_QUERY = ('(' + _COMPUTE + ' * on (rank) group_left (pp) max by (rank, pp) (rankwatch_rank_info{{run="{run}"}}))'
                 ' or ' + _COMPUTE)


def series_from_prometheus(url: str, event: Event, *, window_s: float = 3600.0, step_s: float | None = None,
                           rate_window: str = "1m", timeout: float = 10.0) -> ComputeSeries | None:
    """Range-query the culprit's and its peers' compute time; peers = same pp stage if known."""
    if event.rank is None or not event.run:
        return None
    end = float(event.time)
    start = end - window_s
    step = step_s or max(15.0, window_s / 240)
    q = COMPUTE_QUERY.format(run=event.run.replace('"', '\\"'), w=rate_window)
    try:
        r = requests.get(url.rstrip("/") + "/api/v1/query_range",
                         params={"query": q, "start": start, "end": end, "step": step}, timeout=timeout)
        body = r.json()
    except (requests.RequestException, ValueError) as exc:
        log.warning("chart: Prometheus range query failed: %s", exc)
        return None
    if body.get("status") != "success":
        log.warning("chart: Prometheus answered %s: %s", body.get("errorType"), body.get("error"))
        return None
    return _series_from_matrix(body["data"]["result"], event)


def _series_from_matrix(result: list[dict[str, Any]], event: Event) -> ComputeSeries | None:
    by_rank: dict[str, dict[float, float]] = {}
    pp_of: dict[str, str | None] = {}
    for s in result:
        rank = s["metric"].get("rank")
        if rank is None:
            continue
        by_rank[rank] = {float(t): float(v) for t, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")}
        pp_of[rank] = s["metric"].get("pp")
    me = str(event.rank)
    if me not in by_rank:
        return None
    peers = [r for r in by_rank if r != me and (pp_of.get(me) is None or pp_of.get(r) == pp_of.get(me))]
    if not peers:
        peers = [r for r in by_rank if r != me]
    if not peers:
        return None
    times = sorted(by_rank[me])
    cul, med, p10, p90, ts = [], [], [], [], []
    for t in times:
        vals = [by_rank[p][t] for p in peers if t in by_rank[p]]
        if not vals:
            continue
        ts.append(t)
        cul.append(by_rank[me][t])
        med.append(float(np.median(vals)))
        p10.append(float(np.percentile(vals, 10)))
        p90.append(float(np.percentile(vals, 90)))
    if len(ts) < 2:
        return None
    return ComputeSeries(ts, cul, med, p10, p90, onset=event.since if event.since is not None else event.time)
