"""The detector at 2 048 ranks reaches the verdicts it reaches at 256: one injected straggler is
named, once, and nothing else fires — through live cycles against a real Prometheus (promtool
backfill) and a real VictoriaMetrics (import API) holding the same simulated samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankwatch import promserver
from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.prom_client import PromClient, PromConnection
from rankwatch.detectors.replay import ReplayDataset
from rankwatch.detectors.service import DetectorService, EventWriter
from rankwatch.detectors.source import PromSource
from rankwatch.sim.scale import ScaleJob, iter_chunks, simulate

SCRAPE = 15.0


def _job(ranks: int, pp: int) -> ScaleJob:
    # the straggler sits at the same place of its job in both sizes: a third of the way in
    return ScaleJob(ranks=ranks, pp=pp, duration_s=300.0, scrape_s=SCRAPE, step_s=2.0, straggler=ranks // 3,
                    magnitude=0.25, onset_s=60.0, nodes_sample=2, seed=5)


def _verdicts(url: str, job: ScaleJob, tmp: Path, name: str) -> list[dict]:
    config = DetectorConfig(interval_s=2 * SCRAPE, window_s=2 * SCRAPE)
    src = PromSource(PromClient(PromConnection(url=url, timeout_s=60)), config.window_s, config.efa_error_counters)
    events_file = tmp / f"{name}.jsonl"
    svc = DetectorService(src, DetectorCore(config), interval_s=config.interval_s,
                          writer=EventWriter(path=events_file))
    try:
        t = job.start_time + config.window_s
        while t <= job.start_time + job.duration_s:
            res = svc.run_cycle(t)
            assert res.errors == [], (name, res.errors)
            t += config.interval_s
    finally:
        svc.close()
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    return [{k: e.get(k) for k in ("kind", "state", "rank", "node")} for e in events]


@pytest.mark.slow
def test_one_straggler_gets_the_same_verdicts_at_256_and_2048_ranks(tmp_path: Path) -> None:
    verdicts = {}
    for ranks, pp in ((256, 4), (2048, 8)):
        job = _job(ranks, pp)
        tel = simulate(job)
        om = tmp_path / f"scale{ranks}.om"
        with om.open("w") as fh:
            for chunk in iter_chunks(tel, "openmetrics"):
                fh.write(chunk)
        vm = promserver.start_victoria_metrics(workdir=tmp_path / f"vm{ranks}")
        try:
            promserver.victoria_import(vm.url, iter_chunks(tel, "prometheus"))
            with ReplayDataset(om) as ds:
                verdicts[(ranks, "prometheus")] = _verdicts(ds.url, job, tmp_path, f"prom{ranks}")
            verdicts[(ranks, "victoria")] = _verdicts(vm.url, job, tmp_path, f"vm{ranks}")
        finally:
            vm.stop()
        om.unlink()
        straggler = {"kind": "straggler", "state": "firing", "rank": job.straggler,
                     "node": tel.node_names[job.straggler // job.gpus_per_node]}
        assert verdicts[(ranks, "prometheus")] == [straggler], ranks
    # the same verdicts whatever the size and whichever store: rank and node differ only by
    # where the third of the job falls
    shapes = {k: [(e["kind"], e["state"]) for e in v] for k, v in verdicts.items()}
    assert len(set(map(tuple, shapes.values()))) == 1, shapes
    assert verdicts[(2048, "victoria")] == verdicts[(2048, "prometheus")]
    assert verdicts[(256, "victoria")] == verdicts[(256, "prometheus")]
