"""The scale-out path: live probes scraped by a real Prometheus that remote-writes to a real
VictoriaMetrics; the detector's live cycle runs unchanged against VictoriaMetrics' Prometheus
API and sees what it sees through Prometheus."""

from __future__ import annotations

import threading

import pytest
from conftest import scrape_config, wait_until

from rankwatch import promserver
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.metrics import DetectorMetrics
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.service import DetectorService
from rankwatch.detectors.source import PromSource
from rankwatch.exporters.identity import RankIdentity
from rankwatch.exporters.probe import Probe

WINDOW = 3.0


def feed(probes: list[Probe], stop: threading.Event) -> None:
    """Synchronous steps of 50 ms; rank 3 computes 40 % longer and waits less in comm."""
    n = 0
    while not stop.wait(0.05):
        n += 1
        for p in probes:
            slow = p.identity.rank == 3
            fwd, bwd = (0.014, 0.028) if slow else (0.01, 0.02)
            p.record_step(0.05, {"dataloader": 0.002, "forward": fwd, "backward": bwd, "comm": 0.048 - fwd - bwd},
                          tokens=2048, step=n)


def newest_common_sample(url: str, ranks: int) -> float | None:
    """The data time up to which every rank's step counter has a sample in the store at
    ``url`` (the oldest of their newest samples), or None before every rank has one."""
    rows = promserver.query(url, "timestamp(rankwatch_steps_total)")
    if len(rows) < ranks:
        return None
    return min(float(r["value"][1]) for r in rows)


@pytest.mark.slow
def test_live_cycle_against_victoria_metrics_fed_by_remote_write(prometheus_factory) -> None:
    probes = [Probe("vm-run", port=0, identity=RankIdentity(rank=r, local_rank=r, world_size=4, node="node-a",
                                                            pp=r // 2, tp=0, dp=r % 2, gpu=r),
                    wandb_run=None, cuda_timing=False) for r in range(4)]
    # port=0 records without serving: serve each probe on a free loopback port instead
    from prometheus_client import start_http_server

    servers, targets = [], []
    for p in probes:
        port = promserver.free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=p.registry))
        targets.append(f"127.0.0.1:{port}")
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(probes, stop), daemon=True)
    feeder.start()
    vm = promserver.start_victoria_metrics(extra_args=["-search.latencyOffset=0s", "-search.disableCache"])
    prom = None
    try:
        cfg = scrape_config({"training-probes": targets}, interval="1s")
        cfg += (f"remote_write:\n  - url: {vm.url}/api/v1/write\n"
                "    queue_config: {batch_send_deadline: 500ms, max_samples_per_send: 500, min_backoff: 100ms}\n")
        prom = prometheus_factory(cfg)
        stores = (prom.url, vm.url)
        for url in stores:
            promserver.wait_for_series(url, "rankwatch_steps_total", min_series=4)
        wait_until(lambda: all(newest_common_sample(url, 4) for url in stores), "every rank in both stores")
        first = max(newest_common_sample(url, 4) or 0.0 for url in stores)
        # Evaluate at a data time whose whole window has reached both stores (remote write
        # lands later than the scrape, by however long the machine takes): wait for the data.
        wait_until(lambda: min(newest_common_sample(url, 4) or 0.0 for url in stores) >= first + WINDOW + 2,
                   "a full window of samples in Prometheus and in VictoriaMetrics")
        t = float(int(min(newest_common_sample(url, 4) or 0.0 for url in stores)))
        config = DetectorConfig(interval_s=1.0, window_s=WINDOW)
        snaps = {}
        for name, url in (("victoria", vm.url), ("prometheus", prom.url)):
            src = PromSource(PromClient(PromConnection(url=url, timeout_s=10)), config.window_s,
                             config.efa_error_counters)
            metrics = DetectorMetrics(config.interval_s)
            svc = DetectorService(src, DetectorCore(config), interval_s=config.interval_s, metrics=metrics)
            res = svc.run_cycle(t)
            assert res.errors == [], f"{name}: {res.errors}"
            snaps[name] = src.snapshot(t)
            assert metrics.registry.get_sample_value("rankwatch_detector_observed", {"kind": "ranks"}) == 4
            src.close()
    finally:
        stop.set()
        feeder.join()
        if prom is not None:
            prom.stop()  # before VictoriaMetrics: Prometheus would wait to flush its remote-write queue
        vm.stop()
        for srv, _thread in servers:
            srv.shutdown()
        for p in probes:
            p.close()
    vmv, pr = snaps["victoria"], snaps["prometheus"]
    assert [(r.run, r.rank, r.node, r.pp, r.dp, r.gpu, r.up) for r in vmv.ranks] == \
           [(r.run, r.rank, r.node, r.pp, r.dp, r.gpu, r.up) for r in pr.ranks] == \
           [("vm-run", k, "node-a", k // 2, k % 2, str(k), True) for k in range(4)]
    for a, b in zip(vmv.ranks, pr.ranks, strict=True):
        # MetricsQL's rate() does not extrapolate like PromQL's: close, not equal
        assert a.steps_rate == pytest.approx(b.steps_rate, rel=0.35)
        assert set(a.sections) == set(b.sections) == {"dataloader", "forward", "backward", "comm"}
        assert a.step is not None and a.last_step_time is not None
    # through either store, rank 3 computes the most and waits the least
    for snap in (vmv, pr):
        comp = {r.rank: r.compute_seconds for r in snap.ranks}
        comm = {r.rank: r.comm_seconds for r in snap.ranks}
        assert max(comp, key=comp.get) == 3 and min(comm, key=comm.get) == 3
