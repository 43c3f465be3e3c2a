"""A simulated compute node: simulated NVML GPUs and a fake EFA sysfs tree, read by the real
collectors and served by the real node exporter.

Simulated time comes from one clock (wall time by default). GPU values follow it on their own
(the simulated NVML integrates its counters when asked); the EFA tree's counter files are
advanced at the start of each collection by the time elapsed since the previous one, in steps
of at least a second. So an idle simulated node does nothing between scrapes, like the real
exporter, and a scrape always sees counters that moved with the clock.

    node = SimulatedNode("node-07")            # 8 H100 + 32 EFA devices, like a p5.48xlarge
    server = node.serve("127.0.0.1", 0)
    node.nvml.inject(3, "thermal"); node.efa.inject(5, "retransmits", rate=2000)
    ...
    server.stop(); node.close()
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rankwatch.exporters.base import Collector
from rankwatch.exporters.node import ExporterServer, NodeExporter
from rankwatch.sim.nvml import ManualClock, SimulatedNVML
from rankwatch.sim.sysfs import FakeEfaSysfs

log = logging.getLogger(__name__)

_MIN_STEP_S = 1.0  # rewriting ~1 000 counter files costs a few ms: at most once a second


class SimulatedNode:
    """``gpus`` simulated GPUs and ``efa`` fake EFA devices behind a NodeExporter.

    ``sysfs_root``: where the fake tree is written (a temporary directory, removed by close(),
    by default). With ``efa=0`` an existing tree there (a test fixture) is read as it is.
    ``frozen_at``: a Unix time at which simulated time stands still, for reproducible output.
    """

    def __init__(self, hostname: str, *, gpus: int = 8, efa: int = 32, seed: int = 0,
                 sysfs_root: str | Path | None = None, frozen_at: float | None = None,
                 clock: Callable[[], float] | None = None, collect_gpu: bool = True, collect_efa: bool = True,
                 efa_timeout: float = 1.0, collector_timeout: float = 4.0,
                 job_mapping_dir: str | None = None, node_exporter_compat: bool = False) -> None:
        from rankwatch.exporters.efa import EfaCollector
        from rankwatch.exporters.gpu import GpuCollector

        self.hostname = hostname
        if clock is None:
            clock = ManualClock(frozen_at) if frozen_at is not None else time.time
        self.clock = clock
        self._owns_root = sysfs_root is None
        if sysfs_root is None:
            sysfs_root = tempfile.mkdtemp(prefix=f"rankwatch-sysfs-{hostname}-")
        self.sysfs_root = Path(sysfs_root)
        self.nvml = SimulatedNVML(hostname, gpu_count=gpus, seed=seed, clock=clock)
        self.efa: FakeEfaSysfs | None = None
        if efa > 0:
            self.efa = FakeEfaSysfs(self.sysfs_root, devices=efa, seed=f"{seed}:{hostname}",
                                    node_exporter_compat=node_exporter_compat)
        self._last_advance = clock()
        self._advance_lock = threading.Lock()
        collectors: list[Collector] = []
        if collect_gpu:
            collectors.append(GpuCollector(nvml=self.nvml, hostname=hostname, job_mapping_dir=job_mapping_dir))
        if collect_efa:
            collectors.append(EfaCollector(self.sysfs_root, timeout=efa_timeout))
        self.exporter = NodeExporter(collectors, hostname, collector_timeout=collector_timeout,
                                     before_collect=self.advance_to_now)
        self._server: ExporterServer | None = None

    def advance_to_now(self) -> None:
        """Bring the EFA counter files up to the simulated clock (GPU values follow it already)."""
        if self.efa is None:
            return
        with self._advance_lock:
            now = self.clock()
            elapsed = now - self._last_advance
            if elapsed >= _MIN_STEP_S:
                self.efa.advance(elapsed)
                self._last_advance = now

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ExporterServer:
        self._server = self.exporter.serve(host, port)
        return self._server

    def close(self) -> None:
        """Stop serving, close the collectors, release wedged readers, remove an owned tree."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self.efa is not None:
            self.efa.close()
        self.exporter.close()
        if self._owns_root:
            shutil.rmtree(self.sysfs_root, ignore_errors=True)

    def __enter__(self) -> SimulatedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
