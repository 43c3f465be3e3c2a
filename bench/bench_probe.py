"""Probe overhead on the CPU path, and the cost of a scrape to the training process.

    .venv/bin/python bench/bench_probe.py [--rounds 30] [--steps 2000] [--scrapes 300]

1. Hot path: one step with five sections (``dataloader, forward, backward, optimizer, comm``)
   of empty bodies, against the floor of the same loop with two ``time.perf_counter_ns()``
   calls per section, interleaved round by round in the same process. Reported per section:
   median over rounds of (probe − floor) / 5 per step. Also ``record_step`` (simulator /
   Megatron-timer API) and the ``begin_section``/``end_section`` API of the callbacks.
   No device synchronisation can occur: the CPU path never touches CUDA (the CUDA path is
   checked by tests/test_probe_cuda.py and, on a GPU, bench/gpu_check_probe.py).
2. Scrape: a child process GETs the rank's /metrics endpoint; the client-side latency is
   reported, the in-process exposition time, and the GIL: a busy "training" thread in this
   process reads the clock in a loop, and the longest gap between two reads while scrapes
   run (vs. the same loop with no scrapes) is how long a scrape kept it off the interpreter.
3. nvidia-resiliency-ext's straggler ``Detector.detection_section`` (CPU section timing), in
   the same run, if the package imports and initialises here.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

from prometheus_client import generate_latest

from rankwatch import Probe
from rankwatch.exporters.identity import RankIdentity

SECTIONS = ("dataloader", "forward", "backward", "optimizer", "comm")
pc = time.perf_counter_ns


def floor_loop(steps: int) -> None:
    acc = 0
    for _ in range(steps):
        t0 = pc()
        for _name in SECTIONS:
            a = pc()
            b = pc()
            acc += b - a
        acc += pc() - t0


def probe_loop(probe: Probe, steps: int) -> None:
    for _ in range(steps):
        with probe.step(tokens=4096):
            for name in SECTIONS:
                with probe.section(name):
                    pass


def begin_end_loop(probe: Probe, steps: int) -> None:
    for _ in range(steps):
        probe.begin_step()
        for name in SECTIONS:
            probe.begin_section(name)
            probe.end_section(name)
        probe.end_step(tokens=4096)


def record_step_loop(probe: Probe, steps: int) -> None:
    secs = {name: 0.01 for name in SECTIONS}
    for _ in range(steps):
        probe.record_step(0.05, secs, tokens=4096)


def timed(fn, *args) -> tuple[float, float]:  # noqa: ANN001
    """(wall, thread CPU) seconds of one call. CPU time leaves out the time the OS had this
    thread descheduled, which dominates wall time on a shared 2-core machine."""
    c0, t0 = time.thread_time(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0, time.thread_time() - c0


def nvrx_loop_factory():  # noqa: ANN201
    """NVRx's straggler ``Detector.detection_section`` CPU path, or why it cannot run here."""
    try:
        try:
            from nvidia_resiliency_ext.attribution.straggler import Detector  # type: ignore[import-not-found]
        except ImportError:
            from nvidia_resiliency_ext.straggler import Detector  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        return None, f"not importable: {type(exc).__name__}: {exc}"
    status = "Detector.initialize ok"
    try:
        Detector.initialize(scores_to_compute=["individual_perf_scores"], gather_on_rank0=False,
                            profiling_interval=1, report_time_interval=1e9)
    except Exception as exc:  # noqa: BLE001
        # initialize() loads the CUPTI extension (needs libcupti from a CUDA install). The CPU
        # timing path of detection_section(profile_cuda=False) only reads these three class
        # attributes: set them and time NVRx's own, unmodified section code.
        Detector.initialized = True
        Detector.custom_sections = {}
        Detector.profiling_interval = 1
        status = (f"Detector.initialize failed ({type(exc).__name__}: {exc}); timed detection_section"
                  "(profile_cuda=False) with initialized/custom_sections/profiling_interval set by hand")

    def loop(steps: int) -> None:
        for _ in range(steps):
            for name in SECTIONS:
                with Detector.detection_section(name, profile_cuda=False):
                    pass
    return loop, status


def bench_hot_path(rounds: int, steps: int) -> dict[str, float]:
    probe = Probe(run="bench", port=0, wandb_run=None, identity=RankIdentity(node="bench"))
    nvrx, nvrx_status = nvrx_loop_factory()
    loops = {"floor": lambda: floor_loop(steps), "probe": lambda: probe_loop(probe, steps),
             "begin_end": lambda: begin_end_loop(probe, steps),
             "record_step": lambda: record_step_loop(probe, steps)}
    if nvrx is not None:
        loops["nvrx"] = lambda: nvrx(steps)
    for fn in loops.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in loops}
    cpu: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(rounds):
        for name, fn in loops.items():
            w, c = timed(fn)
            wall[name].append(w / steps)  # seconds per step
            cpu[name].append(c / steps)
    out: dict[str, float] = {}
    for clock, per_round in (("cpu", cpu), ("wall", wall)):
        floor = per_round["floor"]
        out[f"{clock}: floor_us_per_section"] = statistics.median(floor) / 5 * 1e6
        for name in ("probe", "begin_end", "nvrx"):
            if name in per_round:
                over = [(p - f) / 5 * 1e6 for p, f in zip(per_round[name], floor, strict=True)]
                out[f"{clock}: {name}_overhead_us_per_section_median"] = statistics.median(over)
        out[f"{clock}: record_step_us_per_step_median"] = statistics.median(per_round["record_step"]) * 1e6
    out["nvrx_status"] = nvrx_status  # type: ignore[assignment]
    assert probe.errors == 0
    probe.close()
    return out


