"""The report's charts (PNG, matplotlib), drawn from Prometheus range queries over the run:
job throughput with the incidents shaded, per-rank compute time as a heatmap (where a
straggler jumps out), and the hardware evidence of the GPU and NIC incidents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests

from rankwatch.demo.scoring import Incident
from rankwatch.events import Event

_KIND_COLOURS = {"straggler": "tab:orange", "gpu_fault": "tab:red", "network": "tab:purple", "hang": "black",
                 "throughput_drop": "tab:cyan"}


def query_range(url: str, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = requests.get(url.rstrip("/") + "/api/v1/query_range",
                     params={"query": promql, "start": start, "end": end, "step": step}, timeout=30)
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"{promql!r}: {body.get('error')}")
    return body["data"]["result"]


def _series(result: dict[str, Any], t0: float) -> tuple[np.ndarray, np.ndarray]:
    vals = np.array([(float(t) - t0, float(v)) for t, v in result["values"]], dtype=float)
    if vals.size == 0:
        return np.array([]), np.array([])
    return vals[:, 0], vals[:, 1]


def _shade(ax: Any, incidents: Sequence[Incident], t0: float) -> None:
    for inc in incidents:
        colour = "tab:green" if inc.benign else "tab:red"
        ax.axvspan(inc.start - t0, inc.end - t0, color=colour, alpha=0.08)
        ax.text((inc.start + inc.end) / 2 - t0, 1.0, inc.name, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)


def _events(ax: Any, events: Sequence[Event], t0: float) -> None:
    for ev in events:
        if ev.state == "firing":
            ax.axvline(ev.time - t0, color=_KIND_COLOURS.get(ev.kind, "grey"), lw=1, ls="--", alpha=0.8)


def draw_all(url: str, out: Path, *, t0: float, end: float, step: float, window: float,
             incidents: Sequence[Incident], events: Sequence[Event], run: str,
             thermal: tuple[str, str] | None, efa_node: str | None) -> list[Path]:
    """Write the charts under ``out``; returns their paths. A chart whose query returns
    nothing is skipped rather than drawn empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    w = f"{int(window)}s"
    sel = f'run="{run}"'
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. throughput
    res = query_range(url, f"sum(rate(rankwatch_tokens_total{{{sel}}}[{w}]))", t0, end, step)
    if res:
        fig, ax = plt.subplots(figsize=(11, 3.6))
        x, y = _series(res[0], t0)
        ax.plot(x, y / 1e3, color="tab:blue", lw=1.5)
        _shade(ax, incidents, t0)
        _events(ax, events, t0)
        ax.set_xlabel("seconds since the timeline started")
        ax.set_ylabel("k tokens / s")
        ax.set_title(f"job throughput ({run}); dashed lines: detector events firing", pad=14)
        ax.set_ylim(bottom=0)
        save(fig, "throughput.png")

    # 2. per-rank compute time per step (sections other than comm and dataloader)
    compute = (f'sum by (rank) (rate(rankwatch_section_seconds_total{{{sel},section!~"comm|dataloader"}}[{w}]))'
               f" / sum by (rank) (rate(rankwatch_steps_total{{{sel}}}[{w}]))")
    res = query_range(url, compute, t0, end, step)
    if res:
        times = np.arange(t0, end + step / 2, step)
        ranks = sorted(int(r["metric"]["rank"]) for r in res)
        index = {r: i for i, r in enumerate(ranks)}
        grid = np.full((len(ranks), len(times)), np.nan)
        for r in res:
            i = index[int(r["metric"]["rank"])]
            for t, v in r["values"]:
                j = int(round((float(t) - t0) / step))
                if 0 <= j < len(times):
                    grid[i, j] = float(v) * 1e3
        fig, ax = plt.subplots(figsize=(11, 5))
        img = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                        extent=(0, end - t0, len(ranks) - 0.5, -0.5))
        fig.colorbar(img, ax=ax, label="compute ms / step")
        ax.set_xlabel("seconds since the timeline started")
        ax.set_ylabel("rank")
        ax.set_title("per-rank compute time per step: the straggler is the bright line")
        for inc in incidents:
            if not inc.benign:
                ax.axvline(inc.start - t0, color="white", lw=0.6, ls=":")
        save(fig, "rank_compute_heatmap.png")

    # 3. hardware evidence: the throttled GPU's SM clock, the degraded node's EFA retransmits
    panels: list[tuple[str, str, str]] = []
    if thermal:
        node, gpu = thermal
        panels.append((f'DCGM_FI_DEV_SM_CLOCK{{Hostname="{node}"}}', "SM clock (MHz)",
                       f"{node}: SM clock per GPU (GPU {gpu} throttles)"))
    if efa_node:
        panels.append(('sum by (instance) (rate(node_amazonefa_retrans_pkts[' + w + ']))'
                       ' * on (instance) group_left (Hostname) '
                       f'max by (instance, Hostname) (rankwatch_node_info{{Hostname="{efa_node}"}})',
                       "retransmitted packets / s", f"{efa_node}: EFA retransmits"))
    drawn = []
    for promql, ylabel, title in panels:
        try:
            res = query_range(url, promql, t0, end, step)
        except (ValueError, requests.RequestException):
            continue
        if res:
            drawn.append((res, ylabel, title))
    if drawn:
        fig, axes = plt.subplots(len(drawn), 1, figsize=(11, 3.2 * len(drawn)), squeeze=False)
        for ax, (res, ylabel, title) in zip(axes[:, 0], drawn, strict=True):
            for r in res:
                x, y = _series(r, t0)
                ax.plot(x, y, lw=1, label=r["metric"].get("gpu", r["metric"].get("instance", "")))
            _shade(ax, incidents, t0)
            ax.set_ylabel(ylabel)
            ax.set_title(title, pad=14)
            if len(res) <= 8:
                ax.legend(fontsize=7, loc="lower left", ncol=8)
        axes[-1, 0].set_xlabel("seconds since the timeline started")
        save(fig, "hardware_evidence.png")
    return written
