"""The detector's state save at a large job's state size: this tree's ``DetectorState`` (the core
state in parts, a cycle writes only the parts whose text changed) against the one of git
revision REF (default ``main``: the whole state as one JSON text), alternating, in turn first
and second, on the same real core state.

The state comes from a detector state database (``rankwatch detector --state FILE``, or the one
``bench/bench_scale_cycle.py --keep-state DIR`` keeps per size and store). Two cases bound what
a cycle costs: nothing but the evaluated time changed (the best case for the parts store) and
every part's text changed (its worst case: all of it written, as the one-text store does).

    .venv/bin/python bench/bench_state_save.py --state FILE [--ref main] [--saves 12]
"""

from __future__ import annotations

import argparse
import copy
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def touched(state: dict[str, Any], k: int) -> dict[str, Any]:
    """``state`` with every part's text changed (each entry of a table of tables gets a key)."""
    s = copy.deepcopy(state)
    for key, v in s.items():
        if isinstance(v, dict) and v:
            for sub in v:
                v[sub] = {**v[sub], "_cycle": k} if isinstance(v[sub], dict) else [k, v[sub]]
        else:
            s[key] = [k, v]
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", required=True, type=Path, help="a detector state database (schema 2)")
    ap.add_argument("--ref", default="main", help="git revision whose DetectorState is the baseline (default: main)")
    ap.add_argument("--saves", type=int, default=12, help="saves per store and case, the first 2 untimed (default: 12)")
    args = ap.parse_args(argv)
    if not args.state.is_file():
        print(f"--state {args.state}: no such file", file=sys.stderr)
        return 2

    from bench_live_cycle import state_module_at

    from rankwatch.detectors.state import DetectorState, join_state

    db = sqlite3.connect(f"file:{args.state}?mode=ro", uri=True)
    parts = dict(db.execute("SELECT name, body FROM core_parts").fetchall())
    db.close()
    state = join_state(parts)
    print(f"state: {args.state} — {len(parts)} parts, {sum(map(len, parts.values())) / 1e6:.2f} MB of JSON")
    old_cls = state_module_at(args.ref).DetectorState
    with tempfile.TemporaryDirectory(prefix="bench-state-save-") as tmp:
        stores = {"parts (this tree)": DetectorState(Path(tmp) / "new.sqlite"),
                  f"one text ({args.ref})": old_cls(Path(tmp) / "old.sqlite")}
        rows = []
        for case in ("only the time changed", "every part changed"):
            took: dict[str, list[float]] = {name: [] for name in stores}
            for k in range(args.saves):
                s = touched(state, k) if case == "every part changed" else state
                order = list(stores.items())
                if k % 2:  # in turn first and second
                    order.reverse()
                for name, st in order:
                    t0 = time.perf_counter()
                    st.save(1000.0 + k, s, [])
                    took[name].append(time.perf_counter() - t0)
            for name, xs in took.items():
                rows.append((case, name, xs[2:]))
        for st in stores.values():
            st.close()
    la = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for case, name, xs in rows:
        print(f"{case:<22} {name:<20} median {statistics.median(xs) * 1e3:7.1f} ms  max {max(xs) * 1e3:7.1f} ms")
    for case in ("only the time changed", "every part changed"):
        a, b = (statistics.median(xs) for c, _, xs in rows if c == case)
        print(f"{case}: parts/one text median {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
