"""Large-job replay data (`rankwatch sim scale`): files the real promtool backfills, the same
samples streamed into a real VictoriaMetrics, a node side with a real p5 node exporter's
series per node, a straggler that is where it was placed, and a text that never has to sit
on disk whole."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rankwatch import promserver
from rankwatch.detectors.replay import ReplayDataset
from rankwatch.sim.scale import ScaleJob, iter_chunks, simulate, write_parts

# 64 ranks (8 tp x 4 pp x 2 dp) on 8 nodes; node exporters on 2 of them; rank 42 (node-05) slow.
SMALL = dict(ranks=64, tp=8, pp=4, duration_s=300.0, scrape_s=15.0, step_s=1.0, straggler=42, magnitude=0.3,
             onset_s=120.0, nodes_sample=2)
COMPUTE = 'section=~"forward|backward|optimizer"'


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rankwatch", "sim", "scale", *args], capture_output=True, text=True,
                          timeout=timeout)


def _per_rank_compute(url: str, t: float) -> dict[int, float]:
    rows = promserver.query(url, f"sum by (rank) (rate(rankwatch_section_seconds_total{{{COMPUTE}}}[60s]))"
                                 " / on (rank) sum by (rank) (rate(rankwatch_steps_total[60s]))", t)
    return {int(r["metric"]["rank"]): float(r["value"][1]) for r in rows}


def test_cli_file_is_backfilled_and_holds_the_placed_straggler(tmp_path: Path) -> None:
    res = _cli("--ranks", "64", "--pp", "4", "--nodes-sample", "2", "--straggler", "42", "--magnitude", "0.3",
               "--onset", "120", "--duration", "300", "--step", "1", "--out", str(tmp_path), "--name", "big")
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("\n") and "2 of 8 nodes with exporters" in res.stdout
    truth = json.loads((tmp_path / "big.truth.json").read_text())
    assert truth["straggler"]["rank"] == 42 and truth["straggler"]["node"] == "node-05"
    # the straggler's node is always among the sampled ones
    assert "node-05" in truth["nodes_with_exporter"] and len(truth["nodes_with_exporter"]) == 2
    with ReplayDataset(tmp_path / "big.om") as ds:
        assert ds.samples == truth["samples"]
        t_end = ds.max_time
        assert len(promserver.query(ds.url, "rankwatch_rank_info", t_end)) == 64
        exporters = promserver.query(ds.url, "rankwatch_node_info", t_end)
        assert sorted(r["metric"]["Hostname"] for r in exporters) == sorted(truth["nodes_with_exporter"])
        # p5 density on each sampled node: 8 GPUs, 32 EFA devices
        assert len(promserver.query(ds.url, "DCGM_FI_DEV_SM_CLOCK", t_end)) == 16
        assert len(promserver.query(ds.url, "node_amazonefa_tx_bytes", t_end)) == 64
        before = _per_rank_compute(ds.url, ds.min_time + 110)
        after = _per_rank_compute(ds.url, t_end)
    peers = [after[r] for r in range(32, 48) if r != 42]  # rank 42's pp stage (ranks 32-47)
    assert after[42] > 1.2 * max(peers)
    assert before[42] < 1.05 * max(before[r] for r in range(32, 48) if r != 42)


def test_victoria_import_holds_the_same_samples_as_the_backfill(tmp_path: Path) -> None:
    """`--victoria-url` streams the Prometheus-text form into a real VictoriaMetrics; it answers
    the same series and values as the Prometheus that backfilled the OpenMetrics form."""
    job = ScaleJob(**SMALL)
    tel = simulate(job)
    om = tmp_path / "small.om"
    om.write_text("".join(iter_chunks(tel, "openmetrics")))
    vm = promserver.start_victoria_metrics(workdir=tmp_path / "vm")
    try:
        res = _cli("--ranks", "64", "--pp", "4", "--nodes-sample", "2", "--straggler", "42", "--magnitude", "0.3",
                   "--onset", "120", "--duration", "300", "--step", "1", "--out", str(tmp_path / "truth"),
                   "--victoria-url", vm.url)
        assert res.returncode == 0, res.stderr
        assert not list((tmp_path / "truth").glob("*.om")) and not list((tmp_path / "truth").glob("*.prom"))
        with ReplayDataset(om) as ds:
            t = ds.max_time
            for q in ("count by (__name__) ({__name__=~\"rankwatch_.*|DCGM_.*|node_amazonefa_.*|up\"})",
                      'rankwatch_step_seconds_total{rank=~"4.|7"}', "node_amazonefa_rx_drops",
                      "DCGM_FI_DEV_POWER_USAGE"):
                prom = {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                        for r in promserver.query(ds.url, q, t)}
                vic = {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                       for r in promserver.query(vm.url, q, t)}
                assert prom.keys() == vic.keys(), q
                for k, v in prom.items():
                    assert vic[k] == pytest.approx(v, rel=1e-9), (q, k)
    finally:
        vm.stop()


def test_node_side_has_a_real_p5_exporters_series_per_family() -> None:
    """For every family the writer puts on the node side, one node holds as many series as a
    real scrape of the node exporter on a simulated p5.48xlarge (8 GPUs, 32 EFA devices)."""
    from rankwatch.sim.node import SimulatedNode

    node = SimulatedNode("node-p5", gpus=8, efa=32, frozen_at=1_767_225_600.0)
    try:
        real = collections.Counter(re.match(r"[^{ ]+", ln).group(0)
                                   for ln in node.exporter.scrape().decode().splitlines() if ln and ln[0] != "#")
    finally:
        node.close()
    job = ScaleJob(ranks=8, tp=8, pp=1, duration_s=15.0)
    text = "".join(iter_chunks(simulate(job), "openmetrics"))
    first = f" {job.start_time:.3f}"
    written = collections.Counter(re.match(r"[^{ ]+", ln).group(0) for ln in text.splitlines()
                                  if ln.endswith(first) and 'instance="node-00:9410"' in ln)
    written.pop("up")  # Prometheus' own, not the exporter's
    assert len(written) >= 25
    assert {name: real[name] for name in written} == dict(written)


def test_parts_are_valid_files_that_add_up_to_the_whole(tmp_path: Path) -> None:
    tel = simulate(ScaleJob(**SMALL))
    whole = "".join(iter_chunks(tel, "openmetrics"))
    n = [0]
    parts = list(write_parts(tel, tmp_path / "parts", "small", 256 << 10, n))
    assert len(parts) > 5
    samples, families = [], collections.Counter()
    for p in parts:
        text = p.read_text()
        assert text.startswith("# TYPE ") and text.endswith("# EOF\n") and text.count("# EOF") == 1
        lines = text.splitlines()
        samples += [ln for ln in lines if ln[0] != "#"]
        families.update({ln.split()[2] for ln in lines if ln.startswith("# TYPE ")})
        assert p.stat().st_size < (256 << 10) + 64 * 1024  # about max_bytes: at most one scrape of one family more
    assert samples == [ln for ln in whole.splitlines() if ln[0] != "#"] and len(samples) == n[0]
    assert max(families.values()) > 1  # a family cut between two scrapes, its TYPE/HELP repeated
    # promtool backfills them one by one into one TSDB, which then holds every sample
    tsdb = tmp_path / "tsdb"
    for p in parts:
        promserver.backfill_openmetrics(p, tsdb, block_duration="1000h")
    total = sum(json.loads(m.read_text())["stats"]["numSamples"] for m in tsdb.glob("*/meta.json"))
    assert total == n[0]


def test_prometheus_text_form_has_millisecond_timestamps() -> None:
    job = ScaleJob(ranks=8, tp=8, pp=1, duration_s=30.0)
    text = "".join(iter_chunks(simulate(job), "prometheus"))
    samples = [ln for ln in text.splitlines() if ln and ln[0] != "#"]
    assert {ln.rsplit(" ", 1)[1] for ln in samples} == {"1750000000000", "1750000015000", "1750000030000"}
    assert "# EOF" not in text and "# HELP" not in text


@pytest.mark.parametrize(("args", "needle"), [
    (["--ranks", "100"], "not a multiple of tp x pp"),
    (["--ranks", "64", "--straggler", "64"], "straggler rank must be between 0 and 63"),
    (["--ranks", "64", "--nodes-sample", "0"], "nodes_sample must be at least 1"),
    (["--ranks", "64", "--scrape", "0"], "must be positive"),
    (["--ranks", "64", "--straggler", "3", "--onset", "900"], "--onset"),
])
def test_cli_rejects_bad_arguments_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _cli(*args, "--out", str(tmp_path))
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
