"""Ctrl-C in the middle of `rankwatch demo` stops every process the demo started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_demo_prefix

pytestmark = pytest.mark.slow


def _children_tree(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root``."""
    parents: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        parents[int(entry.name)] = int(fields[1])
        cmd[int(entry.name)] = line
    out = {}
    for pid in parents:
        p = pid
        while p in parents and p not in (root, 0, 1):
            p = parents[p]
        if p == root and pid != root:
            out[pid] = cmd[pid]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(1200)
def test_ctrl_c_stops_every_process(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    args = [sys.executable, "-m", "rankwatch", "demo", "--plain", "--nodes", "2", "--gpus-per-node", "2",
            "--efa-per-node", "1", "--address-prefix", free_demo_prefix(2, 2), "--report-dir", str(tmp_path / "report")]
    # Ctrl-C as in a terminal: a test runner started in the background (no job control) hands
    # its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(args, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # wait until the cluster, Prometheus and the detector are all running
        deadline = time.monotonic() + 600  # a hang guard: start-up takes seconds, longer on a busy machine
        tree: dict[int, str] = {}
        while time.monotonic() < deadline:
            tree = _children_tree(proc.pid)
            cmds = " ".join(tree.values())
            if "prometheus" in cmds and " detector " in cmds and cmds.count("rankwatch.demo.cluster") >= 2:
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.2)
        else:
            pytest.fail(f"demo did not start its processes: {tree}")
        time.sleep(1.0)
        tree = _children_tree(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out.decode()[-2000:]
    left = {pid: c for pid, c in tree.items() if _alive(pid)}
    assert not left, f"still running after Ctrl-C: {left}"
    assert os.path.isdir(tmp_path / "report" / "logs")
