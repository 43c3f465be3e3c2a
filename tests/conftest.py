"""Shared fixtures. Real binaries only: Prometheus, promtool, Alertmanager from Debian packages."""

from __future__ import annotations

import os
import socket
import sys
import threading
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


class SilentServer:
    """A TCP server that accepts every connection and never answers: a hung Slack, Alertmanager
    or Prometheus. ``accepted`` counts connections; ``close()`` resets them all, so that a
    client stuck waiting for an answer fails at once instead of at its timeout."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        self._sock.close()
        for c in conns:
            c.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120.0, every: float = 0.05) -> None:
    """Poll ``condition`` until it is true. ``timeout`` only stops a test whose condition never
    comes true (a hang, a lost message): it is not a speed requirement, so keep it generous."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s for {what}")
        time.sleep(every)


def free_demo_prefix(nodes: int, gpus_per_node: int) -> str:
    """A loopback prefix ``127.N`` whose demo ports are all free: every node's 9410 and
    9420 + local rank. The machine is shared (another checkout's tests run demos too), so the
    prefix is picked at random and checked, never fixed."""
    import random

    from rankwatch.demo.cluster import NODE_EXPORTER_PORT, PROBE_BASE_PORT
    from rankwatch.demo.scenario import DemoConfig

    for n in random.sample(range(70, 250), 180):
        cfg = DemoConfig(nodes=nodes, gpus_per_node=gpus_per_node, address_prefix=f"127.{n}")
        ports = [(cfg.node_address(i), p) for i in range(nodes)
                 for p in (NODE_EXPORTER_PORT, *range(PROBE_BASE_PORT, PROBE_BASE_PORT + gpus_per_node))]
        try:
            for addr, port in ports:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return cfg.address_prefix
    raise RuntimeError("no free loopback prefix for a demo")


@pytest.fixture
def slack() -> Iterator[Any]:
    """The local Slack Web API + webhook server (rankwatch.sim.slack), started for one test."""
    from rankwatch.sim.slack import SlackServer

    server = SlackServer().start()
    try:
        yield server
    finally:
        server.stop()


def free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free ports on 127.0.0.1 (probes serve base + LOCAL_RANK)."""
    from rankwatch import promserver

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


def serve_node_probes(run: str, node: str, ranks: int = 8) -> tuple[list[Any], list[Any], list[str]]:
    """The probes of ``ranks`` ranks on one node (pp of 4 ranks, tp within), each served on a
    free loopback port: (probes, their (server, thread) pairs, their scrape targets)."""
    from prometheus_client import start_http_server

    from rankwatch.exporters.identity import RankIdentity
    from rankwatch.exporters.probe import Probe

    probes = [Probe(run, port=0, identity=RankIdentity(rank=r, local_rank=r, world_size=ranks, node=node,
                                                       pp=r // 4, tp=r % 4, dp=0, gpu=r),
                    wandb_run=None, cuda_timing=False) for r in range(ranks)]
    servers, targets = [], []
    for p in probes:
        port = promserver.free_port()
        servers.append(start_http_server(port, addr="127.0.0.1", registry=p.registry))
        targets.append(f"127.0.0.1:{port}")
    return probes, servers, targets


def feed_steps(probes: list[Any], sections: dict[str, float], every_s: float = 0.2) -> Callable[[], None]:
    """Record a step on every probe every ``every_s`` seconds from a thread, as training does
    all along; returns the function that stops it."""
    import threading

    stop = threading.Event()

    def feed() -> None:
        step = 0
        while not stop.wait(every_s):
            step += 1
            for p in probes:
                p.record_step(every_s, sections, tokens=4096, step=step)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()

    def halt() -> None:
        stop.set()
        feeder.join()

    return halt
