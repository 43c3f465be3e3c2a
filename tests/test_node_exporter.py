"""The node exporter daemon: one failing or hanging collector never breaks a scrape, concurrent
scrapes all succeed with consistent output, no NVML still serves EFA, and the CLI reports bad
flags without a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pynvml
import pytest
import requests
from conftest import wait_until
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from rankwatch import promserver
from rankwatch.cli import main
from rankwatch.exporters.efa import EfaCollector
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.exporters.node import NodeExporter, parse_listen_address
from rankwatch.sim.node import SimulatedNode
from rankwatch.sim.nvml import ManualClock, SimulatedNVML

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)$")


def series(text: str) -> dict[str, float]:
    """'name{labels}' → value for every sample line of an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, line
            out[m.group(1)] = float(m.group(2))
    return out


class FailingCollector:
    """A collector whose hardware library raises: the runner must contain it."""

    name = "failing"

    def collect(self) -> Iterable[Metric]:
        raise OSError("device library crashed")

    def close(self) -> None:
        pass


class HangingCollector:
    """A collector stuck in a driver call until released."""

    name = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        self.release.wait()
        g = GaugeMetricFamily("rankwatch_test_answer", "answered after release")
        g.add_metric([], 1)
        return [g]

    def close(self) -> None:
        self.release.set()


@pytest.fixture
def efa() -> Iterator[EfaCollector]:
    c = EfaCollector(SYSFS)
    yield c
    c.close()


def test_a_raising_collector_costs_only_itself(efa: EfaCollector) -> None:
    exporter = NodeExporter([FailingCollector(), efa], "node-a", process_metrics=False)
    try:
        s = series(exporter.scrape().decode())
        assert s['rankwatch_exporter_collector_success{collector="failing"}'] == 0
        assert s['rankwatch_exporter_collector_success{collector="efa"}'] == 1
        assert s['node_amazonefa_tx_bytes{device="rdmap16s0",port="1"}'] > 0
        assert s['rankwatch_node_info{Hostname="node-a"}'] == 1
    finally:
        exporter.close()


def test_a_hanging_collector_is_given_up_after_the_timeout(efa: EfaCollector) -> None:
    # The collector blocks until released, which happens only at the end: each scrape below
    # returning at all is the check (without the timeout it would wait forever).
    hanging = HangingCollector()
    # 5 s: the EFA collector answers in time even on a busy machine; the hanging one never does
    exporter = NodeExporter([hanging, efa], "node-a", collector_timeout=5.0, process_metrics=False)
    hung = 'rankwatch_exporter_collector_success{collector="hanging"}'
    try:
        s = series(exporter.scrape().decode())
        assert s[hung] == 0
        assert s['rankwatch_exporter_collector_duration_seconds{collector="hanging"}'] >= 5.0  # waited its timeout
        assert s['rankwatch_exporter_collector_success{collector="efa"}'] == 1
        assert 'node_amazonefa_rx_bytes{device="rdmap17s0",port="1"}' in s
        # still stuck: reported at once, without a second call queued behind the first
        s = series(exporter.scrape().decode())
        assert s[hung] == 0 and hanging.calls == 1
        assert s['rankwatch_exporter_collector_duration_seconds{collector="hanging"}'] == 0
        hanging.release.set()  # the stuck call returns; a later scrape calls the collector again
        wait_until(lambda: series(exporter.scrape().decode())[hung] == 1, "the released collector to answer")
        s = series(exporter.scrape().decode())
        assert s[hung] == 1 and s["rankwatch_test_answer"] == 1
    finally:
        exporter.close()


def test_concurrent_scrapes_all_succeed_and_agree(tmp_path: Path) -> None:
    node = SimulatedNode("node-c", sysfs_root=tmp_path / "sys")  # 8 GPUs + 32 EFA devices
    server = node.serve("127.0.0.1", 0)
    try:
        def get(_: int) -> tuple[int, str]:
            r = requests.get(server.url + "/metrics", timeout=30)
            return r.status_code, r.text

        previous: dict[str, float] | None = None
        requests_sent = 0
        with ThreadPoolExecutor(max_workers=24) as pool:
            for _round in range(3):
                results = list(pool.map(get, range(24)))
                requests_sent += len(results)
                assert [code for code, _ in results] == [200] * 24
                parsed = [series(text) for _, text in results]
                keys = set(parsed[0])
                assert all(set(p) == keys for p in parsed)  # same series in every response
                tx = [k for k in keys if k.startswith("node_amazonefa_tx_bytes{")]
                assert len(tx) == 32
                assert len([k for k in keys if k.startswith("DCGM_FI_DEV_GPU_TEMP{")]) == 8
                assert all(p['rankwatch_exporter_collector_success{collector="efa"}'] == 1 for p in parsed)
                assert all(p['rankwatch_exporter_collector_success{collector="gpu"}'] == 1 for p in parsed)
                # counters never go backwards between responses
                for p in parsed:
                    if previous is not None:
                        assert all(p[k] >= previous[k] for k in tx)
                previous = max(parsed, key=lambda p: sum(p[k] for k in tx))
        assert node.exporter.collections < requests_sent  # simultaneous scrapes coalesced
    finally:
        node.close()


