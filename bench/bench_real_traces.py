"""Real traces (issue 4 benchmark 2, issue 10 item 4): the ByteDance StragglerAnalysis traces
through the detector core, against today's rule and two published baselines, all with the same
persistence.

Each trace's per-rank, per-step operations become what the probe would report: compute =
forward-compute + backward-compute (+ gc and optimizer as their own compute sections), comm =
every send/recv/collective. Consecutive steps are grouped into evaluation windows of about
15 s (at least 8 windows per trace), and one ``Snapshot`` per window (per-step means, pp
stage from the trace) is fed to ``DetectorCore`` (path: trace -> Snapshot directly, no PromQL).

Ground truth: AR must flag rank 0 and nothing else; SE and ST must flag nothing. Then one
rank of each trace is slowed by 5/10/20/30/50 % (its forward, backward and optimizer times
scaled, as a slow GPU would; its peers' comm wait grows by the same amount, as synchronous
collectives make them wait); in AR rank 0 stays the straggler it is.

Methods, on the same windows:
* ``detector``: the sequential test (defaults);
* ``fixed-3``: today's rule before it (3 consecutive flagged windows, EWMA slow signal);
* ``nvrx`` / ``nvrx_stage``: NVRx relative rule, fastest rank's median compute / this rank's
  < 0.75, over all ranks as NVRx does, or within the pp stage;
* ``global_z``: global modified z-score (median/MAD over all ranks) > 3.5.
Every baseline fires after the same 3 consecutive flagged windows as ``fixed-3`` (it is
published without persistence; without it, it would only do worse). Every event of any kind
the detector raises is reported; any event that is not the labelled straggler is a false alarm.

    .venv/bin/python bench/bench_real_traces.py [--data /path/to/bytedance-straggler-analysis]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import FixedPersistence  # noqa: E402

from rankwatch.detectors.config import DetectorConfig  # noqa: E402
from rankwatch.detectors.core import DetectorCore  # noqa: E402
from rankwatch.detectors.model import RankObs, Snapshot  # noqa: E402
from rankwatch.detectors.stats import MAD_NORMAL, modified_z  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "bytedance-straggler-analysis"
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


def data_dir(arg: Path | None) -> Path:
    """--data, else $RANKWATCH_TRACES, else ../shared/data/... next to the checkout (or to the
    worktree directory that holds it)."""
    if arg is not None:
        return arg
    env = os.environ.get("RANKWATCH_TRACES")
    if env:
        return Path(env)
    for up in (1, 2, 3):
        cand = REPO.parents[up - 1] / "shared" / "data" / "bytedance-straggler-analysis"
        if cand.is_dir():
            return cand
    return DEFAULT_DATA


def inject_rank(tr: Trace) -> int:
    """The rank to slow: a fixed one, or for AR the last rank of the stage after rank 0's."""
    if tr.name in INJECT_RANK:
        return INJECT_RANK[tr.name]
    stage = (tr.stage[tr.ranks[0]] + 1) % (max(tr.stage.values()) + 1)
    return max(r for r in tr.ranks if tr.stage[r] == stage)


def spread(tr: Trace, per: int) -> tuple[float, float]:
    """Per-step and per-window spread (MAD sigma) of each rank's relative compute excess over
    its pp stage's median: the noise the detector works against."""
    c = tr.sections["forward"] + tr.sections["backward"]
    stage = np.array([tr.stage[r] for r in tr.ranks])

    def rel(x: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x)
        for st in np.unique(stage):
            sel = stage == st
            out[:, sel] = x[:, sel] / np.median(x[:, sel], axis=1, keepdims=True) - 1
        return out

    n = c.shape[0] // per
    windowed = c[: n * per].reshape(n, per, -1).mean(axis=1)
    mad = lambda x: float(np.median(np.abs(x - np.median(x))) * MAD_NORMAL)  # noqa: E731
    return mad(rel(c)), mad(rel(windowed))


def persisted(flags: list[set[int]], windows: int = 3) -> set[int]:
    """Ranks flagged in ``windows`` consecutive windows (the baselines' persistence)."""
    run: dict[int, int] = defaultdict(int)
    fired: set[int] = set()
    for f in flags:
        for r in list(run):
            if r not in f:
                run[r] = 0
        for r in f:
            run[r] += 1
            if run[r] >= windows:
                fired.add(r)
    return fired


