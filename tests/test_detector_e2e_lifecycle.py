"""Job lifecycle, live: real torch.distributed jobs (torchrun, gloo on CPU) with real probes,
scraped by a real Prometheus, watched by `rankwatch detector`.

* Turnover: a job ends and the next one starts on the same probe ports: nothing is said about
  the old run (the issue's false "hang" 7 s after the new job started).
* SIGSTOP: one rank's process is stopped; the others block in the next all-reduce; the hang
  names the stopped rank first, with node and GPU.

Every wait is on data (Prometheus series, the detector's own /metrics, its events file); the
deadlines only stop a broken run from hanging the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO, scrape_config
from test_detector_e2e_done import free_port_block, stop

from rankwatch import promserver

HANG_MIN_S = 5.0
CONFIG = f"[detector]\ninterval_s = 1.0\nwindow_s = 3.0\nwarmup_s = 3.0\nhang_min_s = {HANG_MIN_S}\n"
DEADLINE_S = 240.0  # a guard against a broken run, never a timing assertion


def start_job(tmp_path: Path, env: dict[str, str], run: str, port_base: int, nproc: int, stop_file: Path) -> subprocess.Popen:
    log = open(tmp_path / f"{run}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(REPO / "examples" / "train_ddp.py"), "--steps", "0", "--stop-file", str(stop_file),
         "--probe-port-base", str(port_base), "--run-id", run],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_detector(tmp_path: Path, env: dict[str, str], url: str) -> tuple[subprocess.Popen, int]:
    cfg = tmp_path / "detector.toml"
    cfg.write_text(CONFIG)
    port = promserver.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankwatch", "detector", "--prometheus", url, "--config", str(cfg), "--quiet",
         "--events-file", str(tmp_path / "events.jsonl"), "--state-db", str(tmp_path / "state.sqlite"),
         "--listen", f"127.0.0.1:{port}", "--query-delay", "0.5"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "detector.log", "w"), start_new_session=True)
    return proc, port


def metrics(port: int) -> dict[tuple[str, str], float]:
    """The detector's /metrics as {(name, labels): value} (empty while it is not up yet)."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            out[(name, labels.rstrip("}"))] = float(value)
    return out


def wait_until(what: str, check, tmp_path: Path, *procs: subprocess.Popen) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited\n" + (tmp_path / "detector.log").read_text()[-3000:]
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"never saw {what}\n" + (tmp_path / "detector.log").read_text()[-3000:])


def events(tmp_path: Path) -> list[dict[str, Any]]:
    f = tmp_path / "events.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def evaluated(port: int) -> float:
    return metrics(port).get(("rankwatch_detector_last_evaluated_timestamp_seconds", ""), 0.0)


def ranks_with_data(port: int, run: str) -> float:
    return metrics(port).get(("rankwatch_detector_run_ranks_with_data", f'run="{run}"'), 0.0)


def last_step(url: str, run: str) -> float:
    """Data time of the run's newest step, from Prometheus."""
    rows = promserver.query(url, f'max(rankwatch_last_step_timestamp_seconds{{run="{run}"}})')
    return float(rows[0]["value"][1]) if rows else 0.0


