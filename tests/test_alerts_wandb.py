"""W&B alerts in offline mode, read back from the run's local transaction log."""

from __future__ import annotations

from pathlib import Path

from rankwatch.alerts import AlertSink, load_alerting_config
from rankwatch.alerts.wandb_notifier import (
    monitor_run_id,
    offline_alerts,
    offline_history,
    read_transaction_log,
)
from rankwatch.events import Event

T0 = 1_790_000_000.0


def ev(rank: int, state: str = "firing", t: float = T0, severity: str = "warning") -> Event:
    return Event(time=t, kind="straggler", state=state, run="llama-cpt-7", rank=rank, node="p5-001", gpu=str(rank % 8),
                 score=6.0 + rank, summary=f"Rank {rank} computes 18 % slower than its peers.",
                 evidence={"slowdown": 0.18}, episode=f"ep{rank}", severity=severity, since=t - 30)


def test_monitor_run_gets_one_alert_per_incident_and_the_scores(tmp_path: Path) -> None:
    doc = {"wandb": {"project": "llama", "mode": "offline", "group": "llama-cpt"}, "notify": {"group_wait_s": 0}}
    state = tmp_path / "state"
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=state, start_thread=False)
    sink.publish([ev(3), ev(4, severity="critical")])  # one incident, two ranks
    sink.log_scores("llama-cpt-7", T0, {0: 0.1, 1: 0.3, 3: 6.2, 4: 7.9})
    assert sink.flush(timeout=60) == 0
    sink.publish([ev(3, "resolved", T0 + 300), ev(4, "resolved", T0 + 300)])
    sink.publish([ev(3)])  # a duplicate after resolution is not a new alert
    assert sink.flush(timeout=60) == 0
    sink.close()

    alerts = offline_alerts(state / "wandb")
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("#1 Straggler: 2 ranks on 1 node", "ERROR"),
        ("Resolved #1: Straggler: 2 ranks on 1 node", "INFO"),
    ]
    assert "Rank 4 computes 18 % slower" in alerts[0]["text"] and "Affected ranks: 3–4" in alerts[0]["text"]
    assert alerts[0]["wait_duration_ms"] == 60000
    assert {a["run_id"] for a in alerts} == {monitor_run_id("llama-cpt-7")}

    rows = offline_history(state / "wandb")
    scores = [r for r in rows if "rankwatch/score/rank_1" in r]
    assert scores and scores[0]["rankwatch/score/rank_4"] == 7.9 and scores[0]["rankwatch/max_score"] == 7.9

    # A separate monitor run in the training run's group, never the training run itself.
    [log] = list((state / "wandb").rglob("run-*.wandb"))
    runs = [r.run for r in read_transaction_log(log) if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "llama-cpt" and runs[0].job_type == "rankwatch-monitor"
    assert runs[0].project == "llama" and runs[0].run_id == monitor_run_id("llama-cpt-7")


def test_offline_alerts_count_a_run_reached_under_two_names_once(tmp_path: Path) -> None:
    doc = {"wandb": {"project": "llama", "mode": "offline"}, "notify": {"group_wait_s": 0}}
    state = tmp_path / "state"
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=state, start_thread=False)
    sink.publish([ev(3)])
    assert sink.flush(timeout=60) == 0
    sink.close()
    wandb_dir = state / "wandb"
    [log] = list(wandb_dir.rglob("run-*.wandb"))
    # W&B's own latest-run link to the run directory, and the same log linked through it
    runs_dir = log.parent.parent
    assert (runs_dir / "latest-run").resolve() == log.parent.resolve()
    (runs_dir / log.name).symlink_to(Path("latest-run") / log.name)
    assert [a["title"] for a in offline_alerts(wandb_dir)] == ["#1 Straggler: rank 3 on p5-001 (GPU 3)"]
    assert len([r for r in offline_history(wandb_dir) if r]) == len([r for r in offline_history(log.parent) if r])


def test_monitor_run_is_written_under_wandb_dir_when_it_is_set(tmp_path: Path, monkeypatch) -> None:
    """WANDB_DIR decides where W&B writes, as for every other wandb.init: not the state directory."""
    elsewhere = tmp_path / "wandb-dir"
    elsewhere.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    doc = {"wandb": {"project": "llama", "mode": "offline"}, "notify": {"group_wait_s": 0}}
    state = tmp_path / "state"
    sink = AlertSink(load_alerting_config(doc, environ={}), state_dir=state, start_thread=False)
    sink.publish([ev(5)])
    assert sink.flush(timeout=60) == 0
    sink.close()
    assert [a["title"] for a in offline_alerts(elsewhere)] == ["#1 Straggler: rank 5 on p5-001 (GPU 5)"]
    assert not (state / "wandb").exists()
