"""The EFA collector against fake sysfs trees: names and values as the HyperPod EFA exporter,
EFA devices only, broken files cost only their own device, a wedged device cannot hang a
scrape."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from rankwatch.exporters import efa
from rankwatch.exporters.efa import EfaCollector
from rankwatch.exporters.exposition import render
from rankwatch.sim.sysfs import NETWORK_COUNTERS, PORT_COUNTERS, FakeEfaSysfs

FIXTURE = Path(__file__).parent / "fixtures" / "sysfs"
EFA_DEVICES = ["rdmap16s0", "rdmap17s0", "rdmap18s0", "rdmap19s0"]

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Series (name as written, labels) → value, and family → type, from exposition text.
    (prometheus_client's parser renames counters to ``*_total``: not what is on the wire.)"""
    series: Series = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, line
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            series[(m.group(1), labels)] = float(m.group(3))
    return series, types


def scrape(collector: EfaCollector) -> tuple[Series, dict[str, str]]:
    return parse(render(collector.collect()).decode())


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def names_for(series: Series, device: str) -> set[str]:
    return {name for name, labels in series if ("device", device) in labels}


@pytest.fixture
def collector() -> Iterator[EfaCollector]:
    c = EfaCollector(FIXTURE, timeout=30.0)  # healthy devices: only a hang would reach it
    yield c
    c.close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[FakeEfaSysfs]:
    s = FakeEfaSysfs(tmp_path / "sys", devices=4, seed=11)
    yield s
    s.close()


def test_every_counter_file_is_exported_with_its_value(collector: EfaCollector) -> None:
    series, types = scrape(collector)
    for device in EFA_DEVICES:
        hw = FIXTURE / "class" / "infiniband" / device / "ports" / "1" / "hw_counters"
        files = sorted(p.name for p in hw.iterdir())
        assert files, device
        for f in files:
            expected = int((hw / f).read_text())
            assert value(series, f"node_amazonefa_{f}", device=device, port="1") == expected
        dev_hw = FIXTURE / "class" / "infiniband" / device / "hw_counters"
        for p in dev_hw.iterdir():
            assert value(series, f"node_amazonefa_{p.name}", device=device) == int(p.read_text())
        assert value(series, "rankwatch_efa_device_read_success", device=device) == 1
    # HyperPod names and types: counters without _total, lifespan a gauge
    assert types["node_amazonefa_tx_bytes"] == "counter"
    assert types["node_amazonefa_retrans_pkts"] == "counter"
    assert types["node_amazonefa_keep_alive_rcvd"] == "counter"
    assert types["node_amazonefa_lifespan"] == "gauge"
    assert value(series, "node_amazonefa_info", device="rdmap16s0", pci_address="0000:10:00.0",
                 node_guid=(FIXTURE / "class/infiniband/rdmap16s0/node_guid").read_text().strip(),
                 pci_device="0xefa1") == 1


def test_only_efa_devices(collector: EfaCollector) -> None:
    series, _ = scrape(collector)
    devices = {dict(labels).get("device") for _, labels in series} - {None}
    assert devices == set(EFA_DEVICES)  # mlx5_0 (vendor 0x15b3) is not an EFA device


def test_older_driver_missing_counters_are_not_errors(collector: EfaCollector) -> None:
    series, _ = scrape(collector)
    old = "rdmap19s0"
    present = names_for(series, old)
    assert not {f"node_amazonefa_{c}" for c in NETWORK_COUNTERS} & present
    assert "node_amazonefa_tx_bytes" in present
    assert value(series, "rankwatch_efa_device_read_success", device=old) == 1
    assert value(series, "rankwatch_efa_read_errors_total", device=old, reason="read") == 0


@pytest.mark.parametrize("fault,reason", [("garbage", "parse"), ("unreadable", "read")])
def test_a_broken_file_is_an_error_for_its_device_only(sim: FakeEfaSysfs, fault: str, reason: str) -> None:
    c = EfaCollector(sim.root, timeout=30.0)
    try:
        healthy, _ = scrape(c)
        bad = sim.devices[2]
        sim.inject(bad, fault, counter="rx_drops")
        sim.advance(1)
        series, _ = scrape(c)
        assert value(series, "rankwatch_efa_device_read_success", device=bad) == 0
        assert value(series, "rankwatch_efa_read_errors_total", device=bad, reason=reason) == 1
        # the bad device loses that one series, keeps the others
        assert ("node_amazonefa_rx_drops", frozenset({("device", bad), ("port", "1")})) not in series
        assert value(series, "node_amazonefa_tx_bytes", device=bad, port="1") == sim.counter(bad, "tx_bytes")
        for good in sim.devices:
            if good != bad:
                assert value(series, "rankwatch_efa_device_read_success", device=good) == 1
                assert names_for(series, good) == names_for(healthy, good)
        for n in (2, 3):  # and so on, scrape after scrape: only that one file is missing
            series, _ = scrape(c)
            assert value(series, "rankwatch_efa_read_errors_total", device=bad, reason=reason) == n
            assert names_for(series, bad) == names_for(healthy, bad) - {"node_amazonefa_rx_drops"}
        sim.clear(bad)
        series, _ = scrape(c)
        assert value(series, "rankwatch_efa_device_read_success", device=bad) == 1
        assert value(series, "node_amazonefa_rx_drops", device=bad, port="1") == sim.counter(bad, "rx_drops")
    finally:
        c.close()


