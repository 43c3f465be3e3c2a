"""`rankwatch node-exporter --simulate --inject KIND@SECONDS[:GPU|NIC]`: every fault kind shows
in a scrape of the real exporter process, on the GPU or EFA device it names and nowhere else;
a fault due later is not there yet; a bad spec is a one-line error."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import promserver
from rankwatch.cli import main

Samples = dict[str, dict[str, float]]  # metric name -> {gpu or device label: value}


def scrape(url: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(requests.get(url, timeout=30).text):
        for s in fam.samples:
            key = s.labels.get("gpu") or s.labels.get("device") or ""
            if fam.name == "DCGM_EXP_XID_ERRORS_COUNT":
                key += f"/xid{s.labels['xid']}"
            out.setdefault(fam.name, {})[key] = s.value  # the parser adds _total to counters
    return out


def scrape_until(url: str, ready: Callable[[Samples], bool], proc: subprocess.Popen, log: Path) -> Samples:
    """Scrape until ``ready`` holds (the simulated EFA counters move once per simulated second)."""
    last: Samples = {}
    for _ in range(600):
        assert proc.poll() is None, log.read_text()[-3000:]
        last = scrape(url)
        if ready(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"the injected faults never all showed: {sorted(last)[:20]}")


@pytest.mark.slow
def test_each_injected_fault_shows_in_a_scrape_on_its_gpu_or_nic(tmp_path: Path, subprocess_env) -> None:
    port = promserver.free_port()
    log = tmp_path / "exporter.log"
    args = [sys.executable, "-m", "rankwatch", "node-exporter", "--simulate", "--simulate-efa", "4",
            "--web.listen-address", f"127.0.0.1:{port}", "--hostname", "sim-node",
            "--inject", "thermal@0:3", "--inject", "xid79@0:1", "--inject", "dbe@0:2", "--inject", "lost@0:4",
            "--inject", "efa@0:2", "--inject", "thermal@0.2:6",
            "--inject", "thermal@86400:7"]  # due in a day: must not be there
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env)
    try:
        promserver.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        url = f"http://127.0.0.1:{port}/metrics"
        s = scrape_until(url, lambda s: (s["DCGM_FI_DEV_GPU_TEMP"].get("6") == 92.0
                                         and max(s["node_amazonefa_retrans_timeout_events"].values()) > 0), proc, log)
        temp, up = s["DCGM_FI_DEV_GPU_TEMP"], s["rankwatch_gpu_up"]
        # thermal: throttled hot GPUs 3 and 6, the one due tomorrow (7) and the others normal
        assert temp["3"] == 92.0 and s["DCGM_FI_DEV_SM_CLOCK"]["3"] == 1095.0
        assert all(temp[g] < 80 for g in ("0", "5", "7")), temp
        # xid79: GPU 1 fell off the bus: XID 79 reported, NVML no longer answers
        assert s["DCGM_FI_DEV_XID_ERRORS"]["1"] == 79.0 and up["1"] == 0.0
        # lost: GPU 4 stops answering, without an XID
        assert up["4"] == 0.0 and s["DCGM_FI_DEV_XID_ERRORS"]["4"] == 0.0
        # dbe: GPU 2 counts a double-bit error and reports XID 48, and still answers
        assert s["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"]["2"] >= 1 and s["DCGM_FI_DEV_XID_ERRORS"]["2"] == 48.0
        assert up["2"] == 1.0
        assert [g for g, v in up.items() if v == 0.0] == ["1", "4"]
        assert {g for g, v in s["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"].items() if v} == {"2"}
        # efa: only the third EFA device (index 2) times out and retransmits
        timeouts = s["node_amazonefa_retrans_timeout_events"]
        devices = sorted(timeouts)
        assert [d for d in devices if timeouts[d] > 0] == [devices[2]], timeouts
    finally:
        proc.terminate()
        code = proc.wait(timeout=20)
    text = log.read_text()
    assert code == 0, text
    for what in ("thermal on GPU 3", "xid79 on GPU 1", "dbe on GPU 2", "lost on GPU 4", "efa on EFA device 2",
                 "thermal on GPU 6"):
        assert f"injected {what}" in text
    assert "thermal on GPU 7" not in text


@pytest.mark.parametrize(("spec", "extra", "message"), [
    ("overheat@3", [], "unknown fault kind 'overheat'; expected one of thermal, xid79, dbe, lost, efa"),
    ("thermal", [], "expected KIND@SECONDS[:GPU|NIC]"),
    ("thermal@-3", [], "expected KIND@SECONDS[:GPU|NIC]"),
    ("thermal@3:8", ["--simulate"], "no GPU 8; the simulated node has 8 (--simulate-gpus)"),
    ("efa@3:4", ["--simulate", "--simulate-efa", "4"], "no EFA device 4; the simulated node has 4"),
    ("xid79@3", [], "faults are injected into simulated hardware only; add --simulate"),
])
def test_a_bad_inject_spec_is_a_one_line_error(spec: str, extra: list[str], message: str, capsys) -> None:
    try:
        code = main(["node-exporter", *extra, "--inject", spec])
    except SystemExit as exc:  # argparse's own errors (the spec's syntax) exit 2 too
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
