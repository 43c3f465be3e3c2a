"""The demo end to end as a user runs it: the real `rankwatch demo` command, from an empty
working directory, with a relative ``--report-dir``, on a small cluster (4 nodes × 4 GPUs).
Every scripted incident is caught with the right kind and entity, nothing else fires, the
report lands where the user asked, and no process or port is left behind.

Nothing here depends on the machine's speed: the demo holds each slot of its timeline until
the detector has seen what the slot is for (``rankwatch.demo.pacing``), so a loaded machine
makes it longer, not wrong. The scripted lengths below are only minimums."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_demo_prefix

from rankwatch.demo.cluster import NODE_EXPORTER_PORT, PROBE_BASE_PORT
from rankwatch.demo.scenario import DemoConfig, build_timeline

pytestmark = pytest.mark.slow

ARGS = ["--nodes", "4", "--gpus-per-node", "4", "--tp", "4", "--pp", "2", "--efa-per-node", "2", "--seed", "11",
        "--step-seconds", "0.4", "--scrape-interval", "1", "--node-scrape-interval", "1",
        "--eval-interval", "3", "--window", "3", "--speed", "2",
        # minimum lengths: an incident then lasts until the detector names it, a recovery until
        # the job is back to normal
        "--incident-seconds", "3", "--recovery-seconds", "3"]


def _processes_under(path: Path) -> dict[int, str]:
    """pid -> command line of every live process whose command line or working directory
    lies under ``path`` (from /proc): what the demo started and left behind."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found[int(entry.name)] = cmd
    return found


def _port_open(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((addr, port)) == 0


@pytest.mark.timeout(1800)
def test_demo_command_from_an_empty_directory_catches_every_incident_and_cleans_up(tmp_path: Path) -> None:
    cwd = tmp_path / "user"
    cwd.mkdir()
    scratch = tmp_path / "tmp"  # the demo's work directories, so that leftovers are found by path
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TMPDIR=str(scratch), PYTHONUNBUFFERED="1", COLUMNS="200")
    # a free loopback prefix: a demo the user (or another checkout's tests) runs meanwhile keeps its own
    prefix = free_demo_prefix(4, 4)
    proc = subprocess.run([sys.executable, "-m", "rankwatch", "demo", "--plain", *ARGS, "--address-prefix", prefix,
                           "--report-dir", "report"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1700)
    out = proc.stdout + proc.stderr
    report = cwd / "report"  # relative to where the user ran it
    logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-1500:] for p in sorted((report / "logs").glob("*.log"))) \
        if (report / "logs").is_dir() else ""
    assert (report / "verdict.json").is_file(), f"exit {proc.returncode}\n{out[-4000:]}{logs}"
    verdict = json.loads((report / "verdict.json").read_text())
    table = "\n".join(f"{i['name']}: start={i['start']:.0f} detected={i['detected_at']} missing={i['missing']} "
                      f"matched={[(e['kind'], e['rank'], e['node'], e['gpu']) for e in i['matched']]}"
                      for i in verdict["incidents"])
    assert verdict["all_correct"], f"{table}\nfalse alarms: {verdict['false_alarms']}\nheld: {verdict['held']}"
    assert proc.returncode == 0, out[-3000:]
    by_name = {i["name"]: i for i in verdict["incidents"]}
    assert set(by_name) == {"benign", "thermal", "efa", "dataloader", "xid79"}
    for name in ("thermal", "efa", "dataloader", "xid79"):
        i = by_name[name]
        # named while the fault was on (the demo holds an incident until then), not after
        assert i["start"] <= i["detected_at"] < i["end"], (name, i)
    # thermal: the straggler is the rank on the throttled GPU, and only that rank
    cfg = DemoConfig(nodes=4, gpus_per_node=4, tp=4, pp=2)
    hot = next(f for f in build_timeline(cfg).faults if f.kind == "thermal")
    rank = cfg.rank_of(hot.node, hot.local_rank)
    stragglers = {(e["rank"], e["node"], e["gpu"]) for e in by_name["thermal"]["matched"] if e["kind"] == "straggler"}
    assert stragglers == {(rank, cfg.node_name(hot.node), str(hot.local_rank))}

    # the detector wrote its events into the report the user named (not into a work directory)
    events = [json.loads(line) for line in (report / "events.jsonl").read_text().splitlines() if line.strip()]
    assert {e["kind"] for e in events} >= {"straggler", "gpu_fault", "network", "hang"}
    summary = (report / "summary.md").read_text()
    assert "| incident | injected | detected | delay | events | correct |" in summary
    assert "False alarms: 0" in summary
    slack_text = json.dumps(json.loads((report / "slack-messages.json").read_text()))
    assert f"rank {rank}" in slack_text.lower()
    # W&B (offline run) got the same incident, read back from the run's own records
    wandb_alerts = json.loads((report / "wandb-alerts.json").read_text())
    assert any(f"rank {rank} " in a["title"].lower() for a in wandb_alerts), [a["title"] for a in wandb_alerts]
    assert list((report / "charts").glob("*.png"))
    assert sorted(p.name for p in (report / "dashboards").glob("*.json")) == \
        ["efa-network.json", "gpu-health.json", "node.json", "training-run.json"]
    res = verdict["resources"]
    assert res["head_series"] > 100 and res["scrape_targets"] == 4 + 16 + 1
    # the plain (non-terminal) view printed each event as it fired
    assert "FIRING   straggler" in proc.stdout
    # nothing written beside the report in the user's directory
    assert sorted(p.name for p in cwd.iterdir()) == ["report"]

    # nothing left running: no process started from the demo's work directories, no endpoint
    assert _processes_under(scratch) == {}
    assert sorted(p.name for p in scratch.iterdir()) == []  # work directories removed
    for i in range(4):
        addr = f"{prefix}.0.{i + 1}"
        assert not _port_open(addr, NODE_EXPORTER_PORT)
        assert not _port_open(addr, PROBE_BASE_PORT)
