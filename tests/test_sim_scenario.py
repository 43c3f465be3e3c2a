"""Scenario replay files: accepted by the real promtool, carry the series the detector reads
with job/instance labels, agree with the direct Snapshot path; the CLI writes them."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from rankwatch import promserver
from rankwatch.sim.scenario import Scenario, simulate, snapshot_at, suite, write_openmetrics
from rankwatch.sim.training import Fault, Layout

SMALL = dict(layout=Layout(tp=2, pp=2, dp=1), nodes=1, gpus_per_node=4, duration_s=60.0, seed=3)


def test_openmetrics_is_backfilled_by_promtool(tmp_path):
    sc = Scenario("small", faults=[Fault("xid79", node=0, gpu=1, start_s=30.0)], **SMALL)
    tel = simulate(sc)
    path = tmp_path / "small.om"
    with path.open("w") as fh:
        n = write_openmetrics(tel, fh)
    text = path.read_text()
    assert text.endswith("# EOF\n") and n == sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    promserver.backfill_openmetrics(path, tmp_path / "tsdb")
    (tmp_path / "tsdb" / "wal").mkdir()  # promtool tsdb dump opens a head WAL, even an empty one
    dump = promserver.promtool("tsdb", "dump", str(tmp_path / "tsdb"))
    assert dump.returncode == 0, dump.stderr
    names = set(re.findall(r'__name__="([^"]+)"', dump.stdout))
    for name in ("up", "rankwatch_rank_info", "rankwatch_steps_total", "rankwatch_section_seconds_total",
                 "rankwatch_section_count_total", "rankwatch_last_step_timestamp_seconds", "rankwatch_node_info",
                 "rankwatch_gpu_expected", "rankwatch_gpu_answering", "DCGM_FI_DEV_SM_CLOCK",
                 "DCGM_EXP_GPU_HEALTH_STATUS", "DCGM_EXP_XID_ERRORS_COUNT", "DCGM_FI_DEV_XID_ERRORS",
                 "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "node_amazonefa_retrans_pkts"):
        assert name in names, name
    up = [ln for ln in dump.stdout.splitlines() if '__name__="up"' in ln]
    assert any('job="rankwatch-probe"' in ln and 'instance="node-00:9421"' in ln for ln in up)
    # the lost GPU's series stop while its node's others go on
    gpu1 = [ln for ln in dump.stdout.splitlines() if "DCGM_FI_DEV_SM_CLOCK" in ln and 'gpu="1"' in ln]
    gpu0 = [ln for ln in dump.stdout.splitlines() if "DCGM_FI_DEV_SM_CLOCK" in ln and 'gpu="0"' in ln]
    assert 0 < len(gpu1) < len(gpu0)


def test_replay_counters_match_the_snapshot_path():
    sc = Scenario("small", **SMALL)
    tel = simulate(sc)
    buf = io.StringIO()
    write_openmetrics(tel, buf)
    # steps counter of rank 3 at t = 60 s, read back from the text
    line = next(ln for ln in buf.getvalue().splitlines()
                if ln.startswith("rankwatch_steps_total{") and 'rank="3"' in ln and ln.endswith(f" {sc.start_time + 60:.3f}"))
    snap = snapshot_at(tel, 60.0, 15.0)
    assert float(line.split()[1]) == snap.ranks[3].step
    assert snap.ranks[3].pp == 1 and snap.ranks[3].node == "node-00" and snap.ranks[3].gpu == "3"


def test_suite_covers_every_fault_kind():
    names = {sc.name.split("-")[0] for sc in suite("small", 1)}
    assert {"healthy", "slowdown5", "slowdown10", "slowdown20", "slowdown50", "thermal", "dataloader", "xid79", "dbe",
            "efa", "hang", "jobslow", "spike"} <= names
    assert max(sc.layout.world for sc in suite("full", 1)) == 256


def test_cli_writes_replay_and_truth(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rankwatch", "sim", "scenario", "thermal", "--layout", "2x2x1",
                          "--gpus-per-node", "4", "--duration", "60", "--onset", "20", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    truth = json.loads((tmp_path / "thermal.truth.json").read_text())
    assert truth["faults"][0]["fault"] == "thermal" and truth["faults"][0]["node"] == "node-00"
    assert truth["faults"][0]["start"] == 1_750_000_020.0 and truth["world"] == 4
    assert (tmp_path / "thermal.om").read_text().endswith("# EOF\n")


@pytest.mark.parametrize(("args", "needle"), [(["--layout", "8x"], "--layout"), (["--onset", "999"], "--onset"),
                                              (["--rank", "99"], "--rank")])
def test_cli_rejects_bad_arguments(tmp_path, args, needle):
    res = subprocess.run([sys.executable, "-m", "rankwatch", "sim", "scenario", "slowdown", "--layout", "2x2x1",
                          "--gpus-per-node", "4", "--duration", "60", "--onset", "20", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_replay_file_through_detect_names_the_slowed_rank(tmp_path):
    """End to end: scenario file -> `rankwatch detect --replay` (promtool backfill, temporary
    Prometheus, PromQL) -> the same straggler the direct Snapshot path finds."""
    sc = Scenario("slow", layout=Layout(tp=2, pp=2, dp=2), nodes=2, gpus_per_node=4, duration_s=420.0, seed=4,
                  faults=[Fault("slowdown", rank=6, start_s=150.0, end_s=330.0, magnitude=0.25)])
    from rankwatch.sim.scenario import write_replay

    om, _, _ = write_replay(sc, tmp_path)
    res = subprocess.run([sys.executable, "-m", "rankwatch", "detect", "--replay", str(om)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    events = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    strag = [e for e in events if e["kind"] == "straggler"]
    assert [(e["state"], e["rank"]) for e in strag] == [("firing", 6), ("resolved", 6)]
    assert strag[0]["evidence"]["waits_least"] is True
    # the whole job slowed with it: a throughput drop may fire, but only blaming rank 6
    for e in events:
        if e["kind"] == "throughput_drop" and e["state"] == "firing":
            assert e["evidence"]["top_cause"]["rank"] == 6
    assert {e["kind"] for e in events} <= {"straggler", "throughput_drop"}
