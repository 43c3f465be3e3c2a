"""Detection quality of the detector core: how fast each fault is found and how often it cries
wolf (issue 4 benchmark 1, issue 10 items 3 and 4).

Path: ``rankwatch.sim`` job -> detector ``Snapshot``s built directly from the simulated counters
at each scrape (the counters a replay file holds, differenced exactly over each window instead
of through PromQL) -> ``DetectorCore``. A 15 s scrape gives one 15 s window of new data per
15 s evaluation, which is what the snapshots hold here (interval = window = 15 s).

Parts (``all`` runs the first three):

* ``curve``: delay from onset to the straggler event against the size of the slowdown, 256
  ranks (tp 8 x pp 4 x dp 8 on 32 nodes), 15 s scrape, all benign noise on, onsets at random
  offsets (never on the evaluation grid), for two noise levels: the simulator's (~1 % per
  window) and one like the real ByteDance SE trace (~9 % per 15 s window: 7.5 s steps with
  12 % sequence-length imbalance per step). The sequential test (the default) and today's rule
  (3 consecutive flagged windows, plus the EWMA slow signal it used) run on the same
  snapshots in the same process. Prints a table; ``--png`` plots it.
* ``hardware``: onset-to-event delay of XID 79, double-bit ECC, EFA degradation and a hang at
  random offsets, against their targets (one node scrape; two node scrapes; ``hang_min_s`` plus
  one scrape). The live detector adds its query delay (``--query-delay``, 2 s) to each.
* ``false-alarms``: hours of healthy and benign-noise jobs at 256 ranks (healthy with and
  without layout labels, heavy GC, strong sequence-length imbalance, +50 % spikes of 15 s once
  a minute on one rank); every event is a false alarm. Reports false alarms per rank-hour with
  the upper 95 % Poisson bound, for both rules.
* ``suite``: the labelled scenario suite of issue 4 (precision / recall / F1 per fault kind).

    .venv/bin/python bench/bench_detection_quality.py all --png docs/detector-delay-curve.png
    .venv/bin/python bench/bench_detection_quality.py curve --onsets 12
    .venv/bin/python bench/bench_detection_quality.py false-alarms --hours 24
    .venv/bin/python bench/bench_detection_quality.py suite [--scale small|full] [--seeds N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import FixedPersistence  # noqa: E402

from rankwatch.detectors.config import DetectorConfig  # noqa: E402
from rankwatch.detectors.core import DetectorCore  # noqa: E402
from rankwatch.events import Event  # noqa: E402
from rankwatch.sim.scenario import Scenario, simulate, snapshots, suite  # noqa: E402
from rankwatch.sim.training import Fault, Layout, Noise  # noqa: E402

GRACE_S = 120.0
SCRAPE_S = 15.0
LAYOUT = Layout(tp=8, pp=4, dp=8)
NODES = 32
# name -> (noise, nominal step seconds)
PROFILES: dict[str, tuple[Noise, float]] = {
    "sim": (Noise(), 1.0),
    "SE-like": (Noise(seq_imbalance=0.12), 7.5),
}
SLOWDOWNS = (5, 10, 20, 30, 50)
TARGETS_S = {50: 30.0, 20: 60.0, 10: 180.0, 5: 600.0}  # median onset -> event (5 %: found within)


# ---- helpers --------------------------------------------------------------------------------------

def config() -> DetectorConfig:
    """The shipped defaults, with the window of a 15 s scrape written out (this path builds
    the snapshots itself, so it must say which window they hold)."""
    return dataclasses.replace(DetectorConfig(), interval_s=SCRAPE_S, window_s=SCRAPE_S)


def feed(sc: Scenario, cores: dict[str, DetectorCore]) -> dict[str, list[Event]]:
    """Simulate ``sc`` once and feed every snapshot to every core."""
    tel = simulate(sc)
    out: dict[str, list[Event]] = {name: [] for name in cores}
    cfg = next(iter(cores.values())).config
    for snap in snapshots(tel, cfg.interval_s, cfg.window_s):
        for name, core in cores.items():
            out[name] += core.evaluate(snap)
    return out


def both_rules() -> dict[str, DetectorCore]:
    cfg = config()
    return {"sequential": DetectorCore(cfg), "fixed-3": DetectorCore(cfg, FixedPersistence())}


def job(name: str, profile: str, seed: int, duration: float, faults: Iterable[Fault] = (), **kw: object) -> Scenario:
    noise, step = PROFILES[profile]
    return Scenario(name, layout=LAYOUT, nodes=NODES, base_step_s=step, duration_s=duration, seed=seed,
                    noise=kw.pop("noise", noise), faults=list(faults), scrape_s=SCRAPE_S, **kw)  # type: ignore[arg-type]


def fmt_s(v: float | None) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.0f}"


def poisson_upper95(k: int) -> float:
    """Upper 95 % bound of a Poisson mean after ``k`` events (exact, one-sided)."""
    return float(sps.chi2.ppf(0.95, 2 * (k + 1)) / 2)


def load_note() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


# ---- part: delay against slowdown ----------------------------------------------------------------

def curve(onsets: int, profiles: list[str], after_s: float) -> dict:
    """Median / p90 / max delay and recall per slowdown, rule and noise profile."""
    results: dict = {}
    rng = np.random.default_rng(2024)
    for profile in profiles:
        for pct in SLOWDOWNS:
            for i in range(onsets):
                onset = float(240.0 + rng.uniform(0.0, 60.0))
                rank = int(rng.integers(0, LAYOUT.world))
                sc = job(f"slow{pct}", profile, seed=10_000 + 97 * pct + i, duration=onset + after_s,
                         faults=[Fault("slowdown", rank=rank, start_s=onset, magnitude=pct / 100)])
                events = feed(sc, both_rules())
                for rule, evs in events.items():
                    r = results.setdefault(profile, {}).setdefault(rule, {}).setdefault(
                        pct, {"delays": [], "false_alarms": 0, "cases": 0})
                    r["cases"] += 1
                    fired = [e for e in evs if e.state == "firing"]
                    hit = [e.time - sc.start_time - onset for e in fired if e.kind == "straggler" and e.rank == rank]
                    if hit:
                        r["delays"].append(min(hit))
                    r["false_alarms"] += sum(1 for e in fired if e.kind == "straggler" and e.rank != rank)
    return results


def print_curve(results: dict, after_s: float) -> None:
    print(f"delay onset -> straggler event (s), 256 ranks, {SCRAPE_S:g} s scrape and windows, onsets at random "
          f"offsets; '-' = not found within {after_s:.0f} s")
    for profile, rules in results.items():
        print(f"\nnoise: {profile}")
        head = " | ".join(f"{rule + ' median/p90/max':>28} {'found':>6}" for rule in rules)
        print(f"{'slowdown':>8} | {head} | target")
        for pct in SLOWDOWNS:
            cells = []
            for rule in rules:
                r = rules[rule][pct]
                d = r["delays"]
                stats = (f"{fmt_s(statistics.median(d))} / {fmt_s(float(np.percentile(d, 90)))} / {fmt_s(max(d))}"
                         if d else "- / - / -")
                cells.append(f"{stats:>28} {len(d):>2}/{r['cases']:<3}")
            target = TARGETS_S.get(pct)
            tgt = "" if target is None else (f"found <= {target:.0f} s" if pct == 5 else f"median <= {target:.0f} s")
            print(f"{pct:>7}% | " + " | ".join(cells) + f" | {tgt}")
        fa = {rule: sum(r["false_alarms"] for r in v.values()) for rule, v in rules.items()}
        print("straggler events on other ranks during these runs: " + ", ".join(f"{k} {v}" for k, v in fa.items()))


def plot_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"sequential": "-", "fixed-3": "--"}
    colors = {"sim": "tab:blue", "SE-like": "tab:red"}
    for profile, rules in results.items():
        for rule, per in rules.items():
            xs, med, lo, hi = [], [], [], []
            for pct in SLOWDOWNS:
                d = per[pct]["delays"]
                if len(d) * 2 < per[pct]["cases"]:
                    continue  # median undefined: under half found
                xs.append(pct)
                med.append(statistics.median(d))
                lo.append(min(d))
                hi.append(float(np.percentile(d, 90)))
            if not xs:
                continue
            med_a = np.array(med)
            ax.errorbar(xs, med_a, yerr=[med_a - np.array(lo), np.array(hi) - med_a], fmt="o" + styles.get(rule, ":"),
                        color=colors.get(profile), capsize=3, label=f"{rule}, noise {profile}")
    for pct, t in TARGETS_S.items():
        ax.plot([pct], [t], marker="_", markersize=18, color="black")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(SLOWDOWNS))
    ax.set_xticklabels([f"{p} %" for p in SLOWDOWNS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("slowdown of one rank")
    ax.set_ylabel("onset -> event (s): median, min to p90")
    ax.set_title("Straggler delay vs. size, 256 ranks, 15 s scrape (black: targets)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- part: hardware and hangs ---------------------------------------------------------------------

HARDWARE = {
    # fault kind -> (event kinds that find it, target in seconds of data time, target text)
    "xid79": (("gpu_fault",), SCRAPE_S, "one node scrape"),
    "dbe": (("gpu_fault",), SCRAPE_S, "one node scrape"),
    "efa": (("network",), 2 * SCRAPE_S, "two node scrapes"),
    "hang": (("hang",), DetectorConfig().hang_min_s + SCRAPE_S, "hang_min_s + one scrape"),
}


def hardware(onsets: int) -> dict:
    rng = np.random.default_rng(77)
    out: dict = {}
    for kind, (expect, _, _) in HARDWARE.items():
        delays, missed, other = [], 0, 0
        for i in range(onsets):
            onset = float(240.0 + rng.uniform(0.0, 60.0))
            node, gpu = int(rng.integers(0, NODES)), int(rng.integers(0, 8))
            f = {"xid79": Fault("xid79", node=node, gpu=gpu, start_s=onset),
                 "dbe": Fault("dbe", node=node, gpu=gpu, start_s=onset, end_s=onset + 120, magnitude=2),
                 "efa": Fault("efa", node=node, start_s=onset, end_s=onset + 300, magnitude=0.3),
                 "hang": Fault("hang", start_s=onset, end_s=onset + 300)}[kind]
            sc = job(kind, "sim", seed=20_000 + i, duration=onset + 240, faults=[f])
            evs = feed(sc, {"sequential": DetectorCore(config())})["sequential"]
            hits = [e.time - sc.start_time - onset for e in evs if e.state == "firing" and e.kind in expect]
            if hits:
                delays.append(min(hits))
            else:
                missed += 1
            other += sum(1 for e in evs if e.state == "firing" and e.kind not in expect + ("straggler", "throughput_drop"))
        out[kind] = {"delays": delays, "missed": missed, "other_events": other}
    return out


def print_hardware(res: dict, query_delay: float) -> None:
    print(f"\nhardware faults and hangs (256 ranks, {SCRAPE_S:g} s node and probe scrapes, onsets at random offsets); "
          f"delay in data time, the live detector adds its query delay ({query_delay:g} s)")
    print(f"{'fault':>6} {'found':>6} {'median':>7} {'max':>5}  target")
    for kind, r in res.items():
        d = r["delays"]
        _, target, text = HARDWARE[kind]
        ok = bool(d) and max(d) <= target and not r["missed"]
        print(f"{kind:>6} {len(d):>2}/{len(d) + r['missed']:<3} {fmt_s(statistics.median(d) if d else None):>7} "
              f"{fmt_s(max(d) if d else None):>5}  <= {target:.0f} s ({text}): {'met' if ok else 'NOT met'}")


# ---- part: false alarms ---------------------------------------------------------------------------

def benign_jobs(hours: float, profile: str) -> list[Scenario]:
    """One-hour jobs cycling through the benign kinds until ``hours`` of data."""
    noise, _ = PROFILES[profile]
    kinds = ["healthy", "healthy-nolayout", "gc-heavy", "seq-imbalance", "spikes"]
    rng = np.random.default_rng(31)
    out = []
    for i in range(int(np.ceil(hours))):
        kind = kinds[i % len(kinds)]
        seed = 30_000 + i
        kw: dict = {}
        faults: list[Fault] = []
        if kind == "healthy-nolayout":
            kw["pp_labels"] = False
        elif kind == "gc-heavy":
            kw["noise"] = dataclasses.replace(noise, gc_prob=0.05, gc_pause=0.3)
        elif kind == "seq-imbalance":
            kw["noise"] = dataclasses.replace(noise, seq_imbalance=noise.seq_imbalance * 5 / 3)
        elif kind == "spikes":
            # +50 % for 15 s (one step where steps are longer) once a minute, five times, every
            # 15 min, on one rank, at random offsets. A step that starts inside the spike is slow
            # as a whole, so with 7.5 s steps a 15 s spike would slow up to 22.5 s.
            rank = int(rng.integers(0, LAYOUT.world))
            length = 15.0 if PROFILES[profile][1] < 5 else 0.9 * PROFILES[profile][1]
            for burst in range(4):
                t0 = 300.0 + 900.0 * burst + float(rng.uniform(0, 15))
                faults += [Fault("spike", rank=rank, start_s=t0 + 60 * k, end_s=t0 + 60 * k + length, magnitude=0.5)
                           for k in range(5)]
        out.append(job(f"{kind}-{i}", profile, seed, 3600.0, faults, **kw))
    return out


def false_alarms(hours: float, profile: str) -> dict:
    res = {"sequential": [], "fixed-3": []}
    rank_hours = 0.0
    cfg = config()
    for sc in benign_jobs(hours, profile):
        events = feed(sc, both_rules())
        rank_hours += LAYOUT.world * (sc.duration_s - cfg.warmup_s) / 3600.0
        for rule, evs in events.items():
            res[rule] += [f"{sc.name}: {e.kind} rank={e.rank} node={e.node} gpu={e.gpu} t={e.time - sc.start_time:.0f}"
                          for e in evs if e.state == "firing"]
    return {"rank_hours": rank_hours, "hours": hours, "alarms": res}


def print_false_alarms(res: dict, profile: str) -> None:
    rh = res["rank_hours"]
    print(f"\nfalse alarms, noise {profile}: {res['hours']:g} simulated hours of benign jobs at 256 ranks "
          f"= {rh:.0f} rank-hours after warm-up (every event of any kind counts)")
    for rule, alarms in res["alarms"].items():
        k = len(alarms)
        print(f"  {rule:>10}: {k} false alarms = {k / rh:.2e} per rank-hour (upper 95 %: {poisson_upper95(k) / rh:.2e})")
        for a in alarms[:8]:
            print(f"      {a}")


# ---- part: the labelled suite (issue 4) --------------------------------------------------------

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
    core = DetectorCore(cfg)
    events = feed(sc, {"core": core})["core"]
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


def run_suite(scale: str, seeds: int, json_out: Path | None) -> None:
    cfg = DetectorConfig()
    t0 = time.perf_counter()
    results = [run_scenario(sc, cfg) for sc in suite(scale, seeds)]
    wall = time.perf_counter() - t0
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        fams[r["family"]].append(r)
    print(f"suite: simulator -> Snapshot (direct), interval {cfg.interval_s:g} s, window {cfg.window_s:g} s, "
          f"scrape 5 s; {len(results)} scenarios in {wall:.1f} s")
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
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", default="all", choices=["all", "curve", "hardware", "false-alarms", "suite"],
                    help="what to measure (default: all = curve, hardware, false-alarms)")
    ap.add_argument("--onsets", type=int, default=12, help="random onsets per slowdown and noise level (default: 12)")
    ap.add_argument("--after", type=float, default=660.0,
                    help="seconds simulated after each onset (default: 660)")
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help=f"noise levels, comma-separated (default: {','.join(PROFILES)})")
    ap.add_argument("--hours", type=float, default=24.0,
                    help="simulated hours of benign jobs at the simulator's noise (default: 24)")
    ap.add_argument("--real-hours", type=float, default=10.0,
                    help="simulated hours of benign jobs at the SE-like noise (default: 10)")
    ap.add_argument("--query-delay", type=float, default=2.0, help="live query delay to state (default: 2)")
    ap.add_argument("--png", type=Path, help="write the delay curve here")
    ap.add_argument("--scale", choices=["small", "full"], default="full", help="suite size (default: full)")
    ap.add_argument("--seeds", type=int, default=2, help="suite seeds (default: 2)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    for p in profiles:
        if p not in PROFILES:
            ap.error(f"--profiles: unknown noise level {p!r} (known: {', '.join(PROFILES)})")
    print(f"machine: {os.cpu_count()} CPUs, {load_note()} at start")
    out: dict = {}
    t0 = time.perf_counter()
    if args.part == "suite":
        run_suite(args.scale, args.seeds, args.json)
        return 0
    if args.part in ("all", "curve"):
        out["curve"] = curve(args.onsets, profiles, args.after)
        print_curve(out["curve"], args.after)
        if args.png:
            plot_curve(out["curve"], args.png)
            print(f"wrote {args.png}")
    if args.part in ("all", "hardware"):
        out["hardware"] = hardware(max(4, args.onsets // 2))
        print_hardware(out["hardware"], args.query_delay)
    if args.part in ("all", "false-alarms"):
        out["false_alarms"] = {}
        for profile, hours in (("sim", args.hours), ("SE-like", args.real_hours)):
            if profile in profiles and hours > 0:
                out["false_alarms"][profile] = false_alarms(hours, profile)
                print_false_alarms(out["false_alarms"][profile], profile)
    print(f"\n{time.perf_counter() - t0:.0f} s wall; {load_note()} at the end")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
