"""The fake EFA sysfs tree: the kernel's layout and file formats, advancing counters, faults,
and the committed fixture being exactly what the documented command generates."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rankwatch.exporters.efa import DEVICE_COUNTER_HELP, PORT_COUNTER_HELP
from rankwatch.sim.sysfs import (
    DEVICE_COUNTERS,
    NETWORK_COUNTERS,
    PORT_COUNTERS,
    FakeEfaSysfs,
    generate_fixture,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sysfs"


def read(path: Path) -> str:
    return path.read_text()


def test_tree_has_the_kernel_layout_and_formats(tmp_path: Path) -> None:
    sim = FakeEfaSysfs(tmp_path, devices=4, seed=3)
    assert sim.devices == ["rdmap16s0", "rdmap17s0", "rdmap18s0", "rdmap19s0"]
    for name in sim.devices:
        dev = tmp_path / "class" / "infiniband" / name
        # class entries are symlinks into the PCI device tree, as in sysfs
        assert dev.is_symlink()
        assert "/devices/pci0000:" in os.path.realpath(dev)
        assert read(dev / "device" / "vendor") == "0x1d0f\n"
        assert re.fullmatch(r"0x[0-9a-f]{4}\n", read(dev / "device" / "device"))
        assert re.fullmatch(r"([0-9a-f]{4}:){3}[0-9a-f]{4}\n", read(dev / "node_guid"))
        assert read(dev / "node_type") == "7: unspecified\n"
        assert read(dev / "fw_ver") == "\n"
        assert not (dev / "board_id").exists()
        assert sorted(os.listdir(dev / "ports")) == ["1"]
        port = dev / "ports" / "1"
        assert read(port / "state") == "4: ACTIVE\n"
        assert read(port / "phys_state") == "5: LinkUp\n"
        assert read(port / "rate") == "100 Gb/sec (4X EDR)\n"
        assert read(port / "link_layer") == "Unknown\n"
        assert not (port / "counters").exists()  # EFA has no IB PMA counters
        assert sorted(os.listdir(port / "hw_counters")) == sorted([*PORT_COUNTERS, "lifespan"])
        assert sorted(os.listdir(dev / "hw_counters")) == sorted([*DEVICE_COUNTERS, "lifespan"])
        for f in [*(port / "hw_counters").iterdir(), *(dev / "hw_counters").iterdir()]:
            assert re.fullmatch(r"\d+\n", read(f)), f  # "%llu\n"
        assert read(port / "hw_counters" / "lifespan") == "10\n"


def test_collector_knows_every_counter_the_driver_writes() -> None:
    assert list(PORT_COUNTER_HELP) == list(PORT_COUNTERS)
    assert set(DEVICE_COUNTERS) <= set(DEVICE_COUNTER_HELP)


def test_counters_advance_at_realistic_rates_and_faults_add_events(tmp_path: Path) -> None:
    sim = FakeEfaSysfs(tmp_path, devices=2, seed=1)
    dev = sim.devices[0]
    before = {c: sim.counter(dev, c) for c in PORT_COUNTERS}
    sim.inject(dev, "unresponsive_remote", rate=3)
    sim.inject(dev, "rx_drops", rate=50)
    sim.advance(10)
    hw = sim.device_path(dev) / "ports" / "1" / "hw_counters"
    after = {c: int(read(hw / c)) for c in PORT_COUNTERS}
    tx_rate = (after["tx_bytes"] - before["tx_bytes"]) / 10
    assert 0.3 * 12.5e9 < tx_rate < 0.5 * 12.5e9  # ~40 % of a 100 Gb/s link
    assert after["tx_pkts"] > before["tx_pkts"]
    assert after["unresponsive_remote_events"] - before["unresponsive_remote_events"] == 30
    assert after["rx_drops"] - before["rx_drops"] == 500
    other = sim.devices[1]
    assert sim.counter(other, "rx_drops") == 0
    sim.clear(dev)
    drops = sim.counter(dev, "rx_drops")
    sim.advance(10)
    assert sim.counter(dev, "rx_drops") == drops


def test_file_faults_break_and_repair_one_file(tmp_path: Path) -> None:
    sim = FakeEfaSysfs(tmp_path, devices=1, seed=1)
    path = sim.device_path(0) / "ports" / "1" / "hw_counters" / "tx_bytes"
    sim.inject(0, "garbage", counter="tx_bytes")
    assert read(path) == "N/A (no PMA)\n"
    sim.inject(0, "unreadable", counter="device:cmds_err")
    with pytest.raises(IsADirectoryError):
        read(sim.device_path(0) / "hw_counters" / "cmds_err")
    sim.clear(0)
    assert read(path) == f"{sim.counter(0, 'tx_bytes')}\n"
    assert read(sim.device_path(0) / "hw_counters" / "cmds_err") == "0\n"
    with pytest.raises(ValueError, match="unknown EFA fault"):
        sim.inject(0, "melted")
    with pytest.raises(KeyError, match="no EFA device"):
        sim.inject("rdmap99s0", "rx_drops")


def test_same_seed_same_tree(tmp_path: Path) -> None:
    a = FakeEfaSysfs(tmp_path / "a", devices=3, seed=5)
    b = FakeEfaSysfs(tmp_path / "b", devices=3, seed=5)
    a.advance(7)
    b.advance(7)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_node_exporter_compat_adds_mellanox_attributes(tmp_path: Path) -> None:
    sim = FakeEfaSysfs(tmp_path, devices=1, seed=1, node_exporter_compat=True)
    dev = sim.device_path(0)
    assert (dev / "board_id").exists() and (dev / "hca_type").exists()
    counters = dev / "ports" / "1" / "counters"
    # IB PMA data counters count 4-octet words
    assert int(read(counters / "port_xmit_data")) == sim.counter(0, "tx_bytes") // 4


def test_older_driver_lacks_network_counters(tmp_path: Path) -> None:
    sim = FakeEfaSysfs(tmp_path, devices=1, seed=1, network_counters=False)
    names = set(os.listdir(sim.device_path(0) / "ports" / "1" / "hw_counters"))
    assert not names & set(NETWORK_COUNTERS)
    assert "tx_bytes" in names


def test_committed_fixture_is_what_the_generator_writes(tmp_path: Path) -> None:
    """tests/fixtures/sysfs is regenerated by `python -m rankwatch.sim.sysfs --fixture DIR`."""
    generate_fixture(tmp_path / "sysfs")
    assert _tree(tmp_path / "sysfs") == _tree(FIXTURE)


def _tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_text()
    return out
