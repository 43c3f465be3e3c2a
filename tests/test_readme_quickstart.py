"""The README's "Watch your own job" quickstart, run as written so that it cannot rot: the
blocks marked ``<!-- quickstart: NAME -->`` are extracted from README.md and run against the
real parts: the training script under the real torchrun (its probes), `rankwatch
node-exporter`, the real Prometheus binary with the README's prometheus.yml, and `rankwatch
detector`.

Only what this machine forces is changed, and each change must find its text in the README
(else the test fails rather than run something else): host names become 127.0.0.1, fixed ports
become free ones, the node exporter simulates its GPUs and EFA devices (no hardware here), 8
ranks become 2 (2 cores), and Prometheus scrapes every second instead of every 15 s."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port_block, wait_until

from rankwatch import promserver

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- quickstart: (?P<name>[\w.]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def quickstart_blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, text) of every marked block of README.md."""
    found = [(m["name"], m["lang"], m["body"]) for m in BLOCK.finditer((REPO / "README.md").read_text())]
    names = [n for n, _, _ in found]
    assert len(names) == len(set(names)), f"duplicate quickstart blocks: {names}"
    return {n: (lang, body) for n, lang, body in found}


def replace(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        assert old in text, f"README quickstart no longer contains {old!r}: update this test with it"
        text = text.replace(old, new)
    return text


def test_readme_has_the_three_quickstart_blocks() -> None:
    blocks = quickstart_blocks()
    assert {n: lang for n, (lang, _) in blocks.items()} == {"train.py": "python", "prometheus.yml": "yaml",
                                                             "run": "bash"}
    compile(blocks["train.py"][1], "train.py", "exec")  # valid Python
    jobs = {j["job_name"] for j in yaml.safe_load(blocks["prometheus.yml"][1])["scrape_configs"]}
    assert jobs == {"rankwatch-node", "rankwatch-probe", "rankwatch-detector"}


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: everything below waits on data
def test_readme_quickstart_runs_against_real_prometheus_probes_and_detector(tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    node_port, prom_port, det_port = promserver.free_port(), promserver.free_port(), promserver.free_port()
    probe_base = free_port_block(8)
    hosts = {"node-01:": "127.0.0.1:", "monitor:": "127.0.0.1:"}
    ports = {":9410": f":{node_port}", ":9415": f":{det_port}", **{f":{9420 + i}": f":{probe_base + i}" for i in range(8)}}

    (tmp_path / "train.py").write_text(blocks["train.py"][1])
    prom_yml = replace(blocks["prometheus.yml"][1], {"scrape_interval: 15s": "scrape_interval: 1s", **hosts, **ports})
    (tmp_path / "prometheus.yml").write_text(prom_yml)
    assert promserver.promtool("check", "config", str(tmp_path / "prometheus.yml")).returncode == 0

    commands = [shlex.split(line, comments=True) for line in blocks["run"][1].splitlines()]
    commands = [c for c in commands if c]
    assert [c[:2] for c in commands] == [["rankwatch", "node-exporter"], ["prometheus", "--config.file=prometheus.yml"],
                                         ["torchrun", "--nproc_per_node=8"], ["rankwatch", "detector"]]
    node, prom, job, detector = commands
    node += ["--simulate", "--web.listen-address", f"127.0.0.1:{node_port}"]
    prom[0] = promserver.find_binary("prometheus")
    prom += [f"--web.listen-address=127.0.0.1:{prom_port}", f"--storage.tsdb.path={tmp_path / 'data'}"]
    job[1] = "--nproc_per_node=2"
    job.insert(1, f"--master_port={promserver.free_port()}")
    detector[:] = shlex.split(replace(shlex.join(detector), {"monitor:9090": f"127.0.0.1:{prom_port}"}))
    detector += ["--listen", f"127.0.0.1:{det_port}"]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_SERVICE")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               RANKWATCH_PROBE_BASE_PORT=str(probe_base), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, argv in (("node", node), ("prometheus", prom), ("job", job), ("detector", detector)):
            procs[name] = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=open(tmp_path / f"{name}.log", "w"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{prom_port}"

        def logs() -> str:
            return "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs)

        def value(promql: str) -> float | None:
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited with {p.returncode}\n{logs()}"
            try:
                rows = promserver.query(url, promql)
            except (requests.RequestException, Exception):  # Prometheus still starting
                return None
            return float(rows[0]["value"][1]) if rows else None

        # Prometheus scrapes every part of the quickstart: a node exporter, the two ranks' probes
        # (the other six configured ports have no rank on this machine), the detector.
        wait_until(lambda: value('sum(up{job="rankwatch-node"})') == 1, "the node exporter to be scraped")
        wait_until(lambda: value('sum(up{job="rankwatch-probe"})') == 2, "both ranks' probes to be scraped")
        wait_until(lambda: value('sum(up{job="rankwatch-detector"})') == 1, "the detector to be scraped")
        # the ranks step, and the detector evaluates them and the node's GPUs, as Prometheus sees it
        wait_until(lambda: value('count(rankwatch_steps_total{run="my-run"} > 10)') == 2, "both ranks stepping")
        wait_until(lambda: value('rankwatch_detector_observed{kind="ranks"}') == 2,
                   "the detector to evaluate both ranks", timeout=300)
        assert value('rankwatch_detector_observed{kind="gpus"}') == 8
        assert value('sum(rankwatch_detector_query_errors_total)') in (None, 0.0), logs()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs["detector"].returncode == 0, (tmp_path / "detector.log").read_text()[-3000:]
