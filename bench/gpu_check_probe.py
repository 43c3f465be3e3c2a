"""Check the probe's CUDA-event path on a real GPU (run it on a machine with one; ~1 minute):

    python bench/gpu_check_probe.py [--steps 50] [--size 8192]

It prints, and exits non-zero if a check fails:

1. synchronisations: ``torch.cuda.synchronize``, ``Event.synchronize``/``wait`` and
   ``Stream.synchronize`` are wrapped to count calls while the probed loop runs, with
   ``torch.cuda.set_sync_debug_mode("error")`` on as well; and the host must get ahead of the
   GPU: enqueueing the whole loop must take well under the GPU's time for it (a stalled host
   would take as long);
2. accuracy: the probe's mean time per section (GPU-heavy ``forward``/``backward`` sections and a
   host-bound ``dataloader``) against the same work timed with ``torch.cuda.synchronize()``
   before and after — within 5 %;
3. overhead: host time per section of the CUDA-event path (two event records, pooled) against
   the floor of two ``perf_counter_ns`` calls, empty sections.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from rankwatch import Probe
from rankwatch.exporters.identity import RankIdentity


@contextlib.contextmanager
def count_syncs():
    calls: list[str] = []
    patched = []

    def wrap(owner, name):  # noqa: ANN001, ANN202
        orig = getattr(owner, name)

        def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return orig(*a, **k)
        setattr(owner, name, counting)
        patched.append((owner, name, orig))

    wrap(torch.cuda, "synchronize")
    wrap(torch.cuda.Event, "synchronize")
    wrap(torch.cuda.Event, "wait")
    wrap(torch.cuda.Stream, "synchronize")
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield calls
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)


def work(x: torch.Tensor, n: int) -> None:
    for _ in range(n):
        torch.mm(x, x, out=x.new_empty(x.shape))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=8192)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    torch.cuda.init()
    dev = torch.cuda.current_device()
    print(f"device {dev}: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    x = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    fwd_n, bwd_n, host_s = 4, 8, 0.002
    work(x, 20)
    torch.cuda.synchronize()

    probe = Probe(run="gpu-check", port=0, wandb_run=None, cuda_timing=True,
                  identity=RankIdentity.from_env())
    with probe.step():  # enables the CUDA path
        pass
    ok = True
    with count_syncs() as syncs:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with probe.step(tokens=1):
                with probe.section("dataloader"):
                    time.sleep(host_s)
                with probe.section("forward"):
                    work(x, fwd_n)
                with probe.section("backward"):
                    work(x, bwd_n)
        host = time.perf_counter() - t0
        pending_at_end = probe._cuda.pending if probe._cuda is not None else -1
    torch.cuda.synchronize()
    gpu = time.perf_counter() - t0
    probe.close()
    t = probe.totals()
    print(f"\n1. synchronisation calls in the probed loop: {len(syncs)} {sorted(set(syncs))}")
    print(f"   host enqueued {args.steps} steps in {host * 1e3:.1f} ms, GPU finished after {gpu * 1e3:.1f} ms; "
          f"{pending_at_end} section timings were still pending when the loop ended")
    if syncs or host > 0.6 * gpu:
        ok = False
        print("   FAIL: the probe made the host wait for the GPU")
    if probe._cuda is None:
        print("   FAIL: the CUDA path was not enabled")
        return 1

    ref: dict[str, list[float]] = {"forward": [], "backward": [], "dataloader": []}
    for _ in range(20):
        for name, fn in (("forward", lambda: work(x, fwd_n)), ("backward", lambda: work(x, bwd_n)),
                         ("dataloader", lambda: time.sleep(host_s))):
            torch.cuda.synchronize()
            s = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ref[name].append(time.perf_counter() - s)
    print("\n2. mean seconds per section: probe (CUDA events, read back later) vs synchronize-timed")
    for name, vals in ref.items():
        total, count = t.sections.get(name, (0.0, 0))
        mean = total / count if count else float("nan")
        r = statistics.median(vals)
        err = mean / r - 1
        flag = "ok" if count == args.steps and abs(err) <= 0.05 else "FAIL"
        ok &= flag == "ok"
        print(f"   {name:10s} probe {mean * 1e3:8.3f} ms ({count} sections)  reference {r * 1e3:8.3f} ms  "
              f"error {err * 100:+.1f} %  {flag}")

    floor_runs, probe_runs = [], []
    empty = Probe(run="gpu-overhead", port=0, wandb_run=None, cuda_timing=True, identity=RankIdentity())
    with empty.step():
        pass
    for _ in range(10):
        s = time.perf_counter()
        for _ in range(1000):
            for _ in range(5):
                time.perf_counter_ns()
                time.perf_counter_ns()
        floor_runs.append((time.perf_counter() - s) / 5000)
        s = time.perf_counter()
        for _ in range(1000):
            with empty.step():
                for name in ("dataloader", "forward", "backward", "optimizer", "comm"):
                    with empty.section(name):
                        pass
        probe_runs.append((time.perf_counter() - s) / 5000)
    empty.close()
    over = statistics.median(p - f for p, f in zip(probe_runs, floor_runs, strict=True))
    print(f"\n3. CUDA-event path host overhead: {over * 1e6:.2f} us per section (incl. the step's share), "
          f"floor {statistics.median(floor_runs) * 1e6:.2f} us")
    print("\nresult:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
