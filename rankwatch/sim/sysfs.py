"""A fake ``/sys/class/infiniband`` tree for AWS EFA devices, in the kernel's file formats.

The tree mirrors what the EFA driver (≥ r2.17) and the RDMA core create, so that the EFA
collector and Debian's node_exporter read it exactly as they read a real host:

    <root>/devices/pci0000:XX/0000:XX:00.0/{vendor,device}            "0x1d0f\\n", "0xefa1\\n"
    <root>/devices/pci0000:XX/0000:XX:00.0/infiniband/<dev>/…          the RDMA device
    <root>/class/infiniband/<dev> -> ../../devices/…/infiniband/<dev>  (a symlink, as in sysfs)
    <dev>/device -> ../../../0000:XX:00.0
    <dev>/{node_type,node_guid,sys_image_guid,fw_ver}
    <dev>/hw_counters/{12 device counters, lifespan}
    <dev>/ports/1/{state,phys_state,rate,link_layer,lid,…}
    <dev>/ports/1/hw_counters/{22 port counters, lifespan}
    <dev>/ports/1/counters/…   only with ``node_exporter_compat=True``: Mellanox-style PMA
    <dev>/{board_id,hca_type}  counters and attributes, without which node_exporter 1.5's
                               infiniband collector returns nothing (a real EFA has neither)

Counters are ``"%llu\\n"`` and advance with :meth:`FakeEfaSysfs.advance` at rates that look like
an NCCL job on a p5.48xlarge (32 × 100 Gb/s devices, ~40 % busy). Faults change those rates
(retransmits, timeouts, unresponsive or impaired remotes, rx drops, low throughput) or break a
file the way a sick device does (garbage content, unreadable, a read that blocks, a missing
file). Everything is deterministic for a given seed and sequence of calls.

Regenerate the committed test fixture with ``python -m rankwatch.sim.sysfs --fixture DIR``.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EFA_VENDOR = 0x1D0F
EFA_PCI_DEVICE = 0xEFA1  # EFA on Nitro v4/v5 (p5); efa_main.c lists efa0..efa3

# Kernel order of the port counters (efa_verbs.c EFA_DEFINE_PORT_STATS).
PORT_COUNTERS: tuple[str, ...] = (
    "tx_bytes", "tx_pkts", "rx_bytes", "rx_pkts", "rx_drops",
    "send_bytes", "send_wrs", "recv_bytes", "recv_wrs",
    "rdma_read_wrs", "rdma_read_bytes", "rdma_read_wr_err", "rdma_read_resp_bytes",
    "rdma_write_wrs", "rdma_write_bytes", "rdma_write_wr_err", "rdma_write_recv_bytes",
    "retrans_bytes", "retrans_pkts", "retrans_timeout_events",
    "unresponsive_remote_events", "impaired_remote_conn_events",
)
# Added by driver r2.17.0 (Nitro v4+): older drivers lack these files.
NETWORK_COUNTERS: tuple[str, ...] = PORT_COUNTERS[17:]
RDMA_WRITE_COUNTERS: tuple[str, ...] = PORT_COUNTERS[13:17]
# efa_verbs.c EFA_DEFINE_DEVICE_STATS.
DEVICE_COUNTERS: tuple[str, ...] = (
    "submitted_cmds", "completed_cmds", "cmds_err", "no_completion_cmds", "keep_alive_rcvd",
    "alloc_pd_err", "create_qp_err", "create_cq_err", "reg_mr_err", "alloc_ucontext_err",
    "create_ah_err", "mmap_err",
)

# IB PMA counters of a Mellanox port (counters/), for the node_exporter comparison only.
PMA_COUNTERS: tuple[str, ...] = (
    "excessive_buffer_overrun_errors", "link_downed", "link_error_recovery",
    "local_link_integrity_errors", "port_rcv_constraint_errors", "port_rcv_data",
    "port_rcv_errors", "port_rcv_packets", "port_rcv_remote_physical_errors",
    "port_rcv_switch_relay_errors", "port_xmit_constraint_errors", "port_xmit_data",
    "port_xmit_discards", "port_xmit_packets", "port_xmit_wait", "symbol_error", "VL15_dropped",
)

# Traffic faults: fault name → (counter it drives, default events per second).
TRAFFIC_FAULTS: dict[str, tuple[str, float]] = {
    "retransmits": ("retrans_pkts", 5000.0),
    "timeouts": ("retrans_timeout_events", 2.0),
    "unresponsive_remote": ("unresponsive_remote_events", 1.0),
    "impaired_remote": ("impaired_remote_conn_events", 0.5),
    "rx_drops": ("rx_drops", 100.0),
}
# File faults break one counter file the way a sick device or driver does.
FILE_FAULTS = ("garbage", "unreadable", "wedged", "missing")
FAULTS = (*TRAFFIC_FAULTS, "throughput", *FILE_FAULTS)

_PKT_BYTES = 8192        # SRD packet payload of a large message
_WRITE_WR_BYTES = 262144  # NCCL's RDMA write chunk
_SEND_WR_BYTES = 65536
_BACKGROUND_RETRANS = 1e-6  # fraction of packets retransmitted on a healthy fabric


def _gbps_rate_text(gbps: int) -> str:
    # core rate_show() with the speed/width pair efa_link_gbps_to_speed_and_width() picks.
    table = {400: "8X HDR", 200: "4X HDR", 120: "12X FDR10", 100: "4X EDR", 60: "12X DDR",
             50: "1X HDR", 40: "4X FDR10", 30: "12X SDR"}
    if gbps not in table:
        return "25 Gb/sec (1X EDR)\n"
    return f"{gbps} Gb/sec ({table[gbps]})\n"


@dataclass
class _Device:
    name: str
    pci: str
    path: Path  # the ib device directory (under devices/, not the class symlink)
    base_rate: float  # tx bytes per second
    rx_ratio: float
    values: dict[str, float] = field(default_factory=dict)  # port counters (port 1)
    dev_values: dict[str, float] = field(default_factory=dict)
    faults: dict[str, dict[str, float | str]] = field(default_factory=dict)


class FakeEfaSysfs:
    """Generate and drive a fake sysfs tree with ``devices`` EFA devices under ``root``.

    ``root`` plays the part of ``/sys`` (pass it as ``--path.sysfs``). ``network_counters=False``
    models a driver older than r2.17 (no ``retrans_*``/``*_events`` files);
    ``node_exporter_compat=True`` adds the Mellanox-style ``ports/1/counters/``, ``board_id``
    and ``hca_type`` that node_exporter 1.5 insists on.
    """

    def __init__(self, root: str | os.PathLike[str], devices: int = 32, *, seed: int | str = 0,
                 network_counters: bool = True, rdma_write: bool = True, node_exporter_compat: bool = False,
                 link_gbps: int = 100, lifespan_ms: int = 10, utilization: float = 0.4,
                 uptime_s: float = 3600.0) -> None:
        self.root = Path(root)
        self.class_dir = self.root / "class" / "infiniband"
        self.seed = seed
        self.network_counters = network_counters
        self.rdma_write = rdma_write
        self.node_exporter_compat = node_exporter_compat
        self.link_gbps = link_gbps
        self.lifespan_ms = lifespan_ms
        self._rng = random.Random(seed)
        self._lengths: dict[Path, int] = {}
        self._devices: dict[str, _Device] = {}
        self.class_dir.mkdir(parents=True, exist_ok=True)
        link_bytes = link_gbps * 1e9 / 8
        for i in range(devices):
            bus = 0x10 + 0x10 * (i // 4) + (i % 4)
            name = f"rdmap{bus}s0"
            base_rate = link_bytes * utilization * self._rng.uniform(0.985, 1.015)
            dev = _Device(name, f"0000:{bus:02x}:00.0", Path(), base_rate, self._rng.uniform(0.995, 1.005))
            self._create_device(dev, i)
            self._devices[name] = dev
            self._step(dev, uptime_s)
            self._write_counters(dev)

    # ------------------------------------------------------------------ tree creation
    @property
    def devices(self) -> list[str]:
        """EFA device names, in creation order."""
        return list(self._devices)

    def device_path(self, device: str | int) -> Path:
        return self._device(device).path

    def _create_device(self, dev: _Device, index: int) -> None:
        bus = dev.pci.split(":")[1]
        pci_dir = self.root / "devices" / f"pci0000:{bus}" / dev.pci
        self._write(pci_dir / "vendor", f"0x{EFA_VENDOR:04x}\n")
        self._write(pci_dir / "device", f"0x{EFA_PCI_DEVICE:04x}\n")
        self._write(pci_dir / "subsystem_vendor", f"0x{EFA_VENDOR:04x}\n")
        self._write(pci_dir / "subsystem_device", "0x0000\n")
        dev.path = pci_dir / "infiniband" / dev.name
        self._link_class(dev.name, dev.path, pci_dir)
        guid = self._rng.getrandbits(64)
        guid_text = ":".join(f"{(guid >> s) & 0xFFFF:04x}" for s in (48, 32, 16, 0))
        self._write(dev.path / "node_type", "7: unspecified\n")
        self._write(dev.path / "node_guid", guid_text + "\n")
        self._write(dev.path / "sys_image_guid", guid_text + "\n")
        self._write(dev.path / "fw_ver", "\n")  # EFA has no get_dev_fw_str
        if self.node_exporter_compat:
            self._write(dev.path / "board_id", "\n")
            self._write(dev.path / "hca_type", "\n")
        self._write(dev.path / "hw_counters" / "lifespan", f"{self.lifespan_ms}\n", mode=0o644)
        port = dev.path / "ports" / "1"
        for fname, text in (("state", "4: ACTIVE\n"), ("phys_state", "5: LinkUp\n"),
                            ("rate", _gbps_rate_text(self.link_gbps)), ("link_layer", "Unknown\n"),
                            ("lid", "0x0\n"), ("sm_lid", "0x0\n"), ("sm_sl", "0\n"),
                            ("lid_mask_count", "0\n"), ("cap_mask", "0x00000000\n")):
            self._write(port / fname, text)
        self._write(port / "hw_counters" / "lifespan", f"{self.lifespan_ms}\n", mode=0o644)
        dev.values = {c: 0.0 for c in self._port_counter_names()}
        dev.dev_values = {c: 0.0 for c in DEVICE_COUNTERS}

    def _link_class(self, name: str, ib_dir: Path, pci_dir: Path) -> None:
        ib_dir.mkdir(parents=True, exist_ok=True)
        link = self.class_dir / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(ib_dir, self.class_dir))
        dev_link = ib_dir / "device"
        if not dev_link.is_symlink():
            dev_link.symlink_to(os.path.relpath(pci_dir, ib_dir))

    def _port_counter_names(self) -> list[str]:
        names = list(PORT_COUNTERS)
        if not self.network_counters:
            names = [n for n in names if n not in NETWORK_COUNTERS]
        if not self.rdma_write:
            names = [n for n in names if n not in RDMA_WRITE_COUNTERS]
        return names

    def add_foreign_device(self, name: str = "mlx5_0", vendor: int = 0x15B3, pci: str = "0000:c1:00.0") -> Path:
        """A non-EFA RDMA device (a Mellanox ConnectX by default): exporters must ignore it."""
        bus = pci.split(":")[1]
        pci_dir = self.root / "devices" / f"pci0000:{bus}" / pci
        self._write(pci_dir / "vendor", f"0x{vendor:04x}\n")
        self._write(pci_dir / "device", "0x101d\n")
        ib_dir = pci_dir / "infiniband" / name
        self._link_class(name, ib_dir, pci_dir)
        self._write(ib_dir / "node_type", "1: CA\n")
        self._write(ib_dir / "node_guid", "b859:9f03:00d4:3c2a\n")
        self._write(ib_dir / "fw_ver", "28.39.1002\n")
        self._write(ib_dir / "board_id", "MT_0000000838\n")
        self._write(ib_dir / "hca_type", "MT4129\n")
        port = ib_dir / "ports" / "1"
        for fname, text in (("state", "4: ACTIVE\n"), ("phys_state", "5: LinkUp\n"),
                            ("rate", "400 Gb/sec (4X NDR)\n"), ("link_layer", "InfiniBand\n")):
            self._write(port / fname, text)
        for c in ("out_of_buffer", "out_of_sequence", "packet_seq_err", "local_ack_timeout_err"):
            self._write(port / "hw_counters" / c, "0\n")
        self._write(port / "hw_counters" / "lifespan", "10\n", mode=0o644)
        for c in PMA_COUNTERS:
            self._write(port / "counters" / c, "0\n")
        return ib_dir

    # ------------------------------------------------------------------ counters
    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of traffic pass on every device and rewrite the counter files."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        for dev in self._devices.values():
            self._step(dev, seconds)
            self._write_counters(dev)

    def _step(self, dev: _Device, seconds: float) -> None:
        if seconds == 0:
            return
        scale = float(dev.faults.get("throughput", {}).get("factor", 1.0))
        if "impaired_remote" in dev.faults:
            scale *= float(dev.faults["impaired_remote"].get("throughput", 0.5))
        # A little noise per step so that rates are not perfectly flat; seeded, so repeatable.
        tx = dev.base_rate * scale * seconds * self._rng.uniform(0.997, 1.003)
        rx = tx * dev.rx_ratio
        v = dev.values
        inc: dict[str, float] = {
            "tx_bytes": tx, "tx_pkts": tx / _PKT_BYTES, "rx_bytes": rx, "rx_pkts": rx / _PKT_BYTES,
            "send_bytes": 0.28 * tx, "send_wrs": 0.28 * tx / _SEND_WR_BYTES,
            "recv_bytes": 0.28 * rx, "recv_wrs": 0.28 * rx / _SEND_WR_BYTES,
            "rdma_read_bytes": 0.02 * rx, "rdma_read_wrs": 0.02 * rx / _WRITE_WR_BYTES,
            "rdma_read_resp_bytes": 0.02 * tx,
            "rdma_write_bytes": 0.70 * tx, "rdma_write_wrs": 0.70 * tx / _WRITE_WR_BYTES,
            "rdma_write_recv_bytes": 0.70 * rx,
            "retrans_pkts": _BACKGROUND_RETRANS * tx / _PKT_BYTES,
        }
        for fault, (counter, default_rate) in TRAFFIC_FAULTS.items():
            if fault in dev.faults:
                inc[counter] = inc.get(counter, 0.0) + float(dev.faults[fault].get("rate", default_rate)) * seconds
        if "timeouts" in dev.faults:  # a path change retransmits what was in flight
            inc["retrans_pkts"] += 64 * float(dev.faults["timeouts"].get("rate", 2.0)) * seconds
        inc["retrans_bytes"] = inc["retrans_pkts"] * _PKT_BYTES
        for name, amount in inc.items():
            if name in v:
                v[name] += amount
        # Device counters: keep-alives once a second; the admin queue handles a few commands.
        d = dev.dev_values
        d["keep_alive_rcvd"] += seconds
        d["submitted_cmds"] += 5 * seconds
        d["completed_cmds"] += 5 * seconds

    def _write_counters(self, dev: _Device) -> None:
        hw = dev.path / "ports" / "1" / "hw_counters"
        broken = {str(p.get("counter")) for f, p in dev.faults.items() if f in FILE_FAULTS}
        for name, value in dev.values.items():
            if name not in broken:
                self._write(hw / name, f"{int(value)}\n")
        dhw = dev.path / "hw_counters"
        for name, value in dev.dev_values.items():
            if f"device:{name}" not in broken:
                self._write(dhw / name, f"{int(value)}\n")
        if self.node_exporter_compat:
            self._write_pma(dev)

    def _write_pma(self, dev: _Device) -> None:
        # IB PMA data counters count 4-octet words; error counters stay 0 as on a clean link.
        v = dev.values
        derived = {"port_xmit_data": v["tx_bytes"] / 4, "port_rcv_data": v["rx_bytes"] / 4,
                   "port_xmit_packets": v["tx_pkts"], "port_rcv_packets": v["rx_pkts"]}
        counters = dev.path / "ports" / "1" / "counters"
        for name in PMA_COUNTERS:
            self._write(counters / name, f"{int(derived.get(name, 0))}\n")

    def counter(self, device: str | int, name: str) -> int:
        """The value the sim last wrote for a port (or, as ``device:<name>``, device) counter."""
        dev = self._device(device)
        if name.startswith("device:"):
            return int(dev.dev_values[name.split(":", 1)[1]])
        return int(dev.values[name])

    # ------------------------------------------------------------------ faults
    def inject(self, device: str | int, fault: str, *, rate: float | None = None, factor: float | None = None,
               counter: str = "tx_bytes", content: str = "N/A (no PMA)\n") -> None:
        """Start a fault on ``device`` (a name or an index into :attr:`devices`).

        Traffic faults (``rate`` = events per second): ``retransmits``, ``timeouts``,
        ``unresponsive_remote``, ``impaired_remote`` (also halves throughput), ``rx_drops``;
        ``throughput`` scales the device's traffic by ``factor``.
        File faults on ``counter`` (a port counter, or ``device:<name>`` for a device counter):
        ``garbage`` (the file holds ``content``), ``unreadable`` (reading fails with EISDIR),
        ``wedged`` (a FIFO: opening it blocks until :meth:`clear`), ``missing``.
        """
        dev = self._device(device)
        if fault not in FAULTS:
            raise ValueError(f"unknown EFA fault {fault!r}; expected one of {', '.join(FAULTS)}")
        params: dict[str, float | str] = {}
        if fault in TRAFFIC_FAULTS:
            params["rate"] = TRAFFIC_FAULTS[fault][1] if rate is None else float(rate)
        elif fault == "throughput":
            params["factor"] = 0.5 if factor is None else float(factor)
        else:
            if fault in dev.faults:  # one broken file per fault kind and device
                self.clear(dev.name, fault)
            path = self._counter_path(dev, counter)
            params["counter"] = counter
            self._break_file(path, fault, content)
        dev.faults[fault] = params

    def clear(self, device: str | int | None = None, fault: str | None = None) -> None:
        """End ``fault`` (or every fault) on ``device`` (or on every device)."""
        devs = [self._device(device)] if device is not None else list(self._devices.values())
        for dev in devs:
            for name in [f for f in dev.faults if fault is None or f == fault]:
                params = dev.faults.pop(name)
                if name in FILE_FAULTS:
                    self._repair_file(dev, str(params["counter"]))

    def downgrade_driver(self, device: str | int) -> None:
        """Make ``device`` look as on a driver older than r2.17: the five network counter files
        (``retrans_*``, ``*_events``) do not exist."""
        dev = self._device(device)
        for name in NETWORK_COUNTERS:
            if dev.values.pop(name, None) is not None:
                self._remove(dev.path / "ports" / "1" / "hw_counters" / name)

    def faults(self, device: str | int) -> dict[str, dict[str, float | str]]:
        return {k: dict(v) for k, v in self._device(device).faults.items()}

    def _counter_path(self, dev: _Device, counter: str) -> Path:
        if counter.startswith("device:"):
            name = counter.split(":", 1)[1]
            if name not in dev.dev_values and name != "lifespan":
                raise ValueError(f"{dev.name} has no device counter {name!r}")
            return dev.path / "hw_counters" / name
        if counter not in dev.values and counter != "lifespan":
            raise ValueError(f"{dev.name} has no port counter {counter!r}")
        return dev.path / "ports" / "1" / "hw_counters" / counter

    def _break_file(self, path: Path, fault: str, content: str) -> None:
        self._remove(path)
        if fault == "garbage":
            self._write(path, content)
        elif fault == "unreadable":
            path.mkdir()  # read() fails with EISDIR, as an I/O error would
        elif fault == "wedged":
            os.mkfifo(path)  # open() blocks until a writer appears: a read that never returns

    def _repair_file(self, dev: _Device, counter: str) -> None:
        path = self._counter_path(dev, counter)
        self._release_fifo(path)
        self._remove(path)
        if counter.endswith("lifespan"):
            self._write(path, f"{self.lifespan_ms}\n", mode=0o644)
        else:
            self._write(path, f"{self.counter(dev.name, counter)}\n")

    @staticmethod
    def _release_fifo(path: Path) -> None:
        # Opening the write end lets every reader blocked in open() through (they read EOF).
        try:
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ENOENT):  # ENXIO: nobody is reading
                raise

    def _remove(self, path: Path) -> None:
        self._lengths.pop(path, None)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()

    def close(self) -> None:
        """Unblock any reader stuck on a wedged file (the tree itself stays)."""
        for dev in self._devices.values():
            for name, params in list(dev.faults.items()):
                if name == "wedged":
                    self._release_fifo(self._counter_path(dev, str(params["counter"])))

    # ------------------------------------------------------------------ odd names
    def rename_device(self, device: str | int, name: str | bytes) -> str:
        """Rename a device as ``rdma dev set DEV name NAME`` does: the device directory and its
        ``class/infiniband`` link both take the new name. The kernel accepts any bytes but
        ``/`` (up to 63), so ``name`` may be bytes that are not UTF-8. Returns the name as
        ``os.listdir()`` reports it (undecodable bytes as lone surrogates)."""
        dev = self._device(device)
        new = os.fsdecode(name)
        if not new or "/" in new or len(os.fsencode(new)) > 63:
            raise ValueError(f"{name!r}: an RDMA device name is 1-63 bytes without '/'")
        new_path = dev.path.with_name(new)
        dev.path.rename(new_path)
        (self.class_dir / dev.name).unlink()
        (self.class_dir / new).symlink_to(os.path.relpath(new_path, self.class_dir))
        self._lengths = {new_path / p.relative_to(dev.path) if p.is_relative_to(dev.path) else p: n
                         for p, n in self._lengths.items()}
        old = dev.name
        dev.name, dev.path = new, new_path
        self._devices = {(new if k == old else k): v for k, v in self._devices.items()}  # same order
        return new

    def add_port(self, device: str | int, port: str | bytes) -> Path:
        """A second port directory named ``port`` holding copies of port 1's counters (no kernel
        names a port other than 1..N: this is what a broken driver or a tampered tree shows)."""
        dev = self._device(device)
        src = dev.path / "ports" / "1"
        dst = dev.path / "ports" / os.fsdecode(port)
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def add_file(self, device: str | int, name: str | bytes, content: str = "0\n", *, port: str | None = "1") -> Path:
        """A stray file named ``name`` in a port's (or, with ``port=None``, the device's)
        ``hw_counters`` directory."""
        dev = self._device(device)
        base = dev.path / "hw_counters" if port is None else dev.path / "ports" / port / "hw_counters"
        path = base / os.fsdecode(name)
        self._write(path, content)
        return path

    def _device(self, device: str | int) -> _Device:
        if isinstance(device, int):
            try:
                return list(self._devices.values())[device]
            except IndexError:
                raise KeyError(f"no EFA device #{device} (have {len(self._devices)})") from None
        try:
            return self._devices[device]
        except KeyError:
            raise KeyError(f"no EFA device {device!r} (have {', '.join(self._devices)})") from None

    # ------------------------------------------------------------------ file writing
    def _write(self, path: Path, text: str, mode: int = 0o444) -> None:
        """Write a sysfs attribute. Counters only grow, so a counter update rewrites the file in
        place with one write() that is never shorter than the old content: a concurrent reader
        (node_exporter during a benchmark) never sees an empty or torn file."""
        data = text.encode()
        old = self._lengths.get(path)
        if old is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.chmod(path, mode)
        else:
            flags = os.O_WRONLY | (os.O_TRUNC if len(data) < old else 0)
            # Files are made read-only like sysfs; the owner may still write them unless
            # running unprivileged, so lift the mode for the write when needed.
            try:
                fd = os.open(path, flags)
            except PermissionError:
                os.chmod(path, 0o644)
                fd = os.open(path, flags)
                os.chmod(path, mode)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        self._lengths[path] = len(data)


def generate_fixture(root: str | os.PathLike[str], *, seed: int = 7) -> FakeEfaSysfs:
    """The committed test tree: four EFA devices (the last one on a pre-r2.17 driver without the
    five network counters), one with an active retransmit fault, and a Mellanox device that
    exporters must ignore."""
    sim = FakeEfaSysfs(root, devices=4, seed=seed, uptime_s=7200.0)
    sim.inject(1, "retransmits", rate=250.0)
    sim.advance(60.0)
    sim.downgrade_driver(sim.devices[-1])
    sim.add_foreign_device()
    return sim


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rankwatch.sim.sysfs",
                                     description="Write a fake /sys tree with EFA devices.")
    parser.add_argument("root", help="directory to create; pass it to --path.sysfs")
    parser.add_argument("--devices", type=int, default=32, help="EFA devices to create (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the devices' names and rates (default: 0)")
    parser.add_argument("--node-exporter-compat", action="store_true",
                        help="also create Mellanox-style ports/1/counters/, board_id and hca_type, "
                             "without which node_exporter 1.5 exports nothing")
    parser.add_argument("--no-network-counters", action="store_true",
                        help="model a driver older than r2.17 (no retrans_* / *_events files)")
    parser.add_argument("--fixture", action="store_true",
                        help="write the committed test fixture tree (other options ignored)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if root.exists() and any(root.iterdir()):
        parser.error(f"{root} exists and is not empty")
    if args.fixture:
        generate_fixture(root)
    else:
        FakeEfaSysfs(root, devices=args.devices, seed=args.seed, node_exporter_compat=args.node_exporter_compat,
                     network_counters=not args.no_network_counters)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
