"""gpu-check's I/O: NVML through the real GPU collector, `nvidia-smi`, a matmul load, the probe.

Everything outside rankwatch is reached through :class:`Edges`, so that the same run can be
made against a simulated NVML and a simulated `nvidia-smi` on a CPU (the tests do).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rankwatch.errors import RankwatchError
from rankwatch.exporters.exposition import render
from rankwatch.gpucheck import checks as C
from rankwatch.gpucheck.smi import parse_smi_xml

LoadFn = Callable[[list[int]], contextlib.AbstractContextManager[None]]


class NoGpu(RankwatchError):
    """No NVIDIA GPU (or driver) on this machine: gpu-check has nothing to check."""


@dataclass
class Edges:
    """The outside world gpu-check talks to."""

    nvml: Any
    smi_xml: Callable[[], str]
    smi_query: Callable[[], None] | None  # one plain ``nvidia-smi -q``, for the timing comparison
    load: LoadFn | None  # a context manager keeping the given GPUs busy
    probe_check: Callable[[], list[C.Check]] | None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    why_no_load: str = ""
    why_no_probe: str = ""


@dataclass
class Report:
    checks: list[C.Check]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return C.verdict(self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **self.meta, "checks": [c.as_dict() for c in self.checks]}


def _run_smi(nvidia_smi: str, *args: str) -> str:
    try:
        done = subprocess.run([nvidia_smi, *args], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RankwatchError(f"{nvidia_smi} {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise RankwatchError(f"{nvidia_smi} {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[:300]}")
    return done.stdout


def _torch_load(torch: Any) -> LoadFn:
    @contextlib.contextmanager
    def load(gpus: list[int]) -> Iterator[None]:
        stop = threading.Event()

        def spin(index: int) -> None:
            with torch.cuda.device(index):
                x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
                while not stop.is_set():
                    for _ in range(20):
                        x = torch.mm(x, x).clamp_(-1, 1)
                    torch.cuda.synchronize()  # a bounded queue, so that stopping is prompt

        threads = [threading.Thread(target=spin, args=(g,), daemon=True) for g in gpus]
        for t in threads:
            t.start()
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
    return load


def real_edges(nvidia_smi: str = "nvidia-smi", probe_steps: int = 50) -> Edges:
    """The real machine: pynvml, the nvidia-smi binary, torch on CUDA when it is there."""
    import pynvml

    smi = shutil.which(nvidia_smi) or nvidia_smi
    load: LoadFn | None = None
    probe: Callable[[], list[C.Check]] | None = None
    why = ""
    try:
        import torch

        if torch.cuda.is_available():
            load = _torch_load(torch)

            def probe() -> list[C.Check]:
                from rankwatch.gpucheck.probe_timing import run

                return run(steps=probe_steps)
        else:
            why = f"torch {torch.__version__} sees no CUDA device (a CPU build?)"
    except ImportError:
        why = "torch is not installed"
    return Edges(nvml=pynvml, smi_xml=lambda: _run_smi(smi, "-q", "-x"),
                 smi_query=lambda: (_run_smi(smi, "-q"), None)[1], load=load, probe_check=probe,
                 why_no_load=why, why_no_probe=why)


def detect(nvml: Any) -> tuple[str, int]:
    """Driver version and GPU count, or NoGpu naming why NVML cannot answer."""
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError subclasses, or OSError from ctypes
        raise NoGpu(f"no NVIDIA GPU here: NVML cannot start ({exc}). gpu-check needs a machine with "
                    "an NVIDIA GPU and its driver; nothing was checked.") from None
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        count = int(nvml.nvmlDeviceGetCount())
    finally:
        nvml.nvmlShutdown()
    if count == 0:
        raise NoGpu("NVML answers but lists 0 GPUs; nothing was checked.")
    return driver.decode() if isinstance(driver, bytes) else str(driver), count


def run_gpu_check(edges: Edges, *, load_s: float = 20.0, timing_runs: int = 5,
                  progress: Callable[[str], None] = lambda _msg: None) -> Report:
    from rankwatch.exporters.gpu import GpuCollector

    driver, count = detect(edges.nvml)
    gpus = list(range(count))
    progress(f"NVML: driver {driver}, {count} GPUs")
    collector = GpuCollector(nvml=edges.nvml, hostname=socket.gethostname(), rate_interval_s=0.5,
                             clock=edges.clock)
    out: list[C.Check] = []
    scrapes = 0
    scrape_times: list[float] = []

    def scrape() -> C.Scrape:
        nonlocal scrapes
        t0 = time.perf_counter()
        text = render(collector.collect()).decode()
        scrape_times.append(time.perf_counter() - t0)
        scrapes += 1
        return C.parse_scrape(text)

    try:
        listener = collector.xid_listener
        out.append(C.xid_registered(listener.registered if listener else [], gpus,
                                    None if listener else "the XID listener did not start (see the log)"))
        first = scrape()
        edges.sleep(1.0)
        second = scrape()
        smi = parse_smi_xml(edges.smi_xml())
        support = collector.support_report()
        out += C.families_present(second.reading, gpus, C.default_families(),
                                  {g: s["unsupported_calls"] for g, s in support.items()},
                                  gpm_off=[g for g, s in support.items() if s["gpm_off_reason"]])
        by_bus = {g.pci_bus_id.lower(): g for g in smi.gpus}
        for gpu in gpus:
            bus = second.pci_bus_ids.get(gpu, "")
            smi_gpu = by_bus.get(bus.lower())
            if smi_gpu is None:
                out.append(C.Check("= nvidia-smi", C.FAIL, f"nvidia-smi lists no GPU at {bus!r}", gpu))
                continue
            out += C.agrees_with_smi(gpu, second.reading.get(gpu, {}), smi_gpu)
        out += C.gpm_in_range(second.reading, gpus, {g: s["gpm_off_reason"] for g, s in support.items()
                                             if s["gpm_off_reason"]})
        out += C.energy_advances(first.reading, second.reading, gpus)
        for _ in range(timing_runs):
            scrape()
        if edges.smi_query is not None:
            smi_times = []
            for _ in range(max(timing_runs // 2, 1)):
                t0 = time.perf_counter()
                edges.smi_query()
                smi_times.append(time.perf_counter() - t0)
            out.append(C.scrape_vs_smi(statistics.median(scrape_times), statistics.median(smi_times)))
        if edges.load is None:
            out.append(C.Check("load raises utilisation, tensor activity, power", C.SKIP,
                               edges.why_no_load or "no way to load the GPUs"))
        else:
            progress(f"matmul load on {count} GPUs for {load_s:.0f} s")
            with edges.load(gpus):
                edges.sleep(load_s)
                loaded = scrape()
            out += C.load_rises(second.reading, loaded.reading, gpus)
        last = scrape()
        out.append(C.nvml_errors(last.errors, scrapes))
    finally:
        collector.close()
    if edges.probe_check is None:
        out.append(C.Check("probe: CUDA-event path", C.SKIP, edges.why_no_probe or "no CUDA"))
    else:
        progress("probe CUDA-event timing")
        out += edges.probe_check()
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "driver": driver, "gpus": [{"index": i, "name": g.name, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id}
                                       for i, g in enumerate(smi.gpus)],
            "nvidia_smi_driver": smi.driver_version}
    return Report(out, meta)

