"""End to end: the example job under torchrun (4 gloo ranks on CPU, rank 2 slowed by 30 %),
scraped by a real Prometheus every second. Through PromQL, the slowed rank has the highest
compute time per step and the lowest comm wait, while every rank's step time is the same.
Rank 0 also reports to W&B (offline) with the cross-rank gather on, which must name rank 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port_block, scrape_config

from rankwatch import promserver

# The timeouts are hang guards: the job runs until Prometheus holds enough of it, however long
# a busy machine takes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

RUN = "e2e-ddp"
RANKS = 4
SLOW_RANK = 2
MIN_STEPS = 20  # warm-up steps left out of the comparison
MIN_SCRAPES = 12  # scrapes of the steady state before the job is stopped


def by_rank(url: str, promql: str, at: float) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in promserver.query(url, promql, time_s=at)}


def per_step(sections: str, window: int) -> str:
    sel = f'run="{RUN}"'
    return (f'sum by (rank) (rate(rankwatch_section_seconds_total{{{sel},section=~"{sections}"}}[{window}s])) '
            f'/ sum by (rank) (rate(rankwatch_steps_total{{{sel}}}[{window}s]))')


def scraped(url: str, promql: str) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in promserver.query(url, promql)}


def test_prometheus_names_the_slowed_rank(tmp_path: Path, prometheus_factory, subprocess_env) -> None:
    base = free_port_block(RANKS)
    targets = [f"127.0.0.1:{base + i}" for i in range(RANKS)]
    prom = prometheus_factory(scrape_config({"training": targets}, interval="1s"))
    env = {k: v for k, v in subprocess_env.items() if k != "WANDB_SERVICE"}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_DIR": str(tmp_path),
                "WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    log_path = tmp_path / "torchrun.log"
    stop_file = tmp_path / "stop"
    # The job runs until Prometheus holds enough of it (not for a fixed number of steps, which an
    # idle machine finishes before a handful of scrapes).
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
           "--master_addr=127.0.0.1", f"--master_port={promserver.free_port()}",
           str(REPO / "examples" / "train_ddp.py"), "--run-id", RUN, "--slow-rank", str(SLOW_RANK),
           "--slow-factor", "1.3", "--steps", "0", "--stop-file", str(stop_file),
           "--probe-port-base", str(base), "--wandb-mode", "offline", "--wandb-gather",
           "--wandb-every", "100", "--log-every", "100"]
    with open(log_path, "wb") as log:
        job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    sel = f'run="{RUN}"'
    try:
        # Enough data: every rank scraped at least MIN_SCRAPES times after its first MIN_STEPS
        # steps (the steady state), and past step 200 so that W&B logged the spread of a steady-state interval.
        enough = (f'count_over_time((rankwatch_steps_total{{{sel}}} >= {MIN_STEPS})[10m:1s]) >= {MIN_SCRAPES} '
                  f'and rankwatch_steps_total{{{sel}}} >= 200')
        deadline = time.monotonic() + 900  # a hung job, not a slow machine: the test waits on data
        while len(promserver.query(prom.url, enough)) < RANKS:
            if job.poll() is not None:
                raise AssertionError(f"job exited ({job.returncode}) early:\n" + log_path.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError("Prometheus never held enough steps:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)

        # Evaluate at the newest scrape, over the scrapes after the first MIN_STEPS steps.
        newest = max(scraped(prom.url, f'timestamp(rankwatch_steps_total{{{sel}}})').values())
        first = max(scraped(prom.url, f'min_over_time((rankwatch_last_step_timestamp_seconds{{{sel}}}'
                                      f' and rankwatch_steps_total{{{sel}}} >= {MIN_STEPS})[10m:1s])').values())
        window = int(newest - first)
        assert window >= MIN_SCRAPES - 2, f"only {newest - first:.1f}s of steady state under Prometheus"

        compute = by_rank(prom.url, per_step("forward|backward|optimizer", window), newest)
        comm = by_rank(prom.url, per_step("comm", window), newest)
        step = by_rank(prom.url, f'sum by (rank) (rate(rankwatch_step_seconds_total{{{sel}}}[{window}s])) '
                                 f'/ sum by (rank) (rate(rankwatch_steps_total{{{sel}}}[{window}s]))', newest)
        summary = f"window={window}s compute={compute} comm={comm} step={step}"
        assert set(compute) == set(comm) == set(step) == {str(r) for r in range(RANKS)}, summary
        assert max(compute, key=compute.get) == str(SLOW_RANK), summary
        assert min(comm, key=comm.get) == str(SLOW_RANK), summary
        others = sorted(v for r, v in compute.items() if r != str(SLOW_RANK))
        assert compute[str(SLOW_RANK)] > 1.1 * others[len(others) // 2], summary
        assert max(step.values()) / min(step.values()) < 1.05, summary

        info = promserver.query(prom.url, f'rankwatch_rank_info{{{sel}}}', time_s=newest)
        assert sorted((i["metric"]["rank"], i["metric"]["world_size"]) for i in info) == [
            (str(r), "4") for r in range(RANKS)]

        stop_file.touch()
        assert job.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            try:
                job.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()

    # Rank 0's W&B run: the gathered spread names rank 2, and the completion alert was sent.
    from test_probe_wandb import alerts, history_rows, run_log

    records = run_log(tmp_path)
    spread = [r for r in history_rows(records) if "rankwatch/spread/forward/max_rank" in r]
    assert spread, "no cross-rank spread logged"
    last_row = spread[-1]
    # One 100-step interval of 4 ranks sharing 2 cores: a single compute section can be won by a
    # rank that was descheduled; most of them, and the comm wait, name the slowed rank.
    slowest = [last_row[f"rankwatch/spread/{s}/max_rank"] for s in ("forward", "backward", "optimizer")]
    assert slowest.count(SLOW_RANK) >= 2, json.dumps(last_row)
    assert last_row["rankwatch/spread/comm/min_rank"] == SLOW_RANK, json.dumps(last_row)
    (alert,) = alerts(records)
    completed = re.search(r"(\d+) steps completed", alert.text)
    assert alert.title == f"Training run {RUN} completed" and completed, alert.text
    assert int(completed.group(1)) >= 200, alert.text
