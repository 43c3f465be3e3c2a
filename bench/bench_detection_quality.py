"""Detection quality of the detector core on the labelled scenario suite (issue 4, benchmark 1).

Each scenario of ``rankwatch.sim.scenario.suite`` is simulated, turned into detector
Snapshots directly (the fast path: same counters the replay file holds, differenced exactly
over each window instead of through PromQL) and evaluated every ``interval_s`` by
``DetectorCore``. Firing events are matched to the labelled faults:

* a firing event is a true positive when its kind is one the fault should cause and it names
  the fault's target (rank / node+GPU / node / run) between onset and end + grace;
* a throughput_drop while a labelled fault is active is a consequence (the job did slow):
  neither true nor false;
* every other firing event is a false alarm (all events on healthy and spike scenarios).

Prints precision / recall / F1 per fault kind, the onset-to-firing delay in evaluation
intervals, and false alarms on the healthy scenarios.

    .venv/bin/python bench/bench_detection_quality.py [--scale small|full] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwatch.detectors.config import DetectorConfig  # noqa: E402
from rankwatch.detectors.core import DetectorCore  # noqa: E402
from rankwatch.events import Event  # noqa: E402
from rankwatch.sim.scenario import Scenario, simulate, snapshots, suite  # noqa: E402

GRACE_S = 120.0


def family(name: str) -> str:
    """Scenario family = the fault kind reported on (slowdown split by magnitude)."""
    head = name.split("-")[0]
    if head.startswith("slowdown") and "nolayout" in name:
        return head + "-nolayout"
    if head == "healthy" and "nolayout" in name:
        return "healthy-nolayout"
    return head


def matches(ev: Event, label: dict) -> bool:
    if ev.kind not in label["expect"]:
        return False
    if not (label["start"] <= ev.time <= (label["end"] or float("inf")) + GRACE_S):
        return False
    if ev.kind == "straggler":
        return ev.run == label["run"] and ev.rank == label["rank"]
    if ev.kind == "gpu_fault":
        return ev.node == label["node"] and (ev.gpu is None or ev.gpu == label["gpu"])
    if ev.kind == "network":
        return ev.node == label["node"]
    return ev.run == label["run"]


def run_scenario(sc: Scenario, cfg: DetectorConfig) -> dict:
    tel = simulate(sc)
    core = DetectorCore(cfg)
    events: list[Event] = []
    for snap in snapshots(tel, cfg.interval_s, cfg.window_s):
        events += core.evaluate(snap)
    truth = sc.ground_truth()["faults"]
    firing = [e for e in events if e.state == "firing"]
    tp, fp, consequence = 0, 0, 0
    detected: dict[int, float] = {}
    for ev in firing:
        hit = [i for i, lb in enumerate(truth) if matches(ev, lb)]
        if hit:
            tp += 1
            for i in hit:
                detected.setdefault(i, ev.time - truth[i]["start"])
        elif ev.kind == "throughput_drop" and any(
                lb["start"] <= ev.time <= (lb["end"] or float("inf")) + GRACE_S and lb["expect"] for lb in truth):
            consequence += 1
        else:
            fp += 1
    expected = [i for i, lb in enumerate(truth) if lb["expect"]]
    return {"scenario": sc.name, "family": family(sc.name), "tp": tp, "fp": fp, "consequence": consequence,
            "faults": len(expected), "detected": sum(1 for i in expected if i in detected),
            "delays": [detected[i] / cfg.interval_s for i in expected if i in detected],
            "false_alarms": [f"{e.kind} rank={e.rank} node={e.node} gpu={e.gpu} t={e.time - sc.start_time:.0f}"
                             for e in firing if not any(matches(e, lb) for lb in truth)
                             and not (e.kind == "throughput_drop" and any(lb["expect"] for lb in truth))],
            "resolved": sum(1 for e in events if e.state == "resolved"), "firing": len(firing)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["small", "full"], default="full")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write per-scenario results here")
    args = ap.parse_args(argv)
    cfg = DetectorConfig()
    t0 = time.perf_counter()
    results = [run_scenario(sc, cfg) for sc in suite(args.scale, args.seeds)]
    wall = time.perf_counter() - t0
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        fams[r["family"]].append(r)
    print(f"path: simulator -> Snapshot (direct), interval {cfg.interval_s:g} s, window {cfg.window_s:g} s; "
          f"{len(results)} scenarios in {wall:.1f} s")
    print(f"{'family':22} {'scen':>4} {'faults':>6} {'recall':>6} {'prec':>6} {'F1':>6} {'FP':>4} "
          f"{'delay med':>9} {'delay max':>9}")
    all_delays = []
    for fam in sorted(fams):
        rs = fams[fam]
        faults = sum(r["faults"] for r in rs)
        det = sum(r["detected"] for r in rs)
        tp = sum(r["tp"] for r in rs)
        fp = sum(r["fp"] for r in rs)
        delays = [d for r in rs for d in r["delays"]]
        all_delays += delays
        recall = det / faults if faults else float("nan")
        prec = tp / (tp + fp) if tp + fp else (1.0 if faults else float("nan"))
        f1 = 2 * prec * recall / (prec + recall) if faults and prec + recall else float("nan")
        med = f"{statistics.median(delays):.1f}" if delays else "-"
        mx = f"{max(delays):.1f}" if delays else "-"
        print(f"{fam:22} {len(rs):4d} {faults:6d} {recall:6.2f} {prec:6.2f} {f1:6.2f} {fp:4d} {med:>9} {mx:>9}")
    healthy_fp = sum(r["fp"] for r in results if r["family"] in ("healthy", "healthy-nolayout", "spike"))
    print(f"false alarms on healthy + spike scenarios: {healthy_fp}")
    if all_delays:
        print(f"median onset-to-firing delay over all detected faults: {statistics.median(all_delays):.1f} intervals")
    for r in results:
        if r["false_alarms"] or r["detected"] < r["faults"]:
            print(f"  {r['scenario']}: detected {r['detected']}/{r['faults']}, false alarms {r['false_alarms']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
