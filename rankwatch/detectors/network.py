"""Degraded network: EFA error counters rising on a node against its own past and the fleet.

EFA series carry no host label; the source joins them to the node through ``instance`` and
``rankwatch_node_info``. Each node's devices are summed per counter."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import Snapshot

_EWMA = 0.2  # weight of a clean window in the node's own baseline
_MIN_OWN_WINDOWS = 4  # clean windows before a node's own past counts as a reference


class NetworkHealth:
    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        # node -> counter -> EWMA of the per-window increase while the node was clean
        self.baseline: dict[str, dict[str, float]] = {}

    def evaluate(self, snap: Snapshot) -> tuple[list[Finding], dict[str, dict[str, Any]]]:
        cfg = self.cfg
        per_node: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        devices: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        for nic in snap.nics:
            node = per_node[nic.node]
            errs = {c: float(v) for c, v in nic.increase.items() if c in cfg.efa_error_counters and v is not None and np.isfinite(v)}
            for c, v in errs.items():
                node[c] += max(v, 0.0)
            devices[nic.node][f"{nic.device}/{nic.port}"] = errs
        # Scale to the configured window so baselines are comparable across window lengths.
        fleet: dict[str, float] = {}
        if len(per_node) >= 3:
            for c in cfg.efa_error_counters:
                vals = [counters.get(c, 0.0) for counters in per_node.values()]
                fleet[c] = float(np.median(vals))
        findings: list[Finding] = []
        diag: dict[str, dict[str, Any]] = {}
        for node, counters in per_node.items():
            base = self.baseline.get(node, {})
            bad: dict[str, dict[str, float | None]] = {}
            for c, inc in counters.items():
                if inc < cfg.efa_min_increase:
                    continue
                own = base.get(c) if base.get("_n", 0) >= _MIN_OWN_WINDOWS else None
                if own is not None and inc <= cfg.efa_own_factor * own:
                    continue
                fl = fleet.get(c)
                if fl is not None and inc <= cfg.efa_fleet_factor * fl:
                    continue
                if own is None and fl is None:
                    continue  # no reference yet (young baseline, fleet too small): no verdict
                bad[c] = {"increase": inc, "own_baseline": own, "fleet_median": fl}
            flagged = bool(bad)
            if not flagged:
                nb = dict(base)
                nb["_n"] = nb.get("_n", 0) + 1
                for c in cfg.efa_error_counters:
                    v = counters.get(c, 0.0)
                    nb[c] = v if c not in nb else (1 - _EWMA) * nb[c] + _EWMA * v
                self.baseline[node] = nb
            worst_dev = None
            if flagged:
                worst_dev = max(devices[node], key=lambda dv: sum(devices[node][dv].get(c, 0.0) for c in bad))
                diag[node] = {"counters": bad, "device": worst_dev}
            names = ", ".join(f"{c} +{v['increase']:g}" for c, v in sorted(bad.items()))
            score = max((v["increase"] / max(v["fleet_median"] or 0, v["own_baseline"] or 0, 1.0) for v in bad.values()), default=0.0)
            findings.append(Finding(
                key=f"efa:{node}", flagged=flagged, subject={"node": node, "nic": worst_dev},
                score=float(score), severity="warning",
                summary=(f"EFA errors rising on {node} ({names} in {snap.node_window_s or snap.window_s:g} s; worst device {worst_dev}), "
                         "well above its own past and the fleet."),
                resolved_summary=f"EFA error counters on {node} are back to normal.",
                evidence={"counters": bad, "devices": devices[node] if flagged else {}, "window_s": snap.node_window_s or snap.window_s},
                persist=cfg.network_persist_windows, resolve=cfg.network_resolve_windows,
            ))
        return findings, diag

    def export(self) -> dict[str, Any]:
        return {"baseline": self.baseline}

    def load(self, data: dict[str, Any]) -> None:
        self.baseline = {n: dict(c) for n, c in data.get("baseline", {}).items()}
