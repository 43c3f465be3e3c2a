"""Degraded network: EFA error events on a NIC, relative to that NIC's own traffic.

A device port is bad in a window when its error events (the configured counters, summed) are
at least ``efa_max_errors_per_packet`` of the packets it sent and received, and at least
``efa_min_errors_per_s`` (an absolute floor, so that an idle NIC's single event is no alarm).
The Prometheus rule RankwatchEfaErrorsRising applies the same two thresholds over 5 min; both
come from this module's defaults (``rankwatch.rulegen`` writes the rule).

EFA series carry no host label; the source joins them to the node through ``instance`` and
``rankwatch_node_info``. One finding per node, naming its worst device."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import NicObs, Snapshot

PACKET_COUNTERS = ("tx_pkts", "rx_pkts")


def nic_errors(nic: NicObs, counters: tuple[str, ...]) -> tuple[dict[str, float], float | None]:
    """(error events per counter, packets sent + received) of one NIC over the window; packets
    None when the NIC reports no packet counters."""
    errs = {c: max(float(v), 0.0) for c, v in nic.increase.items()
            if c in counters and v is not None and np.isfinite(v)}
    pk = [nic.increase.get(c) for c in PACKET_COUNTERS]
    if all(v is None or not np.isfinite(v) for v in pk):
        return errs, None
    return errs, float(sum(max(v, 0.0) for v in pk if v is not None and np.isfinite(v)))


def nic_is_bad(errors: float, packets: float | None, window_s: float, cfg: DetectorConfig) -> bool:
    """The rule, shared with the Prometheus alert: enough errors, and enough per packet."""
    if packets is None or errors < cfg.efa_min_errors_per_s * window_s:
        return False
    return packets <= 0 or errors / packets >= cfg.efa_max_errors_per_packet


class NetworkHealth:
    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg

    def evaluate(self, snap: Snapshot) -> tuple[list[Finding], dict[str, dict[str, Any]]]:
        cfg = self.cfg
        devices: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        window = snap.node_window_s or snap.window_s  # the EFA counters' own window
        for nic in snap.nics:
            errs, packets = nic_errors(nic, cfg.efa_error_counters)
            total = sum(errs.values())
            devices[nic.node][f"{nic.device}/{nic.port}"] = {
                "errors": errs, "packets": packets, "bad": nic_is_bad(total, packets, window, cfg),
                "errors_per_packet": (total / packets if packets else None) if packets is not None else None,
            }
        findings: list[Finding] = []
        diag: dict[str, dict[str, Any]] = {}
        for node, devs in devices.items():
            bad = {dv: d for dv, d in devs.items() if d["bad"]}
            flagged = bool(bad)
            worst = None
            counters: dict[str, dict[str, float | None]] = {}
            if flagged:
                worst = max(bad, key=lambda dv: sum(bad[dv]["errors"].values()))
                for d in bad.values():
                    for c, v in d["errors"].items():
                        if v > 0:
                            entry = counters.setdefault(c, {"increase": 0.0})
                            entry["increase"] = float(entry["increase"] or 0.0) + v
                diag[node] = {"counters": counters, "device": worst}
            w = devs[worst] if worst else None
            rate = w["errors_per_packet"] if w else None
            per_million = f"{rate * 1e6:.0f} per million packets" if rate is not None else "no packets"
            names = ", ".join(f"{c} +{v['increase']:g}" for c, v in sorted(counters.items()))
            findings.append(Finding(
                key=f"efa:{node}", flagged=flagged, subject={"node": node, "nic": worst},
                score=float(rate or 0.0) / cfg.efa_max_errors_per_packet if flagged else 0.0, severity="warning",
                summary=(f"EFA errors on {node}, device {worst}: {names} in {window:g} s, {per_million} "
                         f"(threshold {cfg.efa_max_errors_per_packet * 1e6:g} per million)."),
                resolved_summary=f"EFA error rate on {node} is back under its threshold.",
                evidence={"counters": counters, "devices": {dv: d for dv, d in devs.items() if d["bad"]} if flagged else {},
                          "errors_per_packet": rate, "window_s": window,
                          "threshold_errors_per_packet": cfg.efa_max_errors_per_packet,
                          "floor_errors_per_s": cfg.efa_min_errors_per_s},
                persist=cfg.network_persist_windows, resolve=cfg.network_resolve_windows,
            ))
        return findings, diag

    def export(self) -> dict[str, Any]:
        return {}

    def load(self, data: dict[str, Any]) -> None:
        """Nothing to restore: the rule has no memory (older states kept baselines)."""