def test_a_wedged_device_cannot_hang_the_scrape(sim: FakeEfaSysfs) -> None:
    # The wedged counter file blocks open() until the test clears it at the end: every scrape
    # below returning at all is the check (a scrape that waited for it would never return).
    c = EfaCollector(sim.root, timeout=5.0)  # long enough for the healthy devices on a busy machine
    try:
        scrape(c)
        wedged = sim.devices[1]
        sim.inject(wedged, "wedged", counter="tx_bytes")  # a FIFO: open() blocks
        sim.advance(2)
        series, _ = scrape(c)
        assert value(series, "rankwatch_efa_device_read_success", device=wedged) == 0
        assert value(series, "rankwatch_efa_read_errors_total", device=wedged, reason="timeout") == 1
        for good in sim.devices:
            if good != wedged:  # the other devices were read in time, with fresh values
                assert value(series, "node_amazonefa_tx_bytes", device=good, port="1") == sim.counter(good, "tx_bytes")
        # The stuck read is not repeated: each new read would block one more thread, scrape
        # after scrape, so the process' thread count would grow (the reader pool settles at
        # its size plus one thread per stuck read after the second scrape).
        scrape(c)
        threads = threading.active_count()
        for n in (3, 4, 5, 6):
            series, _ = scrape(c)
            assert value(series, "rankwatch_efa_read_errors_total", device=wedged, reason="timeout") == n
        assert threading.active_count() == threads
        assert value(series, "node_amazonefa_info", device=wedged, pci_address="0000:11:00.0",
                     node_guid=(sim.device_path(wedged) / "node_guid").read_text().strip(), pci_device="0xefa1") == 1
        sim.clear(wedged)  # the blocked read returns; the device comes back
        wait_until(lambda: value(scrape(c)[0], "rankwatch_efa_device_read_success", device=wedged) == 1,
                   "the cleared device to be read again")
        series, _ = scrape(c)
        assert value(series, "node_amazonefa_tx_bytes", device=wedged, port="1") == sim.counter(wedged, "tx_bytes")
    finally:
        sim.close()
        c.close()


def test_values_follow_the_counters_with_or_without_cached_files(sim: FakeEfaSysfs, monkeypatch) -> None:
    cached = EfaCollector(sim.root)
    monkeypatch.setattr(efa, "FD_BUDGET", efa._FdBudget())
    monkeypatch.setattr(efa.FD_BUDGET, "_limit", 0)  # no descriptor may stay open
    uncached = EfaCollector(sim.root)
    try:
        for step in range(3):
            sim.inject(0, "retransmits", rate=100 * (step + 1))
            sim.advance(5)
            a, _ = scrape(cached)
            b, _ = scrape(uncached)
            assert a == b
            for dev in sim.devices:
                for counter in PORT_COUNTERS:
                    assert value(a, f"node_amazonefa_{counter}", device=dev, port="1") == sim.counter(dev, counter)
    finally:
        cached.close()
        uncached.close()


def test_new_and_removed_files_and_devices_are_seen(sim: FakeEfaSysfs, tmp_path: Path) -> None:
    c = EfaCollector(sim.root)
    try:
        scrape(c)
        sim.inject(0, "missing", counter="rx_drops")
        series, _ = scrape(c)
        assert ("node_amazonefa_rx_drops", frozenset({("device", sim.devices[0]), ("port", "1")})) not in series
        assert value(series, "rankwatch_efa_device_read_success", device=sim.devices[0]) == 1
        sim.clear(0)
        series, _ = scrape(c)
        assert value(series, "node_amazonefa_rx_drops", device=sim.devices[0], port="1") == sim.counter(0, "rx_drops")
        (sim.class_dir / sim.devices[3]).unlink()  # hot-unplugged
        series, _ = scrape(c)
        assert not names_for(series, sim.devices[3])
    finally:
        c.close()


def test_no_infiniband_class_means_no_series_not_an_error(tmp_path: Path) -> None:
    c = EfaCollector(tmp_path)
    try:
        families = c.collect()
        assert [f.name for f in families] == ["rankwatch_efa_open_files", "rankwatch_efa_invalid_device_names"]
        assert families[1].samples[0].value == 0
    finally:
        c.close()


def test_device_counters_listed_at_port_level_are_not_doubled(tmp_path: Path) -> None:
    """Drivers before r1.14 listed the port stats in the device hw_counters too."""
    sim = FakeEfaSysfs(tmp_path / "sys", devices=1, seed=2)
    dev_hw = sim.device_path(0) / "hw_counters"
    shutil.copy(sim.device_path(0) / "ports" / "1" / "hw_counters" / "tx_bytes", dev_hw / "tx_bytes")
    c = EfaCollector(sim.root)
    try:
        series, _ = scrape(c)
        tx = [k for k in series if k[0] == "node_amazonefa_tx_bytes"]
        assert tx == [("node_amazonefa_tx_bytes", frozenset({("device", sim.devices[0]), ("port", "1")}))]
    finally:
        c.close()
