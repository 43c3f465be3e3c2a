"""Snapshots from anything speaking the Prometheus query API.

``PromSource.snapshot(t)`` (live) runs the query set of ``promql.build_queries`` as instant
queries at ``t``; ``PromSource.snapshots(start, end, step)`` (replay, backtest) runs the very
same expressions as range queries. Both hand their series to ``build_snapshots`` — an instant
result is a series with one point — so a Snapshot at t is the same whichever way it was fetched.

A failed query never becomes zeros: its quantities stay missing and ``Snapshot.errors`` names
it (``"<query>: <reason>"``)."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rankwatch.detectors.model import GpuObs, NicObs, NodeObs, RankObs, Snapshot
from rankwatch.detectors.prom_client import PromClient, PromQueryError
from rankwatch.detectors.promql import (
    GPU_INCREASE,
    GPU_LAST_VALUE,
    GPU_SPARSE_FILLED,
    GPU_WINDOW_AVG,
    NIC_SEEN,
    NODE_GPUS_ANSWERING,
    NODE_GPUS_EXPECTED,
    NODE_INFO,
    QUERY_TAG,
    RANK_GAUGES,
    RANK_INFO_BOTH,
    RANK_INFO_NOW,
    RANK_INFO_SEEN,
    RULES_PRESENT,
    Query,
    build_queries,
    merge_for_instant,
    spacing_query,
)

log = logging.getLogger(__name__)

Labels = dict[str, str]
Series = tuple[Labels, list[tuple[float, float]]]

# Range queries are split into chunks of this many evaluation steps: bounded memory for
# day-long replays and well under Prometheus' 11 000 points per series. The next chunk's queries
# run in Prometheus while this one is joined and evaluated; smaller chunks, to overlap more of a
# short replay, measured no faster on 2 vCPUs (the joins and the core hold the GIL throughout).
RANGE_CHUNK_STEPS = 240

# Past this many NICs a live cycle sends each query on its own (promql.merge_for_instant).
LARGE_NICS = 4096
# The live queries that read the detector's recording rules on that path.
RULE_QUERIES = ("gpu_flags", "gpu_xid")

GPU_QUERIES = ("gpu_seen", "gpu_gauges", "gpu_flags", *(f"gpu_avg:{t}" for t in GPU_WINDOW_AVG),
               *(f"gpu_increase:{t}" for t in GPU_INCREASE), "gpu_nvlink", "gpu_xid")
_GPU_FIELDS = frozenset({"health", "last_xid", "remap_failure", "remap_pending", "retired_pending",
                         "clock_event_reasons", "sm_clock", "temperature"})


def _int(v: str | None) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _host_of_instance(instance: str) -> str:
    """Host part of ``host:port`` (IPv6 ``[::1]:9100`` too)."""
    if instance.startswith("["):
        return instance[1:].split("]", 1)[0]
    return instance.rsplit(":", 1)[0] if ":" in instance else instance


def _rank_key(labels: Labels) -> tuple[str, int, str] | None:
    rank = _int(labels.get("rank"))
    run = labels.get("run")
    if rank is None or not run:
        return None
    return run, rank, labels.get("node", "")


def _gpu_key(labels: Labels) -> tuple[str, str] | None:
    host, gpu = labels.get("Hostname"), labels.get("gpu")
    return (host, gpu) if host and gpu is not None else None


def _named(keyfn: Callable[[Labels], Hashable | None]) -> Callable[[Labels], Hashable | None]:
    def key(labels: Labels) -> Hashable | None:
        k = keyfn(labels)
        return None if k is None else (k, labels.get("__name__", ""))
    return key


class _Tables:
    """Query results re-indexed as one ``{key: value}`` table per evaluation time. A key is
    computed once per series (not per point) and duplicate series keep the maximum — the
    ``max by (<key>)`` of PromQL, for a target scraped by two jobs."""

    def __init__(self, times: Sequence[float], results: Mapping[str, list[Series]]) -> None:
        self.n = len(times)
        self.t0 = times[0]
        self.step = (times[1] - times[0]) if len(times) > 1 else 1.0
        self.results = results

    def _points(self, name: str, keyfn: Callable[[Labels], Hashable | None]
                ) -> Iterator[tuple[int, Hashable, Labels, float]]:
        """(time index, key, labels, value) of every point of query ``name`` inside the range."""
        t0, step, n = self.t0, self.step, self.n
        for labels, points in self.results.get(name, ()):
            k = keyfn(labels)
            if k is None:
                continue
            for pt, v in points:
                x = float(v)
                i = int((pt - t0) / step + 0.5)
                if 0 <= i < n and x - x == 0.0:
                    yield i, k, labels, x

    def table(self, name: str, keyfn: Callable[[Labels], Hashable | None]) -> list[dict[Any, float]]:
        """Per time, key -> value; several series on one key (duplicates) keep the largest."""
        out: list[dict[Any, float]] = [{} for _ in range(self.n)]
        t0, step, n = self.t0, self.step, self.n
        # Once per point (~2 * 10^5 per 30 minutes of a 64-rank replay), so inlined, and the
        # point converted here, in the one pass over it: a range query's values arrive as the
        # JSON's strings (``PromClient.query_range_raw``), NaN and ±Inf (x - x != 0) mean no data.
        for labels, points in self.results.get(name, ()):
            k = keyfn(labels)
            if k is None:
                continue
            for pt, v in points:
                x = float(v)
                i = int((pt - t0) / step + 0.5)
                if 0 <= i < n and x - x == 0.0:
                    d = out[i]
                    if k not in d or x > d[k]:
                        d[k] = x
        return out

    def labelled(self, name: str, keyfn: Callable[[Labels], Hashable | None]
                 ) -> list[dict[Any, list[tuple[Labels, float]]]]:
        """Per time, key -> (labels, value) of every series with a point then (info series)."""
        out: list[dict[Any, list[tuple[Labels, float]]]] = [{} for _ in range(self.n)]
        for i, k, labels, v in self._points(name, keyfn):
            out[i].setdefault(k, []).append((labels, v))
        return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector: decoding and joining allocate ~10^4 (live) to 10^5
    (replay chunk) small containers, none of them cyclic, and the collections they trigger, each
    walking every live object, cost a quarter of the join time and ~20 ms per live cycle with a
    detector-sized heap (BENCHMARKS.md). Process-wide, so only around bounded work."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def build_snapshots(times: Sequence[float], window_s: float, results: Mapping[str, list[Series]],
                    errors: Sequence[str] = (), node_window_s: float | None = None) -> list[Snapshot]:
    """One Snapshot per time in ``times`` (evenly spaced) from the series of each query of
    ``promql.build_queries`` (probe windows of ``window_s``, node windows of ``node_window_s``,
    default the same). A query name absent from ``results`` means that query failed: its
    quantities stay missing."""
    with _gc_paused():
        return _build_snapshots(times, window_s, results, errors, node_window_s or window_s)


def _build_snapshots(times: Sequence[float], window_s: float, results: Mapping[str, list[Series]],
                     errors: Sequence[str], node_window_s: float) -> list[Snapshot]:
    tb = _Tables(times, results)
    ok = results.__contains__

    def inst(lb: Labels) -> str | None:
        return lb.get("instance")

    up_t = tb.table("targets_up", inst)

    def node_row(tag: str) -> Callable[[Labels], Hashable | None]:
        def key(lb: Labels) -> Hashable | None:
            return (lb.get("instance", ""), lb.get("__name__", "")) if lb.get("q") == tag else None
        return key

    node_seen_t = tb.labelled("node_values", node_row("seen"))
    node_fresh_t = tb.labelled("node_values", node_row("fresh"))
    have_ranks = ok("rank_info_seen") and ok("rank_steps_rate")

    def info_key(lb: Labels) -> tuple[tuple[str, int, str], str] | None:
        k = _rank_key(lb)
        return (k, lb.get("instance", "")) if k else None

    info_seen_t = tb.labelled("rank_info_seen", info_key)
    # without the query (it failed, or hand-made results) a rank answers when its counters do
    info_now_t = tb.table(RANK_INFO_NOW, info_key) if ok(RANK_INFO_NOW) else None
    # fresh = the rank's step counter has samples in the window, whatever its value
    fresh_t = tb.table("rank_steps_rate", info_key)
    steps_t = tb.table("rank_steps_rate", _rank_key)
    step_sec_t = tb.table("rank_step_seconds_rate", _rank_key)
    tokens_t = tb.table("rank_tokens_rate", _rank_key)
    rank_gauges_t = tb.table("rank_gauges", _named(_rank_key))
    sections_t = tb.table("rank_section_rate",
                          lambda lb: (k, lb["section"]) if (k := _rank_key(lb)) and lb.get("section") else None)
    have_gpus = ok("gpu_seen")
    gpu_seen_t = tb.labelled("gpu_seen", _gpu_key)
    gpu_gauges_t = tb.table("gpu_gauges", _named(_gpu_key))
    gpu_flags_t = tb.table("gpu_flags", _named(_gpu_key)) if ok("gpu_flags") else None
    gpu_tag_t = {name.split(":", 1)[1]: tb.table(name, _gpu_key)
                 for name in results if name.startswith(("gpu_avg:", "gpu_increase:"))}
    nvlink_t = tb.table("gpu_nvlink", lambda lb: (k, lb.get("q")) if (k := _gpu_key(lb)) else None)
    gpu_xid_t = tb.table("gpu_xid", lambda lb: (k, code) if (k := _gpu_key(lb)) and
                         (code := _int(lb.get("xid"))) is not None else None)
    # Without every GPU query a node that reports would make its GPUs look lost: while one of
    # them fails, node state is withheld too (missing: neither healthy nor failed).
    have_nodes = ok("node_values") and all(ok(q) for q in GPU_QUERIES)
    efa_t = {name.split(":", 1)[1]: tb.table(
        name, lambda lb: (lb.get("instance", ""), lb["device"], lb.get("port") or "1") if lb.get("device") else None)
        for name in results if name.startswith("efa:")}
    nic_seen_t = tb.table(NIC_SEEN, lambda lb: (lb.get("instance", ""), lb["device"], lb.get("port") or "1")
                          if lb.get("device") else None)

    identity_cache: dict[int, dict[str, Any]] = {}  # keyed by id() of label dicts alive in `results`
    snaps: list[Snapshot] = []
    for i, t in enumerate(times):
        snap = Snapshot(time=t, window_s=window_s, node_window_s=node_window_s, errors=list(errors))
        up = {k: v >= 1 for k, v in up_t[i].items()}
        host_of: dict[str, str] = {}
        for (ins, name), lbs in node_seen_t[i].items():
            host = max(lb.get("Hostname", "") for lb, _ in lbs)
            if name == NODE_INFO and host:
                host_of[ins] = host
        if have_ranks:
            current = fresh_t[i] if info_now_t is None else \
                {k for k, ts in info_now_t[i].items() if t - ts < window_s}
            snap.ranks = _ranks(i, info_seen_t, fresh_t, current, up, steps_t, step_sec_t, tokens_t, rank_gauges_t,
                                sections_t, identity_cache)
        if have_gpus:
            snap.gpus = _gpus(i, node_window_s, gpu_seen_t, gpu_gauges_t, gpu_flags_t, gpu_tag_t, nvlink_t, gpu_xid_t)
        if have_nodes:
            nodes: dict[str, NodeObs] = {}
            for ins, host in host_of.items():
                n = nodes.setdefault(host, NodeObs(node=host, exporter_up=False))
                # Reporting = its own series have a sample in the node window (the window its
                # GPUs are judged on), not merely `up`: absence is judged against the data's
                # spacing, so a GPU is never "lost" for lack of a sample its node lacks too.
                n.exporter_up = n.exporter_up or ((ins, NODE_INFO) in node_fresh_t[i] and up.get(ins, True))
            for (ins, name), lbs in node_fresh_t[i].items():
                # the exporter's GPU counts carry Hostname; else join through the instance
                host = max(lb.get("Hostname", "") for lb, _ in lbs) or host_of.get(ins, "")
                if host not in nodes or name not in (NODE_GPUS_EXPECTED, NODE_GPUS_ANSWERING):
                    continue
                v = max(v for _, v in lbs)
                if name == NODE_GPUS_EXPECTED:
                    nodes[host].gpus_expected = v
                else:
                    nodes[host].gpus_answering = v
            snap.nodes = [nodes[k] for k in sorted(nodes)]
        nics: dict[tuple[str, str, str], NicObs] = {}
        for counter, table in efa_t.items():
            for (ins, dev, port), v in table[i].items():
                host = host_of.get(ins) or _host_of_instance(ins)
                nic = nics.get((host, dev, port))
                if nic is None:  # not setdefault: one NicObs per NIC, not one per NIC and counter
                    nic = nics[(host, dev, port)] = NicObs(node=host, device=dev, port=port)
                if counter == "tx_bytes":
                    nic.tx_bytes_rate = v / node_window_s
                elif counter == "rx_bytes":
                    nic.rx_bytes_rate = v / node_window_s
                if counter not in ("tx_bytes", "rx_bytes"):
                    # error counters, and the packets the network rule divides them by
                    nic.increase[counter] = v
        snap.nics = [nics[k] for k in sorted(nics)]
        if ok(NIC_SEEN):
            # the query returns the silent NICs; those with data in the window are known too
            snap.nics_seen = sorted({(host_of.get(ins) or _host_of_instance(ins), dev, port)
                                     for ins, dev, port in nic_seen_t[i]} | set(nics))
        snaps.append(snap)
    return snaps


def _ranks(i: int, info_seen_t: list, fresh_t: list, current: Collection[Hashable], up: dict[str, bool],
           steps_t: list, step_sec_t: list, tokens_t: list, rank_gauges_t: list, sections_t: list,
           identity_cache: dict[int, dict[str, Any]]) -> list[RankObs]:
    # rankwatch_rank_info is the registry of ranks. A rank that restarted elsewhere has two info
    # series: prefer the current, fresh, answering one (then the larger instance, to be
    # deterministic).
    chosen: dict[tuple[str, int], tuple[tuple[int, int, int, str, str], Labels]] = {}
    for (key, ins), lbs in info_seen_t[i].items():
        now = (key, ins) in current
        fresh = (key, ins) in fresh_t[i]
        pref = (int(now), int(fresh), int(up.get(ins, now)), ins, key[2])
        if key[:2] not in chosen or pref > chosen[key[:2]][0]:
            chosen[key[:2]] = (pref, lbs[0][0])
    ranks: dict[tuple[str, int, str], RankObs] = {}
    for (run, rank), ((now, _, _, ins, node), lb) in chosen.items():
        static = identity_cache.get(id(lb))
        if static is None:  # parsed once per info series, not once per evaluation time
            static = identity_cache[id(lb)] = {
                "local_rank": _int(lb.get("local_rank")), "world_size": _int(lb.get("world_size")),
                "gpu": lb.get("gpu") or None, "gpu_uuid": lb.get("gpu_uuid") or None, "pp": _int(lb.get("pp")),
                "tp": _int(lb.get("tp")), "dp": _int(lb.get("dp")), "cp": _int(lb.get("cp"))}
        # An endpoint answers for the rank whose series it serves now (its info series is in the
        # target's latest scrape): once a new job reuses the port, the old run's ranks are not
        # "up" just because `up` is 1. Without an `up` series (replay files may lack it) that
        # is all there is to know.
        ranks[(run, rank, node)] = RankObs(run=run, rank=rank, node=node, up=bool(now) and up.get(ins, True),
                                           **static)
    # Values join on (run, rank, node): series a rank left behind on another node are ignored.
    steps = steps_t[i]
    for key, v in steps.items():
        if key in ranks:
            ranks[key].steps_rate = v
    for key, v in step_sec_t[i].items():
        if key in ranks and steps.get(key):
            # rate(step_seconds_total) / rate(steps_total): mean wall time per step
            ranks[key].step_seconds = v / steps[key]
    for key, v in tokens_t[i].items():
        if key in ranks:
            ranks[key].tokens_rate = v
    for (key, name), v in rank_gauges_t[i].items():
        field = RANK_GAUGES.get(name)
        if key in ranks and field:
            setattr(ranks[key], field, v)
    for (key, section), v in sections_t[i].items():
        # Seconds per step in the section; no completed step in the window = no data.
        if (r := ranks.get(key)) is not None and (s := steps.get(key)):
            r.sections[section] = v / s
    return [ranks[k] for k in sorted(ranks)]


def _gpus(i: int, window_s: float, gpu_seen_t: list, gpu_gauges_t: list, gpu_flags_t: list | None,
          gpu_tag_t: dict[str, list], nvlink_t: list, gpu_xid_t: list) -> list[GpuObs]:
    gpus: dict[tuple[str, str], GpuObs] = {}
    for key, lbs in gpu_seen_t[i].items():
        # max UUID: deterministic if a GPU was swapped inside the lookback
        lb = lbs[0][0] if len(lbs) == 1 else max((x for x, _ in lbs), key=lambda x: x.get("UUID", ""))
        gpus[key] = GpuObs(node=key[0], gpu=key[1], uuid=lb.get("UUID") or None, model=lb.get("modelName") or None,
                           present=False)
    vals: dict[tuple[str, str], dict[str, float]] = {}
    for (key, name), v in gpu_gauges_t[i].items():
        if name in GPU_LAST_VALUE:
            vals.setdefault(key, {})[GPU_LAST_VALUE[name]] = v
    for tag, table in gpu_tag_t.items():
        for key, v in table[i].items():
            vals.setdefault(key, {})[tag] = v
    if gpu_flags_t is not None:
        # Sparse gauges (``> 0`` in the query): a GPU that reported in the window and has no
        # row for one of them reads 0 (health pass, no XID, nothing pending).
        for d in vals.values():
            for f in GPU_SPARSE_FILLED:
                d.setdefault(f, 0.0)
        for (key, name), v in gpu_flags_t[i].items():
            if name in GPU_LAST_VALUE:
                if key not in vals:  # only its flags reported (a GPU off the bus: health FAIL)
                    vals[key] = dict.fromkeys(GPU_SPARSE_FILLED, 0.0)
                vals[key][GPU_LAST_VALUE[name]] = v
    for (key, _tag), v in nvlink_t[i].items():  # CRC + replay + recovery errors
        d = vals.setdefault(key, {})
        d["nvlink"] = d.get("nvlink", 0.0) + v
    for key, d in vals.items():
        g = gpus.get(key)
        if g is None:
            g = gpus[key] = GpuObs(node=key[0], gpu=key[1])
        # Present = one of its series has a sample inside the window.
        g.present = True
        for f, v in d.items():
            if f in _GPU_FIELDS:
                setattr(g, f, v)
            elif f == "dbe":
                g.dbe_increase = v
            elif f == "pcie_replay":
                g.pcie_replay_increase = v
            elif f == "thermal_violation":
                g.thermal_violation_rate = v / window_s
            elif f == "power_violation":
                g.power_violation_rate = v / window_s
            elif f == "nvlink":
                g.nvlink_errors_increase = v
    for (key, code), v in gpu_xid_t[i].items():
        if key in gpus and v > 0:
            gpus[key].xid_increase[code] = v
    return [gpus[k] for k in sorted(gpus)]


class PromSource:
    """Builds Snapshots through a PromClient: one request per query of the set (live: of its
    merged form, ``promql.merge_for_instant``), ``max_workers`` in flight at once (more only
    contend for the GIL while parsing JSON)."""

    def __init__(self, client: PromClient, window_s: float, efa_counters: Sequence[str], *,
                 node_window_s: float | None = None, max_workers: int = 4, chunk_steps: int = RANGE_CHUNK_STEPS,
                 merge_instant: bool = True, recording_rules: bool = True) -> None:
        self.client = client
        self.chunk_steps = max(1, int(chunk_steps))
        self.efa_counters = tuple(efa_counters)
        self.merge_instant = merge_instant
        # Live path: the raw series, or the detector's recording rules once a cycle has seen
        # them run (RULES_PRESENT); large: past LARGE_NICS NICs nothing is merged.
        self.use_rules = False
        self.recording_rules = recording_rules  # False: never take the rules path
        self.large = False
        self.set_windows(window_s, node_window_s)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(self.queries))),
                                        thread_name_prefix="promql")

    def set_windows(self, window_s: float, node_window_s: float | None = None) -> None:
        """Probe and node-exporter windows of the following snapshots (the query set follows)."""
        self.window_s = float(window_s)
        self.node_window_s = float(node_window_s or window_s)
        self.queries: list[Query] = build_queries(self.window_s, self.efa_counters, self.node_window_s)
        self._set_instant()

    def _set_instant(self) -> None:
        qs = build_queries(self.window_s, self.efa_counters, self.node_window_s, rules=True) if self.use_rules \
            else self.queries
        self.instant_queries = merge_for_instant(qs, self.large) if self.merge_instant else list(qs)

    @property
    def path(self) -> str:
        """Which series the live queries read: "recording rules" or "raw series"."""
        return "recording rules" if self.use_rules else "raw series"

    def _follow_rules(self, results: dict[str, list[Series]], errors: list[str]) -> bool:
        """After a live cycle's queries: take the recording-rules path once they run, leave it
        once they stop — withholding, this cycle, what was read through them (missing, not
        zero). Returns whether the query set changes."""
        if "node_values" not in results:
            return False  # not known this cycle
        rules_seen = self.recording_rules and any(lb.get("q") == "rules" for lb, _ in results["node_values"])
        if rules_seen == self.use_rules:
            return False
        if self.use_rules:
            log.warning("the detector's recording rules (%s) stopped answering: reading the raw series again",
                        RULES_PRESENT)
            for name in [n for n in results if n in RULE_QUERIES or n.startswith("efa:") or n == NIC_SEEN]:
                del results[name]
                errors.append(f"{name}: the recording rules it read stopped answering")
        else:
            log.info("the detector's recording rules (%s) answer: reading the GPU flags, XID counts and EFA "
                     "counters through them", RULES_PRESENT)
        self.use_rules = rules_seen
        return True

    def sample_spacing(self, t: float) -> dict[str, float | None]:
        """Live: each source's sample spacing in seconds at data time ``t`` (median over its
        series; None where the source has no series with history)."""
        out: dict[str, float | None] = {}
        for source in ("probe", "node"):
            try:
                rows = self.client.query(spacing_query(source), t)
            except PromQueryError as exc:
                log.warning("cannot learn the %s sample spacing at %.3f: %s", source, t, exc)
                rows = []
            vals = [v for _, v in rows if math.isfinite(v) and v > 0]
            out[source] = vals[0] if vals else None
        return out

    def sample_spacing_range(self, start: float, end: float, points: int = 60) -> dict[str, float | None]:
        """Replay/backtest: each source's sample spacing over ``start..end`` (median over about
        ``points`` evaluation times of the per-time median over series)."""
        step = max((end - start) / max(points - 1, 1), 1.0)
        out: dict[str, float | None] = {}
        for source in ("probe", "node"):
            try:
                rows = self.client.query_range(spacing_query(source), start, max(end, start), step)
            except PromQueryError as exc:
                log.warning("cannot learn the %s sample spacing over %.0f..%.0f: %s", source, start, end, exc)
                rows = []
            vals = sorted(v for _, pts in rows for _, v in pts if math.isfinite(v) and v > 0)
            out[source] = vals[len(vals) // 2] if vals else None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def _run_all(self, fn: Callable[[str], list[Series]], queries: Sequence[Query] | None = None
                 ) -> tuple[dict[str, list[Series]], list[str]]:
        return self._collect(self._submit_all(fn, queries))

    def _submit_all(self, fn: Callable[[str], list[Series]], queries: Sequence[Query] | None = None
                    ) -> list[tuple[Query, Future[list[Series]]]]:
        # Once the server is unreachable or timing out, the queries not yet sent are skipped:
        # a dead Prometheus costs one timeout per cycle, not one per query.
        down: list[str] = []

        def run(expr: str) -> list[Series]:
            if down:
                raise PromQueryError(f"skipped, the server failed this cycle: {down[0]}", error_type="skipped")
            try:
                return fn(expr)
            except PromQueryError as exc:
                if exc.error_type in ("connection", "timeout", "tls", "redirect", "auth"):
                    down.append(str(exc))
                raise

        return [(q, self._pool.submit(run, q.expr)) for q in (self.queries if queries is None else queries)]

    @staticmethod
    def _collect(futures: Sequence[tuple[Query, Future[list[Series]]]]) -> tuple[dict[str, list[Series]], list[str]]:
        results: dict[str, list[Series]] = {}
        errors: list[str] = []
        for q, fut in futures:
            try:
                rows = fut.result()
            except PromQueryError as exc:
                errors += [f"{name}: {exc}" for name in (q.parts or (q.name,))]
                continue
            if not q.parts:
                results[q.name] = rows
                continue
            if q.name == RANK_INFO_BOTH:
                # every row is a rank seen; those with a time are in their target's last scrape
                results[RANK_INFO_SEEN] = rows
                results[RANK_INFO_NOW] = [(labels, points) for labels, points in rows if points and points[0][1] > 0]
                continue
            split: dict[str, list[Series]] = {name: [] for name in q.parts}
            for labels, points in rows:
                part = split.get(labels.pop(QUERY_TAG, ""))
                if part is not None:
                    part.append((labels, points))
            results.update(split)
        return results, errors

    def snapshot(self, t: float) -> Snapshot:
        """Live: instant queries evaluated at data time ``t``, all within one deadline (the
        client's timeout): a server that never answers costs one timeout per cycle. Failures are
        in ``Snapshot.errors``; the service logs one line per cycle for them."""
        deadline = time.monotonic() + self.client.conn.timeout_s

        def instant(expr: str) -> list[Series]:
            return [(labels, [(t, v)]) for labels, v in self.client.query(expr, t, deadline=deadline)]

        with _gc_paused():  # the decoding threads allocate as much as the joins
            results, errors = self._run_all(instant, self.instant_queries)
            changed = self._follow_rules(results, errors)
            for e in errors:
                log.debug("query failed at %.3f: %s", t, e)
            snap = build_snapshots([t], self.window_s, results, errors, self.node_window_s)[0]
        if (len(snap.nics) > LARGE_NICS) != self.large:
            self.large = len(snap.nics) > LARGE_NICS
            changed = True
        if changed:
            self._set_instant()
        return snap

    def _without_malformed(self, times: list[float], results: dict[str, list[Series]], errors: list[str]
                           ) -> list[Snapshot]:
        """The snapshots of a chunk in which a response held a malformed point: that query
        fails, as ``PromClient.query_range`` would have failed it, and the others count."""
        for name, rows in list(results.items()):
            try:
                for _, points in rows:
                    for pt, v in points:
                        pt - 0.0 + float(v)  # what the joins do with it
            except (IndexError, TypeError, ValueError) as exc:
                del results[name]
                errors.append(f"{name}: range query: malformed sample: {exc!r}")
                log.warning("range query failed for %.3f..%.3f: %s", times[0], times[-1], errors[-1])
        return build_snapshots(times, self.window_s, results, errors, self.node_window_s)

    def snapshots(self, start: float, end: float, step: float) -> Iterator[Snapshot]:
        """Replay/backtest: one Snapshot per ``start + k*step <= end``, from range queries."""
        if step <= 0:
            raise ValueError("step must be positive")
        n_total = int(math.floor((end - start) / step + 1e-9)) + 1
        chunks = [[start + k * step for k in range(k0, min(k0 + self.chunk_steps, n_total))]
                  for k0 in range(0, n_total, self.chunk_steps)]
        if not chunks:
            return

        def submit(times: list[float]) -> list[tuple[Query, Future[list[Series]]]]:
            # raw values: the joins convert each point in their own pass over it
            return self._submit_all(lambda expr: self.client.query_range_raw(expr, times[0], times[-1], step))

        pending = submit(chunks[0])
        for k, times in enumerate(chunks):
            with _gc_paused():  # not across the yield: the caller's own work keeps its collector
                results, errors = self._collect(pending)
                if k + 1 < len(chunks):
                    # prefetch: Prometheus evaluates the next chunk while this one is joined and
                    # the caller evaluates its snapshots
                    pending = submit(chunks[k + 1])
                for e in errors:
                    log.warning("range query failed for %.3f..%.3f: %s", times[0], times[-1], e)
                try:
                    snaps = build_snapshots(times, self.window_s, results, errors, self.node_window_s)
                except (IndexError, TypeError, ValueError):
                    snaps = self._without_malformed(times, results, errors)
                del results
            yield from snaps
