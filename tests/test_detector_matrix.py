"""The detector as shipped, at every common scrape interval: `rankwatch sim scenario KIND --scrape S`
then `rankwatch detect --replay` with NO detector config, for S in {1, 5, 15, 30, 60} s. Every
fault is found with the right kind and entity, after its onset, and nothing else is raised;
a healthy job raises nothing. Small jobs (16 ranks on 4 nodes, 12 minutes) keep each cell to a
few seconds; each cell is its own test, named KIND-Ss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rankwatch.cli import main

SCRAPES = (1, 5, 15, 30, 60)
KINDS = ("slowdown", "thermal", "dataloader", "efa", "xid79", "hang", "healthy")
JOB = ["--layout", "2x2x4", "--gpus-per-node", "4", "--duration", "720", "--onset", "240"]


def required(kind: str, f: dict[str, Any]) -> list[dict[str, Any]]:
    """The firing events that must be there: kind plus the entity that names the fault."""
    rank = {"run": f["run"], "rank": f["rank"], "node": f["node"], "gpu": f["gpu"]}
    return {
        "slowdown": [{"kind": "straggler", **rank}],
        "dataloader": [{"kind": "straggler", **rank}],
        # the throttled GPU, and the rank it slows down
        "thermal": [{"kind": "gpu_fault", "node": f["node"], "gpu": f["gpu"]}, {"kind": "straggler", **rank}],
        "efa": [{"kind": "network", "node": f["node"]}],
        # the GPU that fell off the bus (critical), and the job stuck behind it
        "xid79": [{"kind": "gpu_fault", "node": f["node"], "gpu": f["gpu"], "severity": "critical"},
                  {"kind": "hang", "run": f["run"]}],
        "hang": [{"kind": "hang", "run": f["run"]}],
    }[kind]


def allowed(kind: str, f: dict[str, Any], e: dict[str, Any]) -> bool:
    """Other firing events that are true statements about the same fault."""
    if e["kind"] == "throughput_drop" and e["run"] == f["run"] and kind in ("slowdown", "thermal", "dataloader"):
        return True  # one slow rank slows the whole synchronous job
    if e["kind"] == "gpu_fault" and kind == "xid79" and e["node"] == f["node"] and e["gpu"] in (f["gpu"], None):
        return True  # the GPU's other symptoms (health FAIL, series gone) and its node's GPU count
    return False


def matches(e: dict[str, Any], want: dict[str, Any]) -> bool:
    return all(e.get(k) == v for k, v in want.items())


@pytest.mark.parametrize("scrape", SCRAPES, ids=lambda s: f"{s}s")
@pytest.mark.parametrize("kind", KINDS)
def test_defaults_find_the_fault_at_this_scrape_interval(kind: str, scrape: int, tmp_path: Path) -> None:
    assert main(["sim", "scenario", kind, "--scrape", str(scrape), "--out", str(tmp_path), *JOB]) == 0
    events_file = tmp_path / "events.jsonl"
    assert main(["detect", "--replay", str(tmp_path / f"{kind}.om"), "--quiet", "--events-file", str(events_file)]) == 0
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    firing = [e for e in events if e["state"] == "firing"]
    truth = json.loads((tmp_path / f"{kind}.truth.json").read_text())
    if kind == "healthy":
        assert firing == [], [e["summary"] for e in firing]
        return
    fault = truth["faults"][0]
    for want in required(kind, fault):
        hits = [e for e in firing if matches(e, want)]
        assert hits, f"no {want} among {[(e['kind'], e['summary']) for e in firing]}"
        # found after the onset, within the scenario (data time)
        assert fault["start"] <= hits[0]["time"] <= truth["start_time"] + truth["duration_s"]
    extra = [e for e in firing if not any(matches(e, w) for w in required(kind, fault)) and not allowed(kind, fault, e)]
    assert extra == [], [e["summary"] for e in extra]
