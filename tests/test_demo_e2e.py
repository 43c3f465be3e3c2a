"""The demo end to end on a small cluster (4 nodes × 4 GPUs, compressed timeline): every
scripted incident is caught with the right kind and entity, nothing else fires, the report is
written, and no process or port is left behind."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest
from rich.console import Console

from rankwatch.demo.cluster import NODE_EXPORTER_PORT, PROBE_BASE_PORT
from rankwatch.demo.runner import run_demo
from rankwatch.demo.scenario import DemoConfig

pytestmark = pytest.mark.slow


def small_config() -> DemoConfig:
    # Distinct loopback prefix so a demo the user runs meanwhile does not collide with the test.
    return DemoConfig(nodes=4, gpus_per_node=4, tp=4, pp=2, efa_per_node=2, seed=11,
                      step_seconds=0.4, scrape_interval=1.0, node_scrape_interval=1.0, eval_interval=3.0, window=3.0,
                      warmup_seconds=6.0, benign_seconds=8.0, incident_seconds=15.0, recovery_seconds=6.0,
                      tail_seconds=2.0, address_prefix="127.67")


def _descendants(pid: int) -> list[int]:
    """Every live process whose parent chain leads to ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    out = []
    for child in parents:
        p = child
        while p in parents and p != pid and p > 1:
            p = parents[p]
        if p == pid and child != pid:
            out.append(child)
    return out


def _port_open(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((addr, port)) == 0


def test_small_demo_catches_every_incident_and_cleans_up(tmp_path: Path) -> None:
    cfg = small_config()
    before = set(_descendants(os.getpid()))
    out = io.StringIO()
    result = run_demo(cfg, tmp_path / "report", live=False, console=Console(file=out, width=200))
    v = result.verdict
    table = "\n".join(f"{r.incident.name}: detected={r.detected_at} missing={[x.describe() for x in r.missing]} "
                      f"matched={[(e.kind, e.rank, e.node, e.gpu) for e in r.matched]}" for r in v.results)
    fa = [(e.kind, e.rank, e.node, e.gpu, e.summary) for e in v.false_alarms]
    assert v.all_correct, f"{table}\nfalse alarms: {fa}"
    by_name = {r.incident.name: r for r in v.results}
    assert set(by_name) == {"benign", "thermal", "efa", "dataloader", "xid79"}
    for name in ("thermal", "efa", "dataloader", "xid79"):
        r = by_name[name]
        # caught inside its own slot, not after the recovery
        assert r.delay is not None and 0 <= r.delay < cfg.incident_seconds, (name, r.delay)
    # thermal: the straggler is the rank on the throttled GPU, with the GPU named in its evidence
    thermal = [e for e in by_name["thermal"].matched if e.kind == "straggler"]
    assert thermal and all(e.rank == by_name["thermal"].incident.required[0].rank for e in thermal)

    report = result.report_dir
    events = [json.loads(line) for line in (report / "events.jsonl").read_text().splitlines() if line.strip()]
    assert {e["kind"] for e in events} >= {"straggler", "gpu_fault", "network", "hang"}
    summary = (report / "summary.md").read_text()
    assert "| incident | injected | detected | delay | events | correct |" in summary
    assert "False alarms: 0" in summary
    slack = json.loads((report / "slack-messages.json").read_text())
    slack_text = json.dumps(slack)
    assert slack, "no Slack message was delivered"
    assert f"rank {thermal[0].rank}" in slack_text.lower() or f"rank {thermal[0].rank}" in slack_text
    # W&B (offline run) got the same incident, read back from the run's own records
    wandb_alerts = json.loads((report / "wandb-alerts.json").read_text())
    assert any(f"rank {thermal[0].rank} " in a["title"] for a in wandb_alerts), [a["title"] for a in wandb_alerts]
    assert list((report / "charts").glob("*.png"))
    assert list((report / "dashboards").rglob("*.json"))
    assert result.resources is not None and result.resources.head_series and result.resources.head_series > 100
    assert result.resources.scrape_targets == cfg.nodes + cfg.world_size + 1

    # nothing left running: no child processes, no listening cluster endpoints
    assert result.leftover_pids == []
    assert set(_descendants(os.getpid())) <= before
    for i in range(cfg.nodes):
        addr = cfg.node_address(i)
        assert not _port_open(addr, NODE_EXPORTER_PORT)
        assert not _port_open(addr, PROBE_BASE_PORT)
    # the plain (non-terminal) view printed each event as it fired
    assert "FIRING   straggler" in out.getvalue()
