"""Diagnosis: ties a straggler to the evidence that explains it (its GPU's throttling, XIDs or
memory errors, its node's EFA errors, its dataloader) and estimates what it costs the job."""

from __future__ import annotations

from typing import Any

from rankwatch.detectors.model import RankObs
from rankwatch.detectors.straggler import StragglerScores


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def straggler_finding_text(scores: StragglerScores, i: int, gpu_diag: dict[tuple[str, str], dict[str, Any]],
                           net_diag: dict[str, dict[str, Any]], step_s: float | None) -> tuple[str, dict[str, Any], str]:
    """(summary, evidence, severity) for rank ``i`` of ``scores``."""
    o: RankObs = scores.obs[i]
    cause = scores.cause[i]
    compute, peer_c = float(scores.compute[i]), float(scores.peer_compute[i])
    dl, peer_d = float(scores.dataloader[i]), float(scores.peer_dataloader[i])
    busy, peer_b = compute + dl, float(scores.peer_busy[i])
    saving = max(busy - peer_b, 0.0)
    step = step_s or o.step_seconds
    speedup = saving / step if step else None
    explanations: list[str] = []
    ev: dict[str, Any] = {
        "cause": cause,
        "compute_s": _r(compute), "peer_compute_s": _r(peer_c), "compute_slowdown": _r(scores.rel_compute[i]),
        "z_compute": _r(scores.z_compute[i], 2),
        # largest CUSUM chart over its threshold (>= 1 opened the episode), and the peers' spread
        "sequential_evidence": _r(scores.evidence_ratio[i], 3), "peer_noise_rel": _r(scores.noise_compute[i]),
        "dataloader_s": _r(dl), "peer_dataloader_s": _r(peer_d), "dataloader_excess": _r(scores.rel_dataloader[i]),
        "z_dataloader": _r(scores.z_dataloader[i], 2),
        "comm_wait_s": _r(scores.comm[i]) if scores.comm[i] == scores.comm[i] else None,
        "peer_comm_wait_s": _r(scores.peer_comm[i]) if scores.peer_comm[i] == scores.peer_comm[i] else None,
        "peer_group": scores.group_name(i), "peer_group_size": int(scores.group_size[i]),
        "step_s": _r(step), "est_step_saving_s": _r(saving),
        "est_job_speedup": _r(speedup),
        "pp": o.pp, "dp": o.dp, "tp": o.tp, "gpu_uuid": o.gpu_uuid,
    }
    if ev["comm_wait_s"] is not None and ev["peer_comm_wait_s"] is not None:
        # the straggler waits least in collectives: everyone else waits for it
        ev["waits_least"] = bool(ev["comm_wait_s"] < ev["peer_comm_wait_s"])
    severity = "warning"
    if cause == "dataloader":
        explanations.append(f"its dataloader takes {dl:.3g} s per step vs {peer_d:.3g} s on its peers")
    gd = gpu_diag.get((o.node, o.gpu)) if o.gpu is not None else None
    if gd:
        if "throttling" in gd:
            t = gd["throttling"]
            why = "/".join(t["reasons"]) or "clock drop"
            ref = t.get("baseline_sm_clock_mhz") or t.get("peer_sm_clock_mhz") or 0
            explanations.append(f"its GPU {o.gpu} is throttled ({why}, SM clock {t['sm_clock_mhz'] or 0:.0f} vs {ref:.0f} MHz)")
            ev["gpu_throttling"] = t
        if "xids" in gd:
            explanations.append("its GPU reported XID " + ", ".join(str(x) for x in sorted(gd["xids"])))
            ev["gpu_xids"] = {str(k): v for k, v in gd["xids"].items()}
            severity = "critical"
        if "memory" in gd:
            explanations.append("its GPU has " + ", ".join(gd["memory"]))
            ev["gpu_memory"] = gd["memory"]
            severity = "critical"
    nd = net_diag.get(o.node)
    if nd:
        explanations.append(f"its node's EFA device {nd['device']} reports rising " + ", ".join(sorted(nd["counters"])))
        ev["efa_errors"] = nd
    ev["explanation"] = explanations
    if cause == "dataloader":
        what = f"dataloader {ev['dataloader_excess'] * 100:.0f} % of a step slower than its peers"
    else:
        what = f"compute {scores.rel_compute[i] * 100:.0f} % slower than its peers ({compute:.3g} s vs {peer_c:.3g} s per step)"
    where = f"{o.node}" + (f" GPU {o.gpu}" if o.gpu is not None else "") + (f", pp {o.pp}" if o.pp is not None else "")
    because = f", likely because {'; '.join(explanations)}" if explanations and cause != "dataloader" or len(explanations) > 1 else ""
    cost = f"; without it the job would step about {speedup * 100:.0f} % faster" if speedup else ""
    summary = f"Rank {o.rank} of run {o.run} ({where}) is a straggler: {what}{because}{cost}."
    return summary, ev, severity
