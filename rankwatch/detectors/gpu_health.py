"""Failing-GPU rules: XIDs by class, double-bit ECC, row-remap failure/pending, a GPU that
stopped answering (health fail, or its series vanished while its node still reports), and
thermal/power throttling with an SM clock drop against the GPU's own past and its peers."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Collection
from typing import Any

import numpy as np

from rankwatch import xids as xid_table
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.episodes import Finding
from rankwatch.detectors.model import GpuObs, Snapshot

# DCGM_FI_DEV_CLOCKS_EVENT_REASONS bits that mean the clock was pulled down by power or heat
# (nvmlClocksEventReason*): SW power cap, HW slowdown, SW thermal, HW thermal, HW power brake.
THROTTLE_BITS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
THROTTLE_MASK = sum(THROTTLE_BITS)
_BASELINE_LEN = 20


def throttle_reasons(mask: float | None) -> list[str]:
    if mask is None or not math.isfinite(mask):
        return []
    m = int(mask)
    return [name for bit, name in THROTTLE_BITS.items() if m & bit]


class GpuHealth:
    """Keeps the memory the rules need: which GPUs each node had, clock baselines, last XID."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.clock_baseline: dict[str, list[float]] = {}
        self.last_xid: dict[str, float] = {}
        self._keep: Collection[str] = ()

    def evaluate(self, snap: Snapshot, keep: Collection[str] = ()) -> tuple[list[Finding], dict[tuple[str, str], dict[str, Any]]]:
        """Findings per (GPU, problem class), and per-GPU diagnosis for straggler evidence.

        A clean verdict is only built for keys in ``keep`` (those the episode tracker holds):
        for every other GPU "nothing wrong" needs no finding, which keeps a cycle over
        thousands of GPUs cheap."""
        cfg = self.cfg
        self._keep = keep
        findings: list[Finding] = []
        diag: dict[tuple[str, str], dict[str, Any]] = {}
        present = [g for g in snap.gpus if g.present]
        nodes_reporting = {g.node for g in present} | {n.node for n in snap.nodes if n.exporter_up}
        # peer clock reference: median SM clock of same-model GPUs this evaluation
        by_model: dict[str | None, list[float]] = defaultdict(list)
        for g in present:
            if g.sm_clock is not None and g.sm_clock > 0:
                by_model[g.model].append(g.sm_clock)
        model_median = {m: float(np.median(v)) for m, v in by_model.items() if len(v) >= 3}

        for g in present:
            key = f"{g.node}:{g.gpu}"
            self.seen[g.node].add(g.gpu)
            d = diag.setdefault((g.node, g.gpu), {})
            findings.extend(self._xid(g, key, d))
            findings.extend(self._memory(g, key, d))
            findings.extend(self._lost_by_health(g, key, d))
            findings.extend(self._throttle(g, key, d, model_median.get(g.model)))
            if f"lost:{key}" in keep:
                findings.append(Finding(
                    key=f"lost:{key}", flagged=False, subject={"node": g.node, "gpu": g.gpu}, score=0.0,
                    summary="", resolved_summary=f"GPU {g.gpu} on {g.node} answers again.",
                    evidence={"problem": "gpu_lost"}, persist=1, resolve=cfg.gpu_resolve_windows,
                ))

        # GPUs that vanished: seen before on a node that still reports, absent now
        present_keys = {(g.node, g.gpu) for g in present}
        explicit_absent = {(g.node, g.gpu) for g in snap.gpus if not g.present}
        for node, gpus in self.seen.items():
            if node not in nodes_reporting:
                continue  # whole node silent: not this GPU's fault (and not evidence of health)
            for gpu in sorted(gpus):
                if (node, gpu) in present_keys:
                    continue
                key = f"{node}:{gpu}"
                d = diag.setdefault((node, gpu), {})
                d["lost"] = True
                reason = "reported absent" if (node, gpu) in explicit_absent else "its series vanished"
                findings.append(Finding(
                    key=f"lost:{key}", flagged=True, subject={"node": node, "gpu": gpu},
                    score=1.0, severity="critical",
                    summary=f"GPU {gpu} on {node} stopped answering ({reason} while the node still reports).",
                    resolved_summary=f"GPU {gpu} on {node} answers again.",
                    evidence={"problem": "gpu_lost", "reason": reason}, persist=1, resolve=cfg.gpu_resolve_windows,
                ))
        # a node that counts fewer answering than expected GPUs but we never saw the missing one
        lost_per_node: dict[str, int] = defaultdict(int)
        for (node, _), dg in diag.items():
            if dg.get("lost"):
                lost_per_node[node] += 1
        for n in snap.nodes:
            if n.gpus_expected is None or n.gpus_answering is None:
                continue
            missing = n.gpus_expected - n.gpus_answering
            known_lost = lost_per_node.get(n.node, 0)
            flagged = missing > known_lost
            if not flagged and f"count:{n.node}" not in keep:
                continue
            findings.append(Finding(
                key=f"count:{n.node}", flagged=bool(flagged), subject={"node": n.node}, score=float(max(missing, 0)),
                severity="critical",
                summary=f"Node {n.node}: only {n.gpus_answering:g} of {n.gpus_expected:g} GPUs answer.",
                resolved_summary=f"Node {n.node}: all {n.gpus_expected:g} GPUs answer again.",
                evidence={"problem": "gpus_missing", "expected": n.gpus_expected, "answering": n.gpus_answering},
                persist=1, resolve=cfg.gpu_resolve_windows,
            ))
        return findings, diag

    def _xid(self, g: GpuObs, key: str, d: dict[str, Any]) -> list[Finding]:
        cfg = self.cfg
        xids = {int(x): float(c) for x, c in g.xid_increase.items() if c and c > 0} if g.xid_increase else {}
        prev = self.last_xid.get(key)
        if g.last_xid is not None:
            self.last_xid[key] = g.last_xid
            # the last-XID gauge changing is an XID even when no per-XID counter is exported
            if g.last_xid > 0 and prev is not None and g.last_xid != prev and int(g.last_xid) not in xids:
                xids[int(g.last_xid)] = 1.0
        if xids:
            d["xids"] = xids
        elif not self._keep or (f"xid-critical:{key}" not in self._keep and f"xid-other:{key}" not in self._keep):
            return []  # the common case, every GPU every evaluation: nothing to say
        # one classification with the exporter's health status and the alert rules (rankwatch.xids);
        # the application's own XIDs (13, 31, 43, ...) are no GPU fault and raise nothing
        sev_of = {x: xid_table.severity(x, cfg.critical_xids) for x in xids}
        critical = sorted(x for x, sev in sev_of.items() if sev == "critical")
        other = sorted(x for x, sev in sev_of.items() if sev == "warning")
        out = []
        for cls, codes, sev in (("critical", critical, "critical"), ("other", other, "warning")):
            if not codes and f"xid-{cls}:{key}" not in self._keep:
                continue
            names = ", ".join(f"XID {x} ({xid_table.classify(x).text})" for x in codes)
            out.append(Finding(
                key=f"xid-{cls}:{key}", flagged=bool(codes), subject={"node": g.node, "gpu": g.gpu},
                score=float(sum(xids[x] for x in codes)), severity=sev,
                summary=f"GPU {g.gpu} on {g.node} reported {names}.",
                resolved_summary=f"GPU {g.gpu} on {g.node}: no new XID for {cfg.gpu_resolve_windows} evaluations.",
                evidence={"problem": f"xid_{cls}", "xids": {str(x): xids[x] for x in codes}, "uuid": g.uuid},
                persist=1, resolve=cfg.gpu_resolve_windows,
            ))
        return out

    def _memory(self, g: GpuObs, key: str, d: dict[str, Any]) -> list[Finding]:
        cfg = self.cfg
        problems = []
        if g.dbe_increase and g.dbe_increase > 0:
            problems.append(f"{g.dbe_increase:g} new double-bit ECC errors")
        if g.remap_failure and g.remap_failure > 0:
            problems.append("row-remap failure")
        if g.remap_pending and g.remap_pending > 0:
            problems.append("row remap pending (reset needed)")
        if g.retired_pending and g.retired_pending > 0:
            problems.append("page retirement pending")
        critical = bool((g.dbe_increase or 0) > 0 or (g.remap_failure or 0) > 0)
        if problems:
            d["memory"] = problems
        elif f"memory:{key}" not in self._keep:
            return []
        return [Finding(
            key=f"memory:{key}", flagged=bool(problems), subject={"node": g.node, "gpu": g.gpu},
            score=float(g.dbe_increase or 0) + float(bool(g.remap_failure)), severity="critical" if critical else "warning",
            summary=f"GPU {g.gpu} on {g.node} has memory errors: {', '.join(problems)}.",
            resolved_summary=f"GPU {g.gpu} on {g.node}: no memory errors for {cfg.gpu_resolve_windows} evaluations.",
            evidence={"problem": "memory", "dbe_increase": g.dbe_increase, "remap_failure": g.remap_failure,
                      "remap_pending": g.remap_pending, "retired_pending": g.retired_pending, "uuid": g.uuid},
            persist=1, resolve=cfg.gpu_resolve_windows,
        )]

    def _lost_by_health(self, g: GpuObs, key: str, d: dict[str, Any]) -> list[Finding]:
        failed = g.health is not None and g.health >= self.cfg.health_fail_value
        if failed:
            d["health_fail"] = True
        elif f"health:{key}" not in self._keep:
            return []
        return [Finding(
            key=f"health:{key}", flagged=bool(failed), subject={"node": g.node, "gpu": g.gpu},
            score=float(g.health or 0), severity="critical",
            summary=f"GPU {g.gpu} on {g.node} reports health FAIL (DCGM health status {g.health:g})." if failed else "",
            resolved_summary=f"GPU {g.gpu} on {g.node} reports healthy again.",
            evidence={"problem": "health_fail", "health": g.health, "last_xid": g.last_xid, "uuid": g.uuid},
            persist=1, resolve=self.cfg.gpu_resolve_windows,
        )]

    def _throttle(self, g: GpuObs, key: str, d: dict[str, Any], peer_clock: float | None) -> list[Finding]:
        cfg = self.cfg
        base_hist = self.clock_baseline.get(key, [])
        own = statistics.median(base_hist) if len(base_hist) >= 3 else None
        clock = g.sm_clock
        drops = {}
        if clock is not None and clock > 0:
            for name, ref in (("own_baseline", own), ("peers", peer_clock)):
                if ref and clock < (1 - cfg.clock_drop_rel) * ref:
                    drops[name] = round(1 - clock / ref, 4)
        reasons: list[str] = []
        violating = no_reason_info = False
        if drops or f"throttle:{key}" in self._keep:
            reasons = throttle_reasons(g.clock_event_reasons)
            violating = any(v is not None and v > 0 for v in (g.thermal_violation_rate, g.power_violation_rate))
            no_reason_info = (g.clock_event_reasons is None and g.thermal_violation_rate is None
                              and g.power_violation_rate is None)
        flagged = bool(drops) and (bool(reasons) or violating or no_reason_info)
        if clock is not None and clock > 0 and not flagged:
            base_hist = (base_hist + [round(clock, 1)])[-_BASELINE_LEN:]
            self.clock_baseline[key] = base_hist
        if not flagged and f"throttle:{key}" not in self._keep:
            return []
        ref = own or peer_clock
        ev = {"problem": "throttling", "sm_clock_mhz": clock, "baseline_sm_clock_mhz": own,
              "peer_sm_clock_mhz": peer_clock, "clock_drop": drops, "reasons": reasons,
              "temperature_c": g.temperature, "power_w": g.power,
              "thermal_violation_us_per_s": g.thermal_violation_rate, "power_violation_us_per_s": g.power_violation_rate}
        if flagged:
            d["throttling"] = ev
        why = "/".join(reasons) or ("violation counters" if violating else "clock drop")
        temp = f", {g.temperature:.0f} °C" if g.temperature is not None else ""
        return [Finding(
            key=f"throttle:{key}", flagged=flagged, subject={"node": g.node, "gpu": g.gpu},
            score=float(max(drops.values())) if drops else 0.0, severity="warning",
            summary=(f"GPU {g.gpu} on {g.node} is throttled ({why}{temp}): SM clock {clock or 0:.0f} MHz vs "
                     f"{ref or 0:.0f} MHz normal."),
            resolved_summary=f"GPU {g.gpu} on {g.node} is no longer throttled.",
            evidence=ev, persist=cfg.throttle_persist_windows, resolve=cfg.gpu_resolve_windows,
        )]

    def export(self) -> dict[str, Any]:
        return {"seen": {n: sorted(g) for n, g in self.seen.items()}, "clock_baseline": self.clock_baseline,
                "last_xid": self.last_xid}

    def load(self, data: dict[str, Any]) -> None:
        self.seen = defaultdict(set, {n: set(g) for n, g in data.get("seen", {}).items()})
        self.clock_baseline = {k: list(v) for k, v in data.get("clock_baseline", {}).items()}
        self.last_xid = dict(data.get("last_xid", {}))