def test_http_endpoints(efa: EfaCollector) -> None:
    exporter = NodeExporter([efa], "node-h")
    server = exporter.serve("127.0.0.1", 0)
    keep_alive = requests.Session()
    try:
        assert keep_alive.get(server.url + "/healthz", timeout=10).status_code == 200
        r = requests.get(server.url + "/metrics", timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "process_resident_memory_bytes " in r.text
        assert requests.get(server.url + "/healthz", timeout=10).text == "ok\n"
        assert "/metrics" in requests.get(server.url + "/", timeout=10).text
        assert requests.get(server.url + "/nope", timeout=10).status_code == 404
        head = requests.head(server.url + "/metrics", timeout=10)
        assert head.status_code == 200 and int(head.headers["Content-Length"]) > 1000
    finally:
        server.stop()
        exporter.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/healthz", timeout=2)
    with pytest.raises(requests.ConnectionError):  # nor on a connection opened before stop()
        keep_alive.get(server.url + "/healthz", timeout=2)


def test_without_nvml_efa_is_still_served(efa: EfaCollector) -> None:
    nvml = SimulatedNVML("node-n", init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    exporter = NodeExporter([GpuCollector(nvml=nvml, hostname="node-n", listen_xid_events=False), efa], "node-n",
                            process_metrics=False)
    try:
        s = series(exporter.scrape().decode())
        assert s['rankwatch_exporter_collector_success{collector="efa"}'] == 1
        assert len([k for k in s if k.startswith("node_amazonefa_tx_bytes{")]) == 4
        assert not [k for k in s if k.startswith("DCGM_FI_DEV_GPU_TEMP")]
        assert [v for k, v in s.items() if k.startswith("rankwatch_gpu_nvml_available")] == [0]
    finally:
        exporter.close()


def test_simulated_node_counters_follow_the_simulated_clock(tmp_path: Path) -> None:
    clock = ManualClock(1_767_225_600.0)
    node = SimulatedNode("node-s", gpus=1, efa=2, sysfs_root=tmp_path / "sys", clock=clock)
    try:
        key = 'node_amazonefa_tx_bytes{device="rdmap16s0",port="1"}'
        drops = 'node_amazonefa_rx_drops{device="rdmap17s0",port="1"}'
        first = series(node.exporter.scrape().decode())
        again = series(node.exporter.scrape().decode())
        assert again[key] == first[key]  # simulated time stands still
        node.efa.inject(1, "rx_drops", rate=10)
        clock.advance(30)
        later = series(node.exporter.scrape().decode())
        assert 0.3 * 12.5e9 * 30 < later[key] - first[key] < 0.5 * 12.5e9 * 30
        assert later[drops] - first[drops] == 300
        energy = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"'
        e1 = [v for k, v in first.items() if k.startswith(energy)]
        e2 = [v for k, v in later.items() if k.startswith(energy)]
        assert e2[0] > e1[0]
    finally:
        node.close()


def test_simulated_node_removes_its_temporary_tree() -> None:
    node = SimulatedNode("node-t", gpus=1, efa=1)
    root = node.sysfs_root
    assert (root / "class" / "infiniband").is_dir()
    node.close()
    assert not root.exists()


@pytest.mark.parametrize("args,message", [
    (["--web.listen-address", "localhost"], "--web.listen-address 'localhost': expected HOST:PORT"),
    (["--no-collector.gpu", "--no-collector.efa"], "every collector is disabled"),
    (["--collector.efa.timeout", "0"], "--collector.efa.timeout must be a finite number of seconds > 0, got 0"),
    (["--collector.timeout", "nan"], "--collector.timeout must be a finite number of seconds > 0, got nan"),
    (["--collector.efa.timeout", "inf"], "--collector.efa.timeout must be a finite number of seconds > 0, got inf"),
    (["--collector.timeout", "-1"], "--collector.timeout must be a finite number of seconds > 0, got -1"),
    (["--job-mapping-dir", "/etc/hostname"], "--job-mapping-dir /etc/hostname: exists but is not a directory"),
    (["--web.listen-address", "127.0.0.1:65536"], "--web.listen-address '127.0.0.1:65536': expected HOST:PORT"),
    (["--web.listen-address", "127.0.0.1:٩٤١٠"], "--web.listen-address '127.0.0.1:٩٤١٠': expected HOST:PORT"),
])
def test_cli_rejects_bad_flags_without_traceback(args: list[str], message: str, capsys) -> None:
    assert main(["node-exporter", *args]) == 2
    err = capsys.readouterr().err
    assert f"rankwatch: error: {message}" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_missing_job_mapping_dir_is_no_job_yet(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """As the Slurm unit starts it after a reboot: /run/rankwatch/job-mapping does not exist
    until the first job's prolog. The exporter serves, says so once, and labels the GPUs with
    the job as soon as the prolog has written the mapping."""
    mapping = tmp_path / "run" / "job-mapping"
    port = promserver.free_port()
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rankwatch", "node-exporter", "--simulate",
                                 "--simulate-gpus", "2", "--simulate-efa", "1", "--job-mapping-dir", str(mapping),
                                 "--web.listen-address", f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert 'collector="gpu"} 1' in text and "hpc_job" not in text
        mapping.mkdir(parents=True)  # what prolog.sh does for job 4242 on GPU 1
        (mapping / "1").write_text("4242\n")
        temp = [line for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines()
                if line.startswith("DCGM_FI_DEV_GPU_TEMP{")]
        assert [('hpc_job="4242"' in line) for line in temp] == [False, True]
    finally:
        proc.terminate()
        code = proc.wait(timeout=20)
    assert code == 0, log.read_text()
    assert f"HPC job mapping directory {mapping} does not exist yet" in log.read_text()


def test_cli_port_in_use(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["node-exporter", "--no-collector.gpu", "--path.sysfs", str(SYSFS),
                     "--web.listen-address", f"127.0.0.1:{port}"])
    assert code == 2
    assert f"rankwatch: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_listen_address_forms() -> None:
    assert parse_listen_address(":9410") == ("0.0.0.0", 9410)
    assert parse_listen_address("127.0.0.1:1") == ("127.0.0.1", 1)
    assert parse_listen_address("[::1]:9410") == ("::1", 9410)


@pytest.mark.slow
def test_real_pynvml_without_a_gpu_serves_efa(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """The real pynvml on this machine: without an NVIDIA driver (CI) it raises, and the
    exporter serves EFA, says so once in the log and in a metric, and stops cleanly on SIGTERM.
    With a driver, the GPUs are served next to EFA."""
    has_driver = os.path.exists("/dev/nvidiactl")
    port = promserver.free_port()
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rankwatch", "node-exporter", "--path.sysfs", str(SYSFS),
                                 "--web.listen-address", f"127.0.0.1:{port}", "--hostname", "cpu-node"],
                                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        s = series(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
        assert s['rankwatch_exporter_collector_success{collector="efa"}'] == 1
        assert len([k for k in s if k.startswith("node_amazonefa_info{")]) == 4
        assert [v for k, v in s.items() if k.startswith("rankwatch_gpu_nvml_available")] == [int(has_driver)]
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    assert code == 0, log.read_text()
    assert ("NVML unavailable" in log.read_text()) is not has_driver


def test_renderer_label_cache_stays_bounded_and_correct() -> None:
    # Label values that churn (e.g. a job id per run) overflow the cache: the text stays right
    # and the cache never holds more than its bound.
    from rankwatch.exporters.exposition import Renderer

    renderer = Renderer(max_label_sets=10)
    for job in range(25):
        fam = GaugeMetricFamily("rw_test", "doc", labels=["job", "quote"])
        fam.add_metric([f"j{job}", 'a"b'], float(job))
        assert renderer.render([fam]).decode().splitlines()[-1] == f'rw_test{{job="j{job}",quote="a\\"b"}} {job}.0'
        assert len(renderer._labels) <= 10


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0])
def test_library_timeouts_must_be_finite_and_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        EfaCollector(SYSFS, timeout=timeout)
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        NodeExporter([FailingCollector()], "node-x", collector_timeout=timeout)
