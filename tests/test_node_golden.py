"""Golden end-to-end test in node_exporter's style: `rankwatch node-exporter` on the committed
fixture sysfs tree and two simulated GPUs at a frozen clock; its scrape must equal
tests/fixtures/node/expected.prom. Set RANKWATCH_UPDATE_GOLDEN=1 to rewrite the file after an
intended change (then review the diff). The same scrape goes through `promtool check metrics`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from rankwatch import promserver

pytestmark = pytest.mark.slow  # runs the exporter as a process
FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "node" / "expected.prom"
# Values that differ between runs: how long collectors took, and the process's own resources.
VOLATILE = re.compile(r"^((?:rankwatch_exporter_collector_duration_seconds|process_[a-z_]+)(?:\{[^}]*\})?) \S+$")

# Deliberate promtool exceptions: the upstream families keep upstream names, types and labels
# so that existing dashboards and alerts work unchanged.
PROMTOOL_EXCEPTIONS = (
    # dcgm-exporter 4.8.2: counters without _total, camelCase label modelName, "COUNTER" in a name
    (re.compile(r"^DCGM_(FI|EXP)_\w+ "), re.compile(r".")),
    # HyperPod EFA exporter: counters without _total
    (re.compile(r"^node_amazonefa_\w+ "), re.compile(r'counter metrics should have "_total" suffix')),
    # carries the dcgm-exporter GPU label set (modelName) so that it joins DCGM series 1:1
    (re.compile(r"^rankwatch_gpu_up "), re.compile(r"label names should be written in 'snake_case'")),
)


@pytest.fixture(scope="module")
def golden_scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = promserver.free_port()
    env = dict(os.environ, PYTHONPATH=str(FIXTURES.parents[1]))
    log = tmp_path_factory.mktemp("golden") / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rankwatch", "node-exporter", "--web.listen-address", f"127.0.0.1:{port}",
             "--simulate", "--simulate-gpus", "2", "--simulate-efa", "0", "--simulate-seed", "7",
             "--simulate-clock", "1767225600", "--path.sysfs", str(FIXTURES / "sysfs"),
             "--hostname", "golden-node"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        proc.terminate()
        assert proc.wait(timeout=120) == 0, log.read_text()


def mask(text: str) -> str:
    return "".join(VOLATILE.sub(r"\1 <volatile>", line) + "\n" for line in text.splitlines())


def test_scrape_matches_golden_file(golden_scrape: str) -> None:
    got = mask(golden_scrape)
    if os.environ.get("RANKWATCH_UPDATE_GOLDEN"):
        EXPECTED.write_text(got)
    expected = EXPECTED.read_text()
    if got != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True),
                                            "expected.prom", "scrape", n=1))
        pytest.fail(f"scrape differs from {EXPECTED} (RANKWATCH_UPDATE_GOLDEN=1 rewrites it):\n{diff[:6000]}")


def test_golden_file_covers_every_family(golden_scrape: str) -> None:
    """The golden file is worth comparing against only if it holds both collectors' output."""
    expected = EXPECTED.read_text()
    for family in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_XID_ERRORS", "node_amazonefa_tx_bytes",
                   "node_amazonefa_retrans_pkts", "node_amazonefa_keep_alive_rcvd", "node_amazonefa_info",
                   "rankwatch_node_info", "rankwatch_exporter_collector_success"):
        assert f"\n# TYPE {family} " in expected, family
    assert 'rankwatch_node_info{Hostname="golden-node"} 1' in expected
    assert 'rankwatch_exporter_collector_success{collector="gpu"} 1' in expected
    assert 'rankwatch_exporter_collector_success{collector="efa"} 1' in expected
    assert "mlx5_0" not in expected


def test_promtool_check_metrics(golden_scrape: str) -> None:
    res = promserver.promtool("check", "metrics", input_text=golden_scrape)
    findings = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    unexpected = [f for f in findings
                  if not any(name.search(f) and why.search(f) for name, why in PROMTOOL_EXCEPTIONS)]
    assert not unexpected, "\n".join(unexpected)
    # the exceptions are real: promtool does flag the upstream names (so the check ran)
    assert any(f.startswith("node_amazonefa_tx_bytes ") for f in findings)
    assert not any(f.startswith(("rankwatch_node_info", "rankwatch_efa_", "rankwatch_exporter_")) for f in findings)