CLIENT = """
import sys, time, http.client
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
lat = []
for _ in range(n):
    t0 = time.perf_counter()
    conn.request("GET", "/metrics")
    r = conn.getresponse(); body = r.read()
    lat.append(time.perf_counter() - t0)
    conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    time.sleep(0.005)
lat.sort()
print(lat[len(lat) // 2], lat[int(0.99 * (len(lat) - 1))], len(body))
"""


def ticker(stop: threading.Event, gaps: list[float]) -> None:
    """A busy 'training loop': the longest time between two iterations is how long some
    other thread held the GIL (or the OS descheduled us)."""
    last = time.perf_counter()
    worst = 0.0
    big: list[float] = []
    while not stop.is_set():
        now = time.perf_counter()
        d = now - last
        if d > 50e-6:
            big.append(d)
        if d > worst:
            worst = d
        last = now
    gaps.extend(big)
    gaps.append(worst)


def bench_scrape(scrapes: int) -> dict[str, float]:
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app

    probe = Probe(run="bench", port=0, wandb_run=None,
                  identity=RankIdentity(rank=3, local_rank=3, world_size=256, local_world_size=8, node="bench",
                                        gpu=3, gpu_uuid="GPU-bench", pp=0, tp=3, dp=0, cp=0))
    for _ in range(100):
        probe.record_step(0.5, {n: 0.1 for n in (*SECTIONS, "checkpoint")}, tokens=4096)
    body = generate_latest(probe.registry)
    # The server Probe starts (prometheus_client.start_http_server: ThreadingWSGIServer +
    # make_wsgi_app), with the app wrapped to measure each request in the server thread:
    # its CPU time there bounds how long it held the GIL (the socket I/O around it releases it).
    app = make_wsgi_app(probe.registry)
    handler: list[tuple[float, float]] = []

    def timed_app(environ, start_response):  # noqa: ANN001, ANN202
        c0, t0 = time.thread_time(), time.perf_counter()
        out = app(environ, start_response)
        handler.append((time.perf_counter() - t0, time.thread_time() - c0))
        return out

    httpd = make_server("127.0.0.1", 0, timed_app, ThreadingWSGIServer, handler_class=_SilentHandler)
    port = httpd.server_address[1]
    server = threading.Thread(target=httpd.serve_forever, daemon=True)
    server.start()

    def gaps_during(with_client: bool, busy: bool = True) -> tuple[list[float], str]:
        stop, gaps = threading.Event(), []
        th = threading.Thread(target=ticker, args=(stop, gaps), daemon=True)
        if busy:
            th.start()
        if with_client:
            out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(scrapes)], capture_output=True,
                                 text=True, timeout=300, check=True).stdout
        else:
            time.sleep(scrapes * 0.0065)
            out = ""
        stop.set()
        if busy:
            th.join()
        return gaps, out

    _, idle_out = gaps_during(True, busy=False)
    base_gaps, _ = gaps_during(False)
    handler.clear()
    scrape_gaps, client_out = gaps_during(True)
    idle_p50, idle_p99, _size = idle_out.split()
    p50, p99, _size = client_out.split()
    httpd.shutdown()
    httpd.server_close()
    probe.close()

    def q(v: list[float], f: float) -> float:
        v = sorted(v)
        return v[int(f * (len(v) - 1))] if v else 0.0

    h_wall = [w for w, _ in handler]
    h_cpu = [c for _, c in handler]
    return {
        "exposition_bytes": len(body),
        "server: handler_ms_p50 (wall)": q(h_wall, 0.5) * 1e3, "server: handler_ms_p99 (wall)": q(h_wall, 0.99) * 1e3,
        "server: handler_cpu_ms_p50 (GIL bound)": q(h_cpu, 0.5) * 1e3,
        "server: handler_cpu_ms_p99 (GIL bound)": q(h_cpu, 0.99) * 1e3,
        "server: handler_cpu_ms_max (GIL bound)": max(h_cpu) * 1e3,
        "client: scrape_ms_p50, idle process": float(idle_p50) * 1e3,
        "client: scrape_ms_p99, idle process": float(idle_p99) * 1e3,
        "client: scrape_ms_p50, busy Python thread": float(p50) * 1e3,
        "client: scrape_ms_p99, busy Python thread": float(p99) * 1e3,
        "training thread: longest stall, no scrapes (ms)": max(base_gaps) * 1e3,
        "training thread: longest stall, scraping (ms)": max(scrape_gaps) * 1e3,
        "training thread: stalls > 1 ms, no scrapes": sum(g > 1e-3 for g in base_gaps),
        "training thread: stalls > 1 ms, scraping": sum(g > 1e-3 for g in scrape_gaps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--scrapes", type=int, default=300)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
    hot = bench_hot_path(args.rounds, args.steps)
    print("\nhot path (one step, five sections; median over rounds):")
    for k, v in hot.items():
        print(f"  {k:45s} {v:.3f}" if isinstance(v, float) else f"  {k:45s} {v}")
    ok = hot["cpu: probe_overhead_us_per_section_median"] <= 3.0
    print(f"  target <= 3 us per section: {'met' if ok else 'MISSED'}; device synchronisations: 0 (CPU path)")
    sc = bench_scrape(args.scrapes)
    print(f"\nscrape of one rank's endpoint ({args.scrapes} scrapes):")
    for k, v in sc.items():
        print(f"  {k:45s} {v:.3f}" if isinstance(v, float) else f"  {k:45s} {v}")
    # The rank's own cost of a scrape: the handler's time in its server thread. The client's
    # latency adds the OS scheduling of a third process on a shared machine.
    ok = sc["server: handler_ms_p50 (wall)"] <= 2 and sc["server: handler_cpu_ms_p99 (GIL bound)"] <= 2
    print(f"  target scrape <= 2 ms (handler p50) and GIL held <= 2 ms (handler CPU p99): {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
