"""Process supervision for the demo: every child runs in its own session (process group), is
registered before it can do anything, and is stopped on every way out — normal end, error,
Ctrl-C or SIGTERM — so the demo never leaves anything running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from rankwatch.errors import RankwatchError


class Supervisor:
    """Owns the demo's child processes and stop callbacks; ``close()`` undoes everything in
    reverse order of creation and is idempotent."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._callbacks: list[tuple[str, Callable[[], None]]] = []
        self._order: list[tuple[str, int]] = []  # ("proc"|"cb", index) in creation order
        self._jobs: set[int] = set()  # pids of children that exit by themselves
        self.closed = False

    def spawn(self, name: str, args: list[str], *, log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, service: bool = True) -> subprocess.Popen:
        """Start ``args`` in its own session. ``service``: it must keep running (``check_alive``
        fails once it exits); False for a job that finishes by itself."""
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd, start_new_session=True)
        finally:
            log.close()
        self._order.append(("proc", len(self._procs)))
        self._procs.append((name, proc))
        if not service:
            self._jobs.add(proc.pid)
        return proc

    def on_close(self, name: str, callback: Callable[[], None]) -> None:
        self._order.append(("cb", len(self._callbacks)))
        self._callbacks.append((name, callback))

    def check_alive(self) -> None:
        """Raise a clear error if a child died (its log names the cause)."""
        for name, proc in self._procs:
            code = proc.poll()
            if code is not None and proc.pid not in self._jobs:
                raise RankwatchError(f"{name} (pid {proc.pid}) exited early with code {code}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]

    def close(self, timeout: float = 8.0) -> list[str]:
        """Stop everything; returns the names of children that needed SIGKILL."""
        if self.closed:
            return []
        self.closed = True
        killed: list[str] = []
        for kind, idx in reversed(self._order):
            if kind == "cb":
                name, cb = self._callbacks[idx]
                with contextlib.suppress(Exception):
                    cb()
                continue
            name, proc = self._procs[idx]
            if not _stop_group(proc, timeout):
                killed.append(name)
        return killed


def terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every group without waiting (``Supervisor.close`` waits and SIGKILLs later)."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)


def stop_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every group at once, then wait for each (SIGKILL after ``timeout``)."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        _stop_group(proc, max(0.1, deadline - time.monotonic()))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The child leads its own session, so its pgid is its pid; the group takes its helpers
    # (e.g. wandb's service process) with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_group(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM the child's group, wait, then SIGKILL. True when it stopped on SIGTERM."""
    graceful = True
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            graceful = False
    # Grandchildren that outlived their parent are still in the group.
    _signal_group(proc, signal.SIGKILL if not graceful else signal.SIGTERM)
    if proc.poll() is None:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    return graceful


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt for the duration, so `finally` blocks run
    when the demo is killed politely (systemd, CI timeouts, a closed terminal)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


def wait_for_file(path: Path, timeout: float, proc: subprocess.Popen | None = None,
                  what: str = "file") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc is not None and proc.poll() is not None:
            raise RankwatchError(f"{what}: process exited with code {proc.returncode} before writing {path}")
        time.sleep(0.05)
    raise RankwatchError(f"{what}: {path} not written after {timeout:.0f}s")
