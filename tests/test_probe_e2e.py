"""End to end: the example job under torchrun (4 gloo ranks on CPU, rank 2 slowed by 30 %),
scraped by a real Prometheus every second. Through PromQL, the slowed rank has the highest
compute time per step and the lowest comm wait, while every rank's step time is the same.
Rank 0 also reports to W&B (offline) with the cross-rank gather on, which must name rank 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, scrape_config

from rankwatch import promserver

pytestmark = pytest.mark.slow

RUN = "e2e-ddp"
RANKS = 4
SLOW_RANK = 2


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        base = promserver.free_port()
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def by_rank(url: str, promql: str, at: float) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in promserver.query(url, promql, time_s=at)}


def per_step(sections: str, window: int) -> str:
    sel = f'run="{RUN}"'
    return (f'sum by (rank) (rate(rankwatch_section_seconds_total{{{sel},section=~"{sections}"}}[{window}s])) '
            f'/ sum by (rank) (rate(rankwatch_steps_total{{{sel}}}[{window}s]))')


def test_prometheus_names_the_slowed_rank(tmp_path: Path, prometheus_factory, subprocess_env) -> None:
    base = free_port_block(RANKS)
    targets = [f"127.0.0.1:{base + i}" for i in range(RANKS)]
    prom = prometheus_factory(scrape_config({"training": targets}, interval="1s"))
    env = {k: v for k, v in subprocess_env.items() if k != "WANDB_SERVICE"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_DIR": str(tmp_path),
                "WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    log_path = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
           "--master_addr=127.0.0.1", f"--master_port={promserver.free_port()}",
           str(REPO / "examples" / "train_ddp.py"), "--run-id", RUN, "--slow-rank", str(SLOW_RANK),
           "--slow-factor", "1.3", "--steps", "100", "--probe-port-base", str(base), "--linger", "3",
           "--wandb-mode", "offline", "--wandb-gather", "--wandb-every", "50", "--log-every", "100"]
    with open(log_path, "wb") as log:
        job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        # Every rank finished its steps and Prometheus scraped the final counters (ranks linger;
        # *_over_time still sees them once the targets are gone and their series marked stale).
        finished = f'max_over_time(rankwatch_steps_total{{run="{RUN}"}}[10m]) >= 100'
        deadline = time.monotonic() + 150
        while len(promserver.query(prom.url, finished)) < RANKS:
            ended = job.poll() is not None
            if ended and len(promserver.query(prom.url, finished)) < RANKS:
                raise AssertionError(f"job exited ({job.returncode}) before Prometheus saw all steps:\n"
                                     + log_path.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError("the job did not finish in time:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)

        # Evaluate at the last step, over the steady state (not the first steps).
        last = max(float(r["value"][1]) for r in promserver.query(
            prom.url, f'max_over_time(rankwatch_last_step_timestamp_seconds{{run="{RUN}"}}[10m])'))
        first = min(float(r["value"][1]) for r in promserver.query(
            prom.url, f'min_over_time(rankwatch_last_step_timestamp_seconds{{run="{RUN}"}}[10m])'))
        window = int(0.7 * (last - first))
        assert window >= 4, f"the job ran only {last - first:.1f}s under Prometheus"

        compute = by_rank(prom.url, per_step("forward|backward|optimizer", window), last)
        comm = by_rank(prom.url, per_step("comm", window), last)
        step = by_rank(prom.url, f'sum by (rank) (rate(rankwatch_step_seconds_total{{run="{RUN}"}}[{window}s])) '
                                 f'/ sum by (rank) (rate(rankwatch_steps_total{{run="{RUN}"}}[{window}s]))', last)
        summary = f"compute={compute} comm={comm} step={step}"
        assert set(compute) == set(comm) == set(step) == {str(r) for r in range(RANKS)}, summary
        assert max(compute, key=compute.get) == str(SLOW_RANK), summary
        assert min(comm, key=comm.get) == str(SLOW_RANK), summary
        others = sorted(v for r, v in compute.items() if r != str(SLOW_RANK))
        assert compute[str(SLOW_RANK)] > 1.1 * others[len(others) // 2], summary
        assert max(step.values()) / min(step.values()) < 1.05, summary

        info = promserver.query(prom.url, f'rankwatch_rank_info{{run="{RUN}"}}', time_s=last)
        assert sorted((i["metric"]["rank"], i["metric"]["world_size"]) for i in info) == [
            (str(r), "4") for r in range(RANKS)]

        assert job.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            try:
                job.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()

    # Rank 0's W&B run: the gathered spread names rank 2, and the completion alert was sent.
    # (One 50-step interval on a loaded 2-core machine: forward and comm, the sections with the
    # widest margin, are asserted; the PromQL checks above cover compute as a whole.)
    from test_probe_wandb import alerts, history_rows, run_log

    records = run_log(tmp_path)
    spread = [r for r in history_rows(records) if "rankwatch/spread/forward/max_rank" in r]
    assert spread, "no cross-rank spread logged"
    last_row = spread[-1]
    assert last_row["rankwatch/spread/forward/max_rank"] == SLOW_RANK, json.dumps(last_row)
    assert last_row["rankwatch/spread/comm/min_rank"] == SLOW_RANK, json.dumps(last_row)
    (alert,) = alerts(records)
    assert alert.title == f"Training run {RUN} completed" and "100 steps completed" in alert.text
