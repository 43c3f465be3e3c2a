"""Start and stop the real Prometheus-family binaries on loopback: used by replay (a temporary
Prometheus over a backfilled TSDB), the demo, and the tests. Nothing here is faked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from rankwatch.errors import RankwatchError

# How long to wait for a server to answer or for data to appear before calling it failed. Only a
# dead end waits this long: on a busy machine start-up takes seconds, so keep it generous.
STARTUP_TIMEOUT_S = 120.0

# Debian names Alertmanager's binary prometheus-alertmanager.
BINARY_CANDIDATES: dict[str, tuple[str, ...]] = {
    "prometheus": ("prometheus",),
    "promtool": ("promtool",),
    "alertmanager": ("alertmanager", "prometheus-alertmanager"),
    "amtool": ("amtool",),
    "victoria-metrics": ("victoria-metrics", "victoria-metrics-prod"),
    "node_exporter": ("prometheus-node-exporter", "node_exporter"),
}


def find_binary(name: str) -> str:
    """Path of a Prometheus-family binary, or a clear error saying how to install it."""
    for candidate in BINARY_CANDIDATES.get(name, (name,)):
        path = shutil.which(candidate)
        if path:
            return path
    raise RankwatchError(
        f"{name} not found on PATH; `make setup` installs it (Debian packages prometheus, "
        "prometheus-alertmanager, victoria-metrics)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, timeout: float = STARTUP_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: str = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RankwatchError(f"process for {url} exited with code {proc.returncode}")
        try:
            r = requests.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RankwatchError(f"{url} not ready after {timeout:.0f}s ({last})")


@dataclass
class ManagedProcess:
    """A started server process with its base URL; stop() is idempotent."""

    proc: subprocess.Popen
    url: str
    workdir: Path
    log_path: Path
    _owns_workdir: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(args: list[str], workdir: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    log_path = workdir / log_name
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=workdir, start_new_session=True)
    log.close()
    return proc, log_path


def start_prometheus(
    config_yaml: str,
    *,
    workdir: str | os.PathLike[str] | None = None,
    storage_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    extra_args: list[str] | None = None,
    files: dict[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> ManagedProcess:
    """Start a real Prometheus on 127.0.0.1 with ``config_yaml`` (and any ``files`` it refers to,
    written next to it). Returns once /-/ready answers."""
    owns = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="rankwatch-prom-"))
    wd.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        p = wd / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (wd / "prometheus.yml").write_text(config_yaml)
    port = port or free_port()
    storage = Path(storage_dir) if storage_dir else wd / "data"
    args = [
        find_binary("prometheus"),
        f"--config.file={wd / 'prometheus.yml'}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--web.enable-admin-api",
        # Backfilled data may be years old: never let retention delete it.
        "--storage.tsdb.retention.time=100y",
        *(extra_args or []),
    ]
    proc, log_path = _spawn(args, wd, "prometheus.log")
    mp = ManagedProcess(proc, f"http://127.0.0.1:{port}", wd, log_path, owns)
    try:
        wait_http_ok(mp.url + "/-/ready", timeout=timeout, proc=proc)
    except RankwatchError as exc:
        mp.stop()
        raise RankwatchError(f"{exc}\n{mp.log()[-2000:]}") from None
    return mp


def start_alertmanager(config_yaml: str, *, workdir: str | os.PathLike[str] | None = None,
                       port: int | None = None, timeout: float = STARTUP_TIMEOUT_S) -> ManagedProcess:
    owns = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="rankwatch-am-"))
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "alertmanager.yml").write_text(config_yaml)
    port = port or free_port()
    cluster_port = free_port()
    args = [
        find_binary("alertmanager"),
        f"--config.file={wd / 'alertmanager.yml'}",
        f"--storage.path={wd / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--cluster.listen-address=127.0.0.1:{cluster_port}",
    ]
    proc, log_path = _spawn(args, wd, "alertmanager.log")
    mp = ManagedProcess(proc, f"http://127.0.0.1:{port}", wd, log_path, owns)
    try:
        wait_http_ok(mp.url + "/-/ready", timeout=timeout, proc=proc)
    except RankwatchError as exc:
        mp.stop()
        raise RankwatchError(f"{exc}\n{mp.log()[-2000:]}") from None
    return mp


def start_victoria_metrics(*, workdir: str | os.PathLike[str] | None = None, port: int | None = None,
                           extra_args: list[str] | None = None, timeout: float = STARTUP_TIMEOUT_S) -> ManagedProcess:
    owns = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix="rankwatch-vm-"))
    wd.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        find_binary("victoria-metrics"),
        f"-storageDataPath={wd / 'vmdata'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-retentionPeriod=100y",
        *(extra_args or []),
    ]
    proc, log_path = _spawn(args, wd, "victoria-metrics.log")
    mp = ManagedProcess(proc, f"http://127.0.0.1:{port}", wd, log_path, owns)
    try:
        wait_http_ok(mp.url + "/health", timeout=timeout, proc=proc)
    except RankwatchError as exc:
        mp.stop()
        raise RankwatchError(f"{exc}\n{mp.log()[-2000:]}") from None
    return mp


def promtool(*args: str, input_text: str | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run promtool; the caller checks returncode (promtool prints its findings on stdout/stderr)."""
    return subprocess.run([find_binary("promtool"), *args], input=input_text, capture_output=True,
                          text=True, timeout=timeout)


def backfill_openmetrics(openmetrics_file: str | os.PathLike[str], tsdb_dir: str | os.PathLike[str],
                         *, block_duration: str = "24h") -> None:
    """Turn an OpenMetrics file with timestamps into TSDB blocks with promtool."""
    res = promtool("tsdb", "create-blocks-from", "openmetrics", f"--max-block-duration={block_duration}",
                   str(openmetrics_file), str(tsdb_dir), timeout=600)
    if res.returncode != 0:
        raise RankwatchError(f"promtool could not backfill {openmetrics_file}: {(res.stderr or res.stdout).strip()[-1500:]}")


def query(url: str, promql: str, time_s: float | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Instant query → the result list of the Prometheus HTTP API (test and demo helper)."""
    params: dict[str, Any] = {"query": promql}
    if time_s is not None:
        params["time"] = time_s
    r = requests.get(url.rstrip("/") + "/api/v1/query", params=params, timeout=timeout)
    body = r.json()
    if body.get("status") != "success":
        raise RankwatchError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def wait_for_series(url: str, promql: str, *, min_series: int = 1, timeout: float = STARTUP_TIMEOUT_S) -> list[dict[str, Any]]:
    """Poll until ``promql`` returns at least ``min_series`` series (scrapes take an interval)."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            result = query(url, promql)
        except (RankwatchError, requests.RequestException):
            result = []
        if len(result) >= min_series:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{promql!r} returned {len(result)} series after {timeout:.0f}s, wanted {min_series}")