def detect(tr: Trace) -> dict:
    snaps, computes, win_s = snapshots(tr)
    cfg = dataclasses.replace(DetectorConfig(), interval_s=win_s, window_s=win_s, warmup_s=0.0)
    cores = {"detector": DetectorCore(cfg), "fixed-3": DetectorCore(cfg, FixedPersistence())}
    out: dict = {"windows": len(snaps), "events": {}}
    for name, core in cores.items():
        events = [e for s in snaps for e in core.evaluate(s) if e.state == "firing"]
        out[name] = {e.rank for e in events if e.kind == "straggler"}
        out["events"][name] = [f"{e.kind} {'rank ' + str(e.rank) if e.kind == 'straggler' else (e.node or e.run)} "
                               f"at window {round((e.time - T0) / win_s)}" for e in events]
        out[name + ":other"] = [e for e in events if e.kind != "straggler"]
    stage = np.array([tr.stage[r] for r in tr.ranks])
    nvrx, nvrx_stage, gz = [], [], []
    for med in computes:
        nvrx.append({tr.ranks[j] for j in np.flatnonzero(med.min() / med < 0.75)})
        f: set[int] = set()
        for st in np.unique(stage):
            sel = np.flatnonzero(stage == st)
            f |= {tr.ranks[j] for j in sel[med[sel].min() / med[sel] < 0.75]}
        nvrx_stage.append(f)
        gz.append({tr.ranks[j] for j in np.flatnonzero(modified_z(med) > 3.5)})
    out |= {"nvrx": persisted(nvrx), "nvrx_stage": persisted(nvrx_stage), "global_z": persisted(gz)}
    return out


METHODS = ("detector", "fixed-3", "nvrx", "nvrx_stage", "global_z")
PCTS = (5, 10, 20, 30, 50)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="directory with trace-{AR,SE,ST}.parquet "
                    "(default: $RANKWATCH_TRACES, else shared/data/bytedance-straggler-analysis beside the checkout)")
    args = ap.parse_args(argv)
    data = data_dir(args.data)
    traces = {n: load(data, n) for n in ("AR", "SE", "ST")}
    cases = []
    for n, tr in traces.items():
        base = {0} if n == "AR" else set()
        cases.append((n, 0, tr, base))
        rank = inject_rank(tr)
        for pct in PCTS:
            cases.append((n, pct, inject(tr, rank, pct / 100), base | {rank}))
    tally = {m: {"tp": 0, "fp": 0, "fn": 0} for m in METHODS}
    smallest: dict[tuple[str, str], int | None] = {}
    print("path: trace -> per-rank per-step sections -> Snapshot (direct); detector = DetectorCore defaults "
          "(sequential test, peers = same pp stage); baselines fire after 3 consecutive flagged windows")
    for n, tr in traces.items():
        per, wins = windows(tr)
        step_sd, win_sd = spread(tr, per)
        print(f"  {n}: {len(tr.ranks)} ranks, {len(wins)} windows of {per} step(s) ({float(np.median(tr.span)) * per:.0f} s); "
              f"compute spread within a stage: {step_sd * 100:.1f} % per step, {win_sd * 100:.1f} % per window; "
              f"injected rank {inject_rank(tr)}")
    print(f"\n{'case':9} {'expect':>8} | " + " | ".join(f"{m:>16}" for m in METHODS))
    all_events = []
    for name, pct, tr, truth in cases:
        res = detect(tr)
        row = []
        for m in METHODS:
            got = res[m]
            other = len(res.get(m + ":other", []))
            tp, fp, fn = len(got & truth), len(got - truth) + other, len(truth - got)
            for k, v in (("tp", tp), ("fp", fp), ("fn", fn)):
                tally[m][k] += v
            ok = got == truth and not other
            shown = ",".join(str(r) for r in sorted(got)[:3]) + (f"+{len(got) - 3}" if len(got) > 3 else "")
            extra = f" +{other} ev" if other else ""
            row.append(f"{'ok ' if ok else 'BAD'} {{{shown}}}{extra}".rjust(16))
            if pct:
                key = (name, m)
                smallest.setdefault(key, None)
                if ok and (smallest[key] is None or pct < smallest[key]):
                    smallest[key] = pct
        label = name + (f"+{pct}%" if pct else "")
        print(f"{label:9} {str(sorted(truth)):>8} | " + " | ".join(row))
        all_events.append((label, res["events"]))
    print("\nevery event that fired (detector; today's rule):")
    for label, evs in all_events:
        print(f"  {label:9} detector: {'; '.join(evs['detector']) or '-'}")
        print(f"  {'':9} fixed-3:  {'; '.join(evs['fixed-3']) or '-'}")
    print()
    print(f"{'method':11} {'prec':>6} {'recall':>6} {'F1':>6}   smallest injected slowdown found with 0 false alarms "
          "(AR / SE / ST)")
    for m in METHODS:
        t = tally[m]
        prec = t["tp"] / (t["tp"] + t["fp"]) if t["tp"] + t["fp"] else 0.0
        rec = t["tp"] / (t["tp"] + t["fn"]) if t["tp"] + t["fn"] else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        sm = " / ".join(f"{smallest.get((n, m)) or '-'}{' %' if smallest.get((n, m)) else ''}" for n in traces)
        print(f"{m:11} {prec:6.3f} {rec:6.3f} {f1:6.3f}   {sm}")
    print(f"bar: Minder F1 {MINDER_F1} (published, on ByteDance production faults; not the same data)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