@pytest.fixture
def job_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES names each rank's GPU (local rank k -> GPU k) as on a GPU node; torch stays on CPU
    return dict(subprocess_env, RANKWATCH_NODE="simnode-0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="0,1,2,3")


@pytest.mark.slow
def test_a_new_job_on_the_same_ports_raises_nothing_about_the_old_run(prometheus_factory, tmp_path: Path,
                                                                      job_env) -> None:
    base = free_port_block(2)
    prom = prometheus_factory(scrape_config({"training": [f"127.0.0.1:{base + i}" for i in range(2)]}, interval="1s"))
    detector, dport = start_detector(tmp_path, job_env, prom.url)
    job_a = job_b = None
    try:
        job_a = start_job(tmp_path, job_env, "turn-a", base, 2, tmp_path / "stop-a")
        # the old run is watched and judged (past its warm-up)
        wait_until("turn-a watched", lambda: ranks_with_data(dport, "turn-a") == 2, tmp_path, detector, job_a)
        seen = evaluated(dport)
        wait_until("turn-a past warm-up", lambda: evaluated(dport) > seen + 5, tmp_path, detector, job_a)
        (tmp_path / "stop-a").touch()  # all ranks stop at the same step and exit
        assert job_a.wait(timeout=DEADLINE_S) == 0, (tmp_path / "turn-a.log").read_text()[-2000:]
        a_end = last_step(prom.url, "turn-a")
        job_b = start_job(tmp_path, job_env, "turn-b", base, 2, tmp_path / "stop-b")
        wait_until("turn-b watched", lambda: ranks_with_data(dport, "turn-b") == 2, tmp_path, detector, job_b)
        b_start = wait_until("turn-b stepping", lambda: last_step(prom.url, "turn-b"), tmp_path, job_b)
        # long past the point where the old run used to be called hung (hang_min_s after the new
        # job took its ports), while turn-a's series are still inside the 5-minute lookback
        wait_until("data time past turn-b's start + 4 x hang_min_s",
                   lambda: evaluated(dport) > b_start + 4 * HANG_MIN_S, tmp_path, detector, job_b)
        stop(detector)
        assert detector.returncode == 0
    finally:
        stop(detector)
        for job in (job_a, job_b):
            if job is not None:
                stop(job)
    evs = events(tmp_path)
    assert [e for e in evs if e["run"] == "turn-a"] == [], [e["summary"] for e in evs]
    assert [e for e in evs if e["kind"] == "hang"] == []
    log = (tmp_path / "detector.log").read_text()
    assert "watching run turn-a: 2 ranks" in log and "watching run turn-b: 2 ranks" in log
    assert "run turn-a ended (its ranks stopped answering)" in log
    assert a_end < b_start  # the jobs did not overlap: turnover, not two jobs at once


@pytest.mark.slow
def test_a_sigstopped_rank_is_named_by_the_hang(prometheus_factory, tmp_path: Path, job_env) -> None:
    base = free_port_block(3)
    prom = prometheus_factory(scrape_config({"training": [f"127.0.0.1:{base + i}" for i in range(3)]}, interval="1s"))
    detector, dport = start_detector(tmp_path, job_env, prom.url)
    job = start_job(tmp_path, job_env, "stop-s", base, 3, tmp_path / "stop-s")
    stopped = None
    try:
        wait_until("stop-s watched", lambda: ranks_with_data(dport, "stop-s") == 3, tmp_path, detector, job)
        seen = evaluated(dport)
        wait_until("stop-s past warm-up", lambda: evaluated(dport) > seen + 5, tmp_path, detector, job)
        stopped = rank_pid("stop-s", 1)
        os.kill(stopped, signal.SIGSTOP)
        hang = wait_until("a hang event", lambda: next((e for e in events(tmp_path) if e["kind"] == "hang"), None),
                          tmp_path, detector, job)
        stop(detector)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        stop(detector)
        stop(job)
    assert hang["state"] == "firing" and hang["run"] == "stop-s" and hang["severity"] == "critical"
    assert hang["summary"].startswith("Run stop-s is hung: rank 1 (simnode-0, GPU 1) stopped answering; "), hang
    first = hang["evidence"]["stuck_ranks"][0]
    assert (first["rank"], first["node"], first["gpu"], first["why"]) == (1, "simnode-0", "1", "stopped answering")
    assert hang["evidence"]["ranks_up"] == 2 and hang["evidence"]["ranks"] == 3
    # data time: the hang is declared at least hang_min_s after rank 1's last step
    assert hang["time"] - first["last_step_time"] >= HANG_MIN_S
    # and only the hang: the stopped rank's missing data is not a second alert
    assert [e["kind"] for e in events(tmp_path) if e["state"] == "firing"] == ["hang"]


def rank_pid(run: str, rank: int) -> int:
    """PID of the torchrun worker of ``run`` with RANK=``rank`` (torchrun starts its workers in
    their own sessions: found by their command line and environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if run.encode() in cmdline and b"RANK=%d" % rank in environ and b"LOCAL_RANK=%d" % rank in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of {run} with RANK={rank}")
