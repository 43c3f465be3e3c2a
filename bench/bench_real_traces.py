"""Real traces (issue 4, benchmark 2): the ByteDance StragglerAnalysis traces through the
detector core, against two baselines written here.

Each trace's per-rank, per-step operations become what the probe would report: compute =
forward-compute + backward-compute (+ gc and optimizer as their own compute sections), comm =
every send/recv/collective. Consecutive steps are grouped into evaluation windows of about
15 s (at least 8 windows per trace), and one ``Snapshot`` per window (per-step means, pp
stage from the trace) is fed to ``DetectorCore`` (path: trace -> Snapshot directly, no PromQL).

Ground truth: AR must flag rank 0 and nothing else; SE and ST must flag nothing. Then one
rank of SE and ST is slowed by 5/10/20/50 % (its forward, backward and optimizer times
scaled, as a slow GPU would; its peers' comm wait grows by the same amount, as synchronous
collectives make them wait).

Baselines, on the same windows, without persistence (as they are published):
* NVRx relative rule: score = fastest rank's median compute / this rank's median < 0.75
  (``nvrx``: fastest of all ranks, as NVRx does; ``nvrx_stage``: fastest of the same pp stage);
* global modified z-score (median/MAD over all ranks) > 3.5.

    .venv/bin/python bench/bench_real_traces.py [--data ../shared/data/bytedance-straggler-analysis]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankwatch.detectors.config import DetectorConfig  # noqa: E402
from rankwatch.detectors.core import DetectorCore  # noqa: E402
from rankwatch.detectors.model import RankObs, Snapshot  # noqa: E402
from rankwatch.detectors.stats import modified_z  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bytedance-straggler-analysis"
COMPUTE = {"forward-compute": "forward", "backward-compute": "backward", "optimizer": "optimizer",
           "optimizer-clip-main-grad": "optimizer", "gc": "gc"}
INJECT_RANK = {"SE": 20, "ST": 5}
MINDER_F1 = 0.893
T0 = 1_750_000_000.0


@dataclasses.dataclass
class Trace:
    name: str
    ranks: list[int]
    stage: dict[int, int]
    dp: dict[int, int]
    steps: list[int]
    span: np.ndarray  # (steps,) wall time of each step
    sections: dict[str, np.ndarray]  # name -> (steps, ranks) seconds


def load(data: Path, name: str) -> Trace:
    import pyarrow.parquet as pq

    path = data / f"trace-{name}.parquet"
    if not path.exists():
        raise SystemExit(f"bench_real_traces: {path} not found (pass --data)")
    d = pq.read_table(path).to_pydict()
    ranks = sorted(set(d["rank"]))
    steps = sorted(set(d["step"]))
    ri = {r: i for i, r in enumerate(ranks)}
    si = {s: i for i, s in enumerate(steps)}
    secs: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((len(steps), len(ranks))))
    lo = np.full(len(steps), np.inf)
    hi = np.full(len(steps), -np.inf)
    stage, dp = {}, {}
    for s, r, op, st, du, stg, dpr in zip(d["step"], d["rank"], d["optype"], d["start_ts"], d["duration"],
                                          d["stage"], d["dp_rank"], strict=True):
        k, j = si[s], ri[r]
        secs[COMPUTE.get(op, "comm")][k, j] += du
        lo[k] = min(lo[k], st)
        hi[k] = max(hi[k], st + du)
        stage[r], dp[r] = int(stg), int(dpr)
    return Trace(name, ranks, stage, dp, steps, hi - lo, dict(secs))


def inject(tr: Trace, rank: int, pct: float) -> Trace:
    """Slow one rank's GPU work (forward, backward, optimizer) by ``pct``, as a slow GPU would;
    synchronous peers wait that much longer in comm."""
    j = tr.ranks.index(rank)
    secs = {k: v.copy() for k, v in tr.sections.items()}
    gpu_work = ("forward", "backward", "optimizer")
    extra = sum(secs[k][:, j] for k in gpu_work) * pct
    for k in gpu_work:
        secs[k][:, j] *= 1 + pct
    others = np.ones(len(tr.ranks), bool)
    others[j] = False
    secs["comm"][:, others] += extra[:, None]
    return dataclasses.replace(tr, sections=secs, span=tr.span + extra)


def windows(tr: Trace) -> tuple[int, list[slice]]:
    per = max(1, min(int(round(15.0 / float(np.median(tr.span)))), len(tr.steps) // 8))
    n = len(tr.steps) // per
    return per, [slice(i * per, (i + 1) * per) for i in range(n)]


def snapshots(tr: Trace) -> tuple[list[Snapshot], list[np.ndarray], float]:
    per, wins = windows(tr)
    win_s = float(np.median(tr.span)) * per
    snaps, computes = [], []
    t = T0
    for w in wins:
        t += win_s
        span = float(tr.span[w].mean())
        ranks = []
        for j, r in enumerate(tr.ranks):
            sections = {k: float(v[w, j].mean()) for k, v in tr.sections.items()}
            ranks.append(RankObs(run=tr.name, rank=r, node=f"node-{r // 8:02d}", gpu=str(r % 8), pp=tr.stage[r],
                                 dp=tr.dp[r], up=True, steps_rate=per / win_s, step_seconds=span, sections=sections,
                                 step=float(w.stop), last_step_time=t))
        snaps.append(Snapshot(time=t, window_s=win_s, ranks=ranks))
        computes.append(np.median(tr.sections["forward"][w] + tr.sections["backward"][w], axis=0))
    return snaps, computes, win_s


def detect(tr: Trace) -> dict:
    snaps, computes, win_s = snapshots(tr)
    cfg = dataclasses.replace(DetectorConfig(), interval_s=win_s, window_s=win_s, warmup_s=0.0)
    core = DetectorCore(cfg)
    fired: set[int] = set()
    other_events = 0
    for s in snaps:
        for e in core.evaluate(s):
            if e.kind == "straggler" and e.state == "firing":
                fired.add(e.rank)
            elif e.state == "firing":
                other_events += 1
    nvrx: set[int] = set()
    nvrx_stage: set[int] = set()
    gz: set[int] = set()
    stage = np.array([tr.stage[r] for r in tr.ranks])
    for med in computes:
        score = med.min() / med
        nvrx |= {tr.ranks[j] for j in np.flatnonzero(score < 0.75)}
        for s in np.unique(stage):
            sel = np.flatnonzero(stage == s)
            nvrx_stage |= {tr.ranks[j] for j in sel[med[sel].min() / med[sel] < 0.75]}
        gz |= {tr.ranks[j] for j in np.flatnonzero(modified_z(med) > 3.5)}
    return {"detector": fired, "nvrx": nvrx, "nvrx_stage": nvrx_stage, "global_z": gz, "windows": len(snaps),
            "other_events": other_events}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory with trace-{AR,SE,ST}.parquet")
    args = ap.parse_args(argv)
    traces = {n: load(args.data, n) for n in ("AR", "SE", "ST")}
    cases = [("AR", 0, traces["AR"], {0})]
    for n in ("SE", "ST"):
        cases.append((n, 0, traces[n], set()))
        for pct in (5, 10, 20, 50):
            cases.append((n, pct, inject(traces[n], INJECT_RANK[n], pct / 100), {INJECT_RANK[n]}))
    methods = ("detector", "nvrx", "nvrx_stage", "global_z")
    tally = {m: {"tp": 0, "fp": 0, "fn": 0} for m in methods}
    smallest: dict[tuple[str, str], int | None] = {}
    print("path: trace -> per-rank per-step sections -> Snapshot (direct); detector = DetectorCore defaults "
          "(persistence 3, peers = same pp stage)")
    print(f"{'case':10} {'win':>3} {'expect':>7} | " + " | ".join(f"{m:>20}" for m in methods))
    for name, pct, tr, truth in cases:
        res = detect(tr)
        row = []
        for m in methods:
            got = res[m]
            tp, fp = len(got & truth), len(got - truth)
            fn = len(truth - got)
            tally[m]["tp"] += tp
            tally[m]["fp"] += fp
            tally[m]["fn"] += fn
            ok = got == truth
            shown = sorted(got)[:3]
            more = f" +{len(got) - 3}" if len(got) > 3 else ""
            row.append(f"{'OK ' if ok else 'BAD'} {shown}{more}".rjust(20))
            if pct and name in ("SE", "ST"):
                key = (name, m)
                if ok and (smallest.get(key) is None or pct < smallest[key]):
                    smallest[key] = pct
                smallest.setdefault(key, None)
        label = f"{name}" + (f"+{pct}%" if pct else "")
        print(f"{label:10} {res['windows']:3d} {sorted(truth)!s:>7} | " + " | ".join(row))
    print()
    print(f"{'method':11} {'prec':>6} {'recall':>6} {'F1':>6}   smallest injected slowdown found with no false alarm (SE / ST)")
    for m in methods:
        t = tally[m]
        prec = t["tp"] / (t["tp"] + t["fp"]) if t["tp"] + t["fp"] else 0.0
        rec = t["tp"] / (t["tp"] + t["fn"]) if t["tp"] + t["fn"] else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        se, st = smallest.get(("SE", m)), smallest.get(("ST", m))
        print(f"{m:11} {prec:6.3f} {rec:6.3f} {f1:6.3f}   SE {se if se else '-'} % / ST {st if st else '-'} %")
    print(f"bar: Minder F1 {MINDER_F1} (published, on ByteDance production faults; not the same data)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
