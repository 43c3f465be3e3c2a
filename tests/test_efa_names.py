"""Odd names under class/infiniband cost only their own device, port or file, counted as an
error, and never a scrape: a device renamed to bytes that are not UTF-8 (the kernel takes any
bytes but '/'), a port directory that is not a number, a stray file in hw_counters. Trees
come from the fake sysfs (rankwatch.sim.sysfs) in the kernel's formats."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from rankwatch.exporters.efa import EfaCollector
from rankwatch.exporters.exposition import render
from rankwatch.sim.node import SimulatedNode
from rankwatch.sim.sysfs import PORT_COUNTERS, FakeEfaSysfs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition under the name it has on the wire (prometheus_client's
    parser would rename counters to ``*_total``), after checking that the parser accepts it."""
    parsed = {(s.labels.get("device"), s.value) for f in text_string_to_metric_families(text) for s in f.samples}
    out: Samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _LINE.fullmatch(line)
            assert m, line
            labels = frozenset((k, _unescape(v)) for k, v in _LABEL.findall(m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
            assert (dict(labels).get("device"), float(m.group(3))) in parsed
    return out


_LINE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def get(out: Samples, name: str, **labels: str) -> float:
    return out[(name, frozenset(labels.items()))]


def devices_in(out: Samples, name: str) -> set[str]:
    return {dict(labels)["device"] for n, labels in out if n == name}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[FakeEfaSysfs]:
    s = FakeEfaSysfs(tmp_path / "sys", devices=3, seed=5)
    yield s
    s.close()


def scrape(c: EfaCollector) -> Samples:
    return samples(render(c.collect()).decode("utf-8"))


def test_a_non_utf8_device_name_costs_that_device_not_the_scrape(tmp_path: Path) -> None:
    node = SimulatedNode("odd-node", gpus=2, efa=3, sysfs_root=tmp_path / "sys")
    assert node.efa is not None
    healthy = node.efa.devices[0]
    node.efa.rename_device(1, b"rdmap\xff17s0")
    server = node.serve("127.0.0.1", 0)
    try:
        r = requests.get(server.url + "/metrics", timeout=30)
        assert r.status_code == 200, r.text[:500]
        out = samples(r.content.decode("utf-8"))  # strict: every byte served is UTF-8
        # GPU metrics are all there, and so are the other EFA devices
        assert len([k for k in out if k[0] == "DCGM_FI_DEV_GPU_TEMP"]) == 2
        assert get(out, "rankwatch_exporter_collector_success", collector="efa") == 1
        assert devices_in(out, "node_amazonefa_tx_bytes") == {healthy, node.efa.devices[2]}
        assert get(out, "node_amazonefa_tx_bytes", device=healthy, port="1") > 0
        assert get(out, "rankwatch_efa_invalid_device_names") == 1
    finally:
        node.close()


def test_a_port_named_like_a_digit_costs_only_that_port(sim: FakeEfaSysfs, caplog: pytest.LogCaptureFixture) -> None:
    dev = sim.devices[0]
    sim.add_port(dev, "²")  # str.isdigit("²") is True, int("²") raises
    c = EfaCollector(sim.root)
    try:
        with caplog.at_level(logging.WARNING, logger="rankwatch.exporters.efa"):
            for n in (1, 2, 3):
                out = scrape(c)
                # port 1 of that device keeps every counter
                for counter in PORT_COUNTERS:
                    assert get(out, f"node_amazonefa_{counter}", device=dev, port="1") == sim.counter(dev, counter)
                assert get(out, "node_amazonefa_submitted_cmds", device=dev) == sim.counter(dev, "device:submitted_cmds")
                assert not [k for k in out if ("port", "²") in k[1]]
                assert get(out, "rankwatch_efa_read_errors_total", device=dev, reason="name") == n
                assert get(out, "rankwatch_efa_device_read_success", device=dev) == 0
                for other in sim.devices[1:]:
                    assert get(out, "rankwatch_efa_device_read_success", device=other) == 1
                    assert get(out, "rankwatch_efa_read_errors_total", device=other, reason="name") == 0
        assert not [r for r in caplog.records if r.exc_info], "no traceback for an odd name"
        assert len([r for r in caplog.records if "²" in r.getMessage()]) == 1  # logged once, then counted
    finally:
        c.close()


@pytest.mark.parametrize("name", ["tx_bytes.swp", "Tx-Bytes", "über", b"rx_\xffbytes"], ids=repr)
def test_a_stray_counter_file_costs_only_that_file(sim: FakeEfaSysfs, name: str | bytes) -> None:
    dev = sim.devices[2]
    sim.add_file(dev, name, "12\n")
    c = EfaCollector(sim.root)
    try:
        out = scrape(c)
        assert get(out, "node_amazonefa_tx_bytes", device=dev, port="1") == sim.counter(dev, "tx_bytes")
        assert get(out, "rankwatch_efa_read_errors_total", device=dev, reason="name") == 1
        assert {n for n, _ in out if n.startswith("node_amazonefa_")} == {
            n for n, labels in out if n.startswith("node_amazonefa_") and ("device", sim.devices[0]) in labels}
    finally:
        c.close()


def test_an_unusual_but_valid_device_name_is_exported_as_is(sim: FakeEfaSysfs) -> None:
    name = sim.rename_device(0, 'efa "zero" \\ é')
    c = EfaCollector(sim.root)
    try:
        out = scrape(c)
        assert get(out, "node_amazonefa_tx_bytes", device=name, port="1") == sim.counter(name, "tx_bytes")
        assert get(out, "rankwatch_efa_invalid_device_names") == 0
    finally:
        c.close()
