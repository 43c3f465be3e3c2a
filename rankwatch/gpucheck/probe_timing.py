"""The probe's CUDA-event path on a real GPU: it never synchronises, and its section times agree
with synchronize-based timing within 5 %.

1. synchronisations: ``torch.cuda.synchronize``, ``Event.synchronize``/``wait`` and
   ``Stream.synchronize`` are wrapped to count calls while the probed loop runs, with
   ``torch.cuda.set_sync_debug_mode("error")`` on as well; and the host must get ahead of the
   GPU: enqueueing the whole loop must take well under the GPU's time for it.
2. accuracy: the probe's mean time per section (GPU-heavy ``forward``/``backward`` and a
   host-bound ``dataloader``) against the same work timed with ``torch.cuda.synchronize()``
   before and after.
3. overhead: host time per section of the CUDA-event path against two ``perf_counter_ns`` calls.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

from rankwatch.gpucheck.checks import FAIL, INFO, PASS, Check

TOLERANCE = 0.05


@contextlib.contextmanager
def count_syncs(torch: Any) -> Iterator[list[str]]:
    calls: list[str] = []
    patched = []

    def wrap(owner: Any, name: str) -> None:
        orig = getattr(owner, name)

        def counting(*a: Any, **k: Any) -> Any:
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


def run(steps: int = 50, size: int = 8192) -> list[Check]:
    """The three checks on GPU 0. Needs torch with CUDA."""
    import torch

    from rankwatch import Probe
    from rankwatch.exporters.identity import RankIdentity

    def work(x: Any, n: int) -> None:
        for _ in range(n):
            torch.mm(x, x, out=x.new_empty(x.shape))

    torch.cuda.init()
    x = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    fwd_n, bwd_n, host_s = 4, 8, 0.002
    work(x, 20)
    torch.cuda.synchronize()

    probe = Probe(run="gpu-check", port=0, wandb_run=None, cuda_timing=True, identity=RankIdentity.from_env())
    with probe.step():  # enables the CUDA path
        pass
    if probe._cuda is None:
        probe.close()
        return [Check("probe: CUDA-event path", FAIL, "the probe did not enable CUDA-event timing")]
    with count_syncs(torch) as syncs:
        t0 = time.perf_counter()
        for _ in range(steps):
            with probe.step(tokens=1):
                with probe.section("dataloader"):
                    time.sleep(host_s)
                with probe.section("forward"):
                    work(x, fwd_n)
                with probe.section("backward"):
                    work(x, bwd_n)
        host = time.perf_counter() - t0
    torch.cuda.synchronize()
    gpu = time.perf_counter() - t0
    probe.close()
    totals = probe.totals()
    no_sync = not syncs and host <= 0.6 * gpu
    checks = [Check("probe: never synchronises", PASS if no_sync else FAIL,
                    f"{len(syncs)} sync calls {sorted(set(syncs))}; host enqueued {steps} steps in "
                    f"{host * 1e3:.1f} ms, GPU done after {gpu * 1e3:.1f} ms")]

    ref: dict[str, list[float]] = {"forward": [], "backward": [], "dataloader": []}
    for _ in range(20):
        for name, fn in (("forward", lambda: work(x, fwd_n)), ("backward", lambda: work(x, bwd_n)),
                         ("dataloader", lambda: time.sleep(host_s))):
            torch.cuda.synchronize()
            s = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ref[name].append(time.perf_counter() - s)
    for name, vals in ref.items():
        total, count = totals.sections.get(name, (0.0, 0))
        mean = total / count if count else float("nan")
        r = statistics.median(vals)
        err = mean / r - 1
        ok = count == steps and abs(err) <= TOLERANCE
        checks.append(Check(f"probe: {name} time = synchronize timing", PASS if ok else FAIL,
                            f"probe {mean * 1e3:.3f} ms ({count} sections), reference {r * 1e3:.3f} ms, "
                            f"error {err * 100:+.1f} % (tolerance ±{TOLERANCE * 100:.0f} %)"))

    floor_runs, probe_runs = [], []
    empty = Probe(run="gpu-overhead", port=0, wandb_run=None, cuda_timing=True, identity=RankIdentity())
    with empty.step():
        pass
    for _ in range(10):
        s = time.perf_counter()
        for _ in range(5000):
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
    checks.append(Check("probe: host overhead per section", INFO,
                        f"{over * 1e6:.2f} µs over the floor of {statistics.median(floor_runs) * 1e6:.2f} µs "
                        "(CUDA-event path, step share included)"))
    return checks
