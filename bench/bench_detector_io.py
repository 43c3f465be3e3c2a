"""The detector's query path, piece by piece: the figures behind its I/O design, each measured
against its alternative in the same run on the same data in a real Prometheus.

Replay (range queries; the 64-rank, 30-minute export of bench_replay.py):
* the responses' size, and decoding them with orjson against the standard library's json;
* gzip responses against none: Prometheus' CPU for the whole replay's range queries;
* converting the decoded points into series (the client's own code, fed the decoded bodies);
* the per-time joins (``build_snapshots``), with the cyclic GC paused (as shipped) and not,
  with a detector-sized heap in the process (``--heap-objects``);
* the replay cut into one chunk against smaller chunks prefetched while the core evaluates;
* PromQL aggregation in range mode: ``max by`` of the GPU gauges and the merged (tagged) EFA
  counters, against the plain selectors the replay sends.

Live (instant queries; the 256-rank job of bench_live_cycle.py):
* gzip responses against none, from a Prometheus on loopback: Prometheus' CPU per cycle;
* the 7 EFA counters merged into one tagged instant query against one query each: the
  detector's and Prometheus' CPU per cycle;
* the GPU gauges as plain selectors against ``max by (__name__, Hostname, gpu)``: response
  size, decoding time and Prometheus' CPU per request;
* a whole snapshot with the cyclic GC paused against not paused: the detector's CPU per cycle.

    .venv/bin/python bench/bench_detector_io.py [--only replay|live] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process, from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}), {os.cpu_count()} CPUs"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, pid: int | None = None
              ) -> dict[str, dict[str, list[float]]]:
    """Run each fn ``repeats`` times, rotating the order; wall, our CPU and ``pid``'s CPU."""
    out = {k: {"wall": [], "cpu": [], "prom": []} for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c, p = time.perf_counter(), time.process_time(), proc_cpu(pid)
            fns[name]()
            out[name]["wall"].append(time.perf_counter() - w)
            out[name]["cpu"].append(time.process_time() - c)
            out[name]["prom"].append(proc_cpu(pid) - p)
    return out


def ballast(n: int) -> list[Any]:
    """``n`` small container objects, tracked by the cyclic GC like a long-running detector's."""
    return [{"k": i} for i in range(n)]


def replay_part(args: argparse.Namespace) -> None:
    import orjson

    from rankwatch.detectors import source as source_mod
    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.core import DetectorCore
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.service import align_down, align_up
    from rankwatch.detectors.source import PromSource, build_snapshots
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    cfg = DetectorConfig(interval_s=15.0, window_s=30.0)
    sc = Scenario("io-bench", layout=Layout(tp=8, pp=4, dp=2), nodes=8, duration_s=1800.0, scrape_s=15.0,
                  faults=[Fault("slowdown", rank=37, start_s=600, end_s=1200, magnitude=0.2)])
    with tempfile.TemporaryDirectory(prefix="bench-io-") as tmp:
        om, _, samples = write_replay(sc, tmp)
        with ReplayDataset(om) as ds:
            pid = ds.prometheus.proc.pid if ds.prometheus else None
            start, end = align_up(ds.min_time, cfg.interval_s), align_down(ds.max_time, cfg.interval_s)
            step = cfg.interval_s
            times = [start + k * step for k in range(int((end - start) / step + 1e-9) + 1)]
            print(f"\nreplay: {sc.layout.world} ranks, 30 min, {samples} samples; {len(times)} evaluations; {load()}")
            client = PromClient(PromConnection(url=ds.url, timeout_s=120))
            src = PromSource(client, cfg.window_s, cfg.efa_error_counters)
            # raw bodies of every range query of the replay, as the client receives them
            bodies: dict[str, bytes] = {}
            for q in src.queries:
                r = requests.post(f"{ds.url}/api/v1/query_range", timeout=120, headers={"Accept-Encoding": "identity"},
                                  data={"query": q.expr, "start": f"{times[0]:.3f}", "end": f"{times[-1]:.3f}",
                                        "step": f"{step:g}"})
                r.raise_for_status()
                bodies[q.name] = r.content
            size = sum(len(b) for b in bodies.values())
            dec = alternate({"orjson": lambda: [orjson.loads(b) for b in bodies.values()],
                             "json": lambda: [json.loads(b) for b in bodies.values()]}, args.repeats)
            print(f"  responses: {len(bodies)} range queries, {size / 1e6:.1f} MB of JSON")
            print(f"  decoding them: orjson {med(dec['orjson']['cpu']):.3f} s CPU, stdlib json "
                  f"{med(dec['json']['cpu']):.3f} s (orjson/json {med(dec['orjson']['cpu']) / med(dec['json']['cpu']):.2f})")

            def fetch_all(gz: bool) -> Callable[[], None]:
                c = PromClient(PromConnection(url=ds.url, timeout_s=120, compress=gz))
                return lambda: [c.query_range(q.expr, times[0], times[-1], step) for q in src.queries]

            gzr = alternate({"gzip": fetch_all(True), "identity": fetch_all(False)}, args.repeats, pid)
            pg, pi = med(gzr["gzip"]["prom"]), med(gzr["identity"]["prom"])
            print(f"  Prometheus CPU for all range queries: gzip {pg:.2f} s, uncompressed {pi:.2f} s: compressing is "
                  f"{(pg - pi) / pg * 100:.0f} % of it")

            # conversion: the client's own query_range, fed the decoded bodies instead of HTTP
            decoded = {src_q.expr: orjson.loads(bodies[src_q.name]) for src_q in src.queries}
            feed = PromClient(PromConnection(url=ds.url))
            feed._post = lambda path, params, what: decoded[params["query"]]["data"]  # noqa: SLF001 - bench only
            results: dict[str, Any] = {}

            def convert() -> None:
                for q in src.queries:
                    results[q.name] = feed.query_range(q.expr, times[0], times[-1], step)

            conv = alternate({"convert": convert}, args.repeats)
            points = sum(len(pts) for series in results.values() for _, pts in series)
            print(f"  converting {points:,} points into series: {med(conv['convert']['cpu']):.3f} s CPU")

            # joins, with a detector-sized heap, GC paused (shipped) against not
            heap = ballast(args.heap_objects)
            unpaused = source_mod._build_snapshots  # noqa: SLF001 - the same joins without the pause
            joins = alternate({"paused": lambda: build_snapshots(times, cfg.window_s, results),
                               "gc on": lambda: unpaused(times, cfg.window_s, results, ())}, args.repeats)
            del heap
            jp, jg = med(joins["paused"]["cpu"]), med(joins["gc on"]["cpu"])
            print(f"  per-time joins into {len(times)} snapshots ({args.heap_objects:,} other objects in the heap): "
                  f"{jp:.3f} s CPU with the GC paused, {jg:.3f} s without ({(jp - jg) / jg * 100:+.0f} %)")

            # one chunk against smaller prefetched chunks, the core evaluating in between
            def run(chunk: int) -> Callable[[], None]:
                def go() -> None:
                    s = PromSource(PromClient(PromConnection(url=ds.url, timeout_s=120)), cfg.window_s,
                                   cfg.efa_error_counters, chunk_steps=chunk)
                    core = DetectorCore(cfg)
                    for snap in s.snapshots(start, end, step):
                        core.evaluate(snap)
                    s.close()
                return go

            small = max(2, len(times) // 4)
            ch = alternate({"one": run(max(len(times), 240)), "small": run(small)}, args.repeats, pid)
            print(f"  queries + evaluate, the replay as one chunk: {med(ch['one']['wall']):.2f} s wall; "
                  f"in chunks of {small} steps, each prefetched while the core evaluates the previous: "
                  f"{med(ch['small']['wall']):.2f} s (chunked/one {med(ch['small']['wall']) / med(ch['one']['wall']):.2f})")

            # PromQL aggregation in range mode against the plain selectors
            from rankwatch.detectors.promql import merge_for_instant

            plain = {q.name: q.expr for q in src.queries}
            merged = {q.name: q.expr for q in merge_for_instant(src.queries)}
            efa_plain = [e for n, e in plain.items() if n.startswith("efa:")]
            cases = {
                "gpu_gauges: max by (__name__, Hostname, gpu) vs plain": ([plain["gpu_gauges"]],
                                                                           [merged["gpu_gauges"]]),
                f"EFA counters: one tagged query vs {len(efa_plain)} plain": (efa_plain, [merged["efa"]]),
            }
            for what, (a_exprs, b_exprs) in cases.items():
                def rq(exprs: list[str]) -> Callable[[], None]:
                    return lambda: [client.query_range(e, times[0], times[-1], step) for e in exprs]

                res = alternate({"plain": rq(a_exprs), "aggregated": rq(b_exprs)}, args.repeats, pid)
                pw, aw = med(res["plain"]["wall"]), med(res["aggregated"]["wall"])
                pp, ap = med(res["plain"]["prom"]), med(res["aggregated"]["prom"])
                print(f"  range mode, {what}: {aw * 1e3:.0f} ms vs {pw * 1e3:.0f} ms wall ({aw / pw:.1f}x), "
                      f"Prometheus CPU {ap * 1e3:.0f} vs {pp * 1e3:.0f} ms")
            src.close()
            client.close()


def live_part(args: argparse.Namespace) -> None:
    from rankwatch.detectors import source as source_mod
    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.prom_client import PromClient, PromConnection
    from rankwatch.detectors.promql import merge_for_instant
    from rankwatch.detectors.replay import ReplayDataset
    from rankwatch.detectors.source import PromSource
    from rankwatch.sim.scenario import Scenario, write_replay
    from rankwatch.sim.training import Fault, Layout

    cfg = DetectorConfig()
    lay = Layout(tp=8, pp=4, dp=8)
    sc = Scenario("io-live", layout=lay, nodes=lay.world // 8, duration_s=450.0,
                  faults=[Fault("slowdown", rank=lay.world // 3, start_s=150, magnitude=0.2)])
    with tempfile.TemporaryDirectory(prefix="bench-io-live-") as tmp:
        om, _, samples = write_replay(sc, tmp)
        with ReplayDataset(om) as ds:
            pid = ds.prometheus.proc.pid if ds.prometheus else None
            first = (ds.min_time // cfg.interval_s + 4) * cfg.interval_s
            times = [first + cfg.interval_s * k for k in range(int((ds.max_time - first) // cfg.interval_s) + 1)]
            print(f"\nlive: {lay.world} ranks, {len(times)} evaluation times, {samples} samples; {load()}")
            srcs = {gz: PromSource(PromClient(PromConnection(url=ds.url, timeout_s=30, compress=gz)), cfg.window_s,
                                   cfg.efa_error_counters) for gz in (False, True)}
            assert srcs[False].snapshot(times[0]) == srcs[True].snapshot(times[0])
            it = iter(range(10**9))
            res = alternate({"identity": lambda: srcs[False].snapshot(times[next(it) % len(times)]),
                             "gzip": lambda: srcs[True].snapshot(times[next(it) % len(times)])}, args.cycles, pid)
            pg, pi = med(res["gzip"]["prom"]), med(res["identity"]["prom"])
            print(f"  Prometheus CPU per cycle: gzip responses {pg * 1e3:.0f} ms, uncompressed {pi * 1e3:.0f} ms: "
                  f"compressing is {(pg - pi) / pg * 100:.0f} % of it (detector CPU {med(res['gzip']['cpu']) * 1e3:.0f}"
                  f" vs {med(res['identity']['cpu']) * 1e3:.0f} ms)")

            merge = {m: PromSource(PromClient(PromConnection(url=ds.url, timeout_s=30)), cfg.window_s,
                                   cfg.efa_error_counters, merge_instant=m) for m in (True, False)}
            mres = alternate({"merged": lambda: merge[True].snapshot(times[next(it) % len(times)]),
                              "one each": lambda: merge[False].snapshot(times[next(it) % len(times)])},
                             args.cycles, pid)
            print(f"  EFA counters merged into one instant query vs one each ({len(merge[True].instant_queries)} vs "
                  f"{len(merge[False].instant_queries)} requests): detector CPU per cycle "
                  f"{med(mres['merged']['cpu']) * 1e3:.0f} vs {med(mres['one each']['cpu']) * 1e3:.0f} ms, Prometheus "
                  f"{med(mres['merged']['prom']) * 1e3:.0f} vs {med(mres['one each']['prom']) * 1e3:.0f} ms")
            for m in merge.values():
                m.close()

            queries = {q.name: q.expr for q in srcs[False].queries}
            trimmed = {q.name: q.expr for q in merge_for_instant(srcs[False].queries)}
            sizes: dict[str, list[int]] = {"plain": [], "max by": []}
            bodies: dict[str, bytes] = {}

            def gpu(form: str, expr: str) -> Callable[[], None]:
                def go() -> None:
                    t = times[len(sizes[form]) % len(times)]
                    r = requests.post(f"{ds.url}/api/v1/query", data={"query": expr, "time": f"{t:.3f}"},
                                      headers={"Accept-Encoding": "identity"}, timeout=30)
                    r.raise_for_status()
                    sizes[form].append(len(r.content))
                    bodies[form] = r.content
                return go

            g = alternate({"plain": gpu("plain", queries["gpu_gauges"]),
                           "max by": gpu("max by", trimmed["gpu_gauges"])}, args.cycles, pid)
            import orjson

            dec = alternate({f: (lambda f=f: orjson.loads(bodies[f])) for f in bodies}, 50)
            print(f"  GPU gauges, one instant query: plain {med(sizes['plain']) / 1e3:.0f} kB, max by "
                  f"{med(sizes['max by']) / 1e3:.0f} kB; Prometheus CPU (mean) {statistics.mean(g['plain']['prom']) * 1e3:.1f} "
                  f"vs {statistics.mean(g['max by']['prom']) * 1e3:.1f} ms; decoding {med(dec['plain']['cpu']) * 1e3:.1f} "
                  f"vs {med(dec['max by']['cpu']) * 1e3:.1f} ms")

            heap = ballast(args.heap_objects)
            shipped = source_mod._gc_paused  # noqa: SLF001 - A/B of the shipped pause
            src = srcs[False]

            def snap_with(pause: bool) -> Callable[[], None]:
                def go() -> None:
                    source_mod._gc_paused = shipped if pause else contextlib.nullcontext  # noqa: SLF001
                    try:
                        src.snapshot(times[len(gcres_order) % len(times)])
                    finally:
                        source_mod._gc_paused = shipped  # noqa: SLF001
                    gcres_order.append(pause)
                return go

            gcres_order: list[bool] = []
            gres = alternate({"paused": snap_with(True), "gc on": snap_with(False)}, args.cycles, pid)
            del heap
            cp, cg = med(gres["paused"]["cpu"]), med(gres["gc on"]["cpu"])
            print(f"  detector CPU per snapshot with {args.heap_objects:,} other objects in the heap: GC paused "
                  f"{cp * 1e3:.0f} ms, not paused {cg * 1e3:.0f} ms ({(cp - cg) * 1e3:+.0f} ms)")
            for s in srcs.values():
                s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["replay", "live"], help="run one part (default: both)")
    ap.add_argument("--repeats", type=int, default=7, help="repeats per replay comparison (default: 7)")
    ap.add_argument("--cycles", type=int, default=20, help="cycles per live comparison (default: 20)")
    ap.add_argument("--heap-objects", type=int, default=300_000,
                    help="objects kept alive during the GC comparisons, like a running detector (default: 300000)")
    args = ap.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {load()}")
    if args.only in (None, "replay"):
        replay_part(args)
    if args.only in (None, "live"):
        live_part(args)
    print(f"\nmachine at the end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
