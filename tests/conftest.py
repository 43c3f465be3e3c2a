"""Shared fixtures. Real binaries only: Prometheus, promtool, Alertmanager from Debian packages."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rankwatch import promserver

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., promserver.ManagedProcess]]:
    """Start real Prometheus instances: ``prometheus_factory(config_yaml, files={...})``.
    All are stopped at the end of the test."""
    started: list[promserver.ManagedProcess] = []

    def start(config_yaml: str, **kwargs) -> promserver.ManagedProcess:
        wd = tmp_path / f"prom{len(started)}"
        mp = promserver.start_prometheus(config_yaml, workdir=wd, **kwargs)
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.stop()


def scrape_config(targets: dict[str, list[str]], interval: str = "1s", rule_files: list[str] | None = None) -> str:
    """A Prometheus config scraping ``{job_name: [host:port, ...]}`` every ``interval``."""
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {f}" for f in rule_files]
    lines.append("scrape_configs:")
    for job, tgts in targets.items():
        lines += [f"  - job_name: {job}", f"    scrape_timeout: {interval}", "    static_configs:",
                  f"      - targets: [{', '.join(repr(t) for t in tgts)}]"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes running rankwatch from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@pytest.fixture
def slack() -> Iterator[Any]:
    """The local Slack Web API + webhook server (rankwatch.sim.slack), started for one test."""
    from rankwatch.sim.slack import SlackServer

    server = SlackServer().start()
    try:
        yield server
    finally:
        server.stop()
