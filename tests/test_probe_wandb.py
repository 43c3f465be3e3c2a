"""The probe's W&B reporting with the real wandb client in offline mode, checked by reading the
run's local transaction log (``run-<id>.wandb``): history rows, metric definitions and the
``alert`` records that ``run.alert`` writes offline (``wandb sync`` would send them)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from rankwatch import Probe  # noqa: E402
from rankwatch.exporters.identity import RankIdentity  # noqa: E402

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def read_records(path: Path) -> list[pb.Record]:
    """Records of a .wandb file: LevelDB log framing (32 KiB blocks, 7-byte record headers:
    crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4) around protobuf ``Record``s."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pieces, frags = HEADER, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        frag = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pieces.append(frag)
        elif kind == 2:
            frags = frag
        elif kind == 3:
            frags += frag
        elif kind == 4:
            pieces.append(frags + frag)
    records = []
    for raw in pieces:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def run_log(wandb_dir: Path) -> list[pb.Record]:
    files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return read_records(files[0])


def alerts(records: list[pb.Record]) -> list[pb.AlertRecord]:
    return [r.alert for r in records if r.WhichOneof("record_type") == "alert"]


def history_rows(records: list[pb.Record]) -> list[dict[str, object]]:
    return [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb keeps process-wide settings (its run directory among them) from the first
    # wandb.init of the process: forget whatever an earlier test left so WANDB_DIR applies.
    wandb.teardown()
    had_service = "WANDB_SERVICE" in os.environ
    yield tmp_path
    # Stop the wandb-core service an in-process wandb.init started, and forget it.
    wandb.teardown()
    if not had_service:
        os.environ.pop("WANDB_SERVICE", None)


def test_rank0_logs_throughput_and_sections_and_alerts_on_failure(offline: Path) -> None:
    run = wandb.init(project="rankwatch-test", mode="offline")
    probe = Probe(run="llama-test", port=0, wandb_run=run, wandb_every=2,
                  identity=RankIdentity(rank=0, world_size=1, node="n0"))
    try:
        for step in range(1, 5):
            probe.record_step(0.5, {"forward": 0.2, "backward": 0.25}, tokens=1000, step=step)
            run.log({"loss": 1.0 / step})  # the training script's own logging commits the row
        probe.close(RuntimeError("CUDA error: an illegal memory access was encountered"))
    finally:
        run.finish()
        wandb.teardown()  # finish() can return before wandb-core has written the log out
    records = run_log(offline)
    rows = [r for r in history_rows(records) if "rankwatch/step" in r]
    assert [r["rankwatch/step"] for r in rows] == [2, 4]
    assert rows[-1]["rankwatch/step_time_s"] == pytest.approx(0.5)
    assert rows[-1]["rankwatch/section/backward_s"] == pytest.approx(0.25)
    assert rows[-1]["rankwatch/tokens_per_s"] > 0
    assert all("loss" in r for r in rows)  # joined the user's rows, never a row of its own
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "rankwatch/*" and m.step_metric == "rankwatch/step" for m in metrics)
    (alert,) = alerts(records)
    assert alert.title == "Training run llama-test failed" and alert.level == "ERROR"
    assert "rank 0 on n0: RuntimeError: CUDA error" in alert.text and "4 steps completed" in alert.text
    assert probe.errors == 0


def test_a_broken_wandb_run_never_reaches_the_training_loop(offline: Path) -> None:
    run = wandb.init(project="rankwatch-test", mode="offline")
    run.finish()  # logging to a finished run raises inside the wandb client
    probe = Probe(run="t", port=0, wandb_run=run, wandb_every=1,
                  identity=RankIdentity(rank=0, world_size=1, node="n0"))
    for step in range(3):
        with probe.step(tokens=1, step=step):
            pass
    probe.close()
    assert probe.totals().steps == 3
    assert probe.errors >= 1


SCRIPT = textwrap.dedent("""
    import os, sys, wandb, rankwatch
    wandb.init(project="rankwatch-test", mode="offline")
    probe = rankwatch.Probe(run="auto-run", port=0, wandb_every=1000)   # finds wandb.run itself
    for step in range(1, 6):
        with probe.step(tokens=10, step=step):
            with probe.section("forward"):
                pass
    if sys.argv[1] == "fail":
        raise ValueError("loss is NaN")
""")


@pytest.mark.parametrize("outcome", ["fail", "complete"])
def test_uncaught_exception_or_normal_exit_alerts_without_explicit_close(
        outcome: str, offline: Path, subprocess_env: dict[str, str]) -> None:
    # An in-process wandb.init (earlier test) exports WANDB_SERVICE: a child must start its own.
    env = {k: v for k, v in subprocess_env.items() if k != "WANDB_SERVICE"}
    env.update({"RANK": "0", "WORLD_SIZE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(offline),
                "WANDB_SILENT": "true"})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, outcome], env=env, capture_output=True,
                          text=True, timeout=600)
    assert (proc.returncode != 0) == (outcome == "fail"), proc.stderr
    (alert,) = alerts(run_log(offline))
    if outcome == "fail":
        assert alert.title == "Training run auto-run failed" and alert.level == "ERROR"
        assert "ValueError: loss is NaN" in alert.text and "5 steps completed (last step 5)" in alert.text
        assert "ValueError: loss is NaN" in proc.stderr  # the user's traceback is still printed
    else:
        assert alert.title == "Training run auto-run completed" and alert.level == "INFO"
        assert "5 steps completed" in alert.text and "50 tokens" in alert.text


def test_spread_names_the_slowest_compute_and_the_least_waiting_rank() -> None:
    from rankwatch.exporters.probe import ProbeTotals
    from rankwatch.integrations.wandb_reporter import interval_summary, spread

    def summary(rank: int, fwd: float, comm: float) -> dict[str, object]:
        prev = ProbeTotals(steps=10, step_seconds=10.0, tokens=100, sections={"forward": (1.0, 10), "comm": (1.0, 10)})
        cur = ProbeTotals(steps=20, step_seconds=20.0, tokens=300,
                          sections={"forward": (1.0 + 10 * fwd, 20), "comm": (1.0 + 10 * comm, 20)})
        return interval_summary(prev, cur, wall_seconds=10.0, rank=rank)

    s = [summary(0, 0.50, 0.30), summary(1, 0.52, 0.28), summary(2, 0.70, 0.10), summary(3, 0.49, 0.31)]
    assert s[2]["sections"]["forward"] == pytest.approx(0.70) and s[2]["step_time_s"] == pytest.approx(1.0)
    out = spread(s)
    assert out["rankwatch/spread/forward/max_rank"] == 2 and out["rankwatch/spread/comm/min_rank"] == 2
    assert out["rankwatch/spread/forward/median_s"] == pytest.approx(0.51)
    assert out["rankwatch/spread/forward/rel_spread"] == pytest.approx(0.70 / 0.51 - 1)
    assert out["rankwatch/tokens_per_s_all_ranks"] == pytest.approx(4 * 200 / 10.0)
