"""EFA collector: AWS Elastic Fabric Adapter counters from sysfs, under the HyperPod EFA
exporter's names so that existing EFA dashboards keep working.

For every RDMA device under ``<sysfs>/class/infiniband`` whose PCI vendor is Amazon (0x1d0f):

* ``node_amazonefa_<counter>{device,port}`` for every file in ``ports/<port>/hw_counters/``
  (counters, no ``_total`` suffix: the upstream names win over Prometheus convention),
* ``node_amazonefa_<counter>{device}`` for every file in the device-level ``hw_counters/``,
* ``node_amazonefa_lifespan`` as a gauge (it is the kernel's cache time in ms, not a counter),
* ``node_amazonefa_info{device,pci_address,node_guid,pci_device} 1``,
* own health series: ``rankwatch_efa_device_read_success{device}``,
  ``rankwatch_efa_read_errors_total{device,reason}``, ``rankwatch_efa_invalid_device_names``
  and the port link rate.

Names come from the kernel, but a name that could not be a label value, or that no kernel
writes (a device name that is not UTF-8 text, a port that is not a decimal number, a counter
file that is not a metric-name suffix), costs only its own device, port or file: it is skipped
and counted (reason ``name``), never allowed to fail the scrape.

A worker thread reads the devices one after another and the scrape waits at most ``timeout``
seconds: a device whose admin queue is wedged (a read can block for the 30 s admin timeout)
shows up as a failed device instead of hanging the scrape, and another worker takes over the
devices after it. Its read stays in flight and is not retried until it returns, so a wedged
device holds at most one thread.

Counter files stay open between scrapes and are re-read with one ``pread()`` each: three
times cheaper than open/read/close, and sysfs regenerates an attribute read at offset 0.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from rankwatch.daemonpool import DaemonPool
from rankwatch.exporters.exposition import label_text

log = logging.getLogger(__name__)

EFA_PCI_VENDOR = 0x1D0F
PREFIX = "node_amazonefa_"
ERROR_REASONS = ("read", "parse", "timeout", "name")

# HELP text per counter, in the kernel's order (efa_verbs.c); wording from the AWS EFA and
# CloudWatch documentation.
PORT_COUNTER_HELP: dict[str, str] = {
    "tx_bytes": "Number of bytes transmitted.",
    "tx_pkts": "Number of packets transmitted.",
    "rx_bytes": "Number of bytes received.",
    "rx_pkts": "Number of packets received.",
    "rx_drops": "Number of packets received and then dropped.",
    "send_bytes": "Number of bytes sent using send operations.",
    "send_wrs": "Number of send work requests.",
    "recv_bytes": "Number of bytes received using send operations.",
    "recv_wrs": "Number of receive work requests.",
    "rdma_read_wrs": "Number of RDMA read work requests.",
    "rdma_read_bytes": "Number of bytes received using RDMA read.",
    "rdma_read_wr_err": "Number of RDMA read work requests that completed with an error.",
    "rdma_read_resp_bytes": "Number of bytes sent in response to RDMA read requests.",
    "rdma_write_wrs": "Number of RDMA write work requests.",
    "rdma_write_bytes": "Number of bytes sent using RDMA write.",
    "rdma_write_wr_err": "Number of RDMA write work requests that completed with an error.",
    "rdma_write_recv_bytes": "Number of bytes received by remote RDMA writes.",
    "retrans_bytes": "Number of EFA SRD bytes retransmitted.",
    "retrans_pkts": "Number of EFA SRD packets retransmitted.",
    "retrans_timeout_events": "Number of times EFA SRD traffic timed out and resulted in a network path change.",
    "unresponsive_remote_events": "Number of times an EFA SRD remote connection was unresponsive.",
    "impaired_remote_conn_events": "Number of times EFA SRD connections entered an impaired state, "
                                   "resulting in a reduced throughput rate limit.",
}
DEVICE_COUNTER_HELP: dict[str, str] = {
    "submitted_cmds": "Number of admin commands submitted to the device.",
    "completed_cmds": "Number of admin commands the device completed.",
    "cmds_err": "Number of admin commands that completed with an error.",
    "no_completion_cmds": "Number of admin commands that timed out without completion.",
    "keep_alive_rcvd": "Number of keep-alive events received from the device.",
    "alloc_pd_err": "Number of failed protection domain allocations.",
    "create_qp_err": "Number of failed queue pair creations.",
    "create_cq_err": "Number of failed completion queue creations.",
    "reg_mr_err": "Number of failed memory region registrations.",
    "alloc_ucontext_err": "Number of failed user context allocations.",
    "create_ah_err": "Number of failed address handle creations.",
    "mmap_err": "Number of failed mmap calls.",
    "alloc_mr_err": "Number of failed memory region allocations (kernel verbs builds).",
    "get_dma_mr_err": "Number of failed DMA memory region requests (kernel verbs builds).",
}
LIFESPAN_HELP = ("Milliseconds the kernel caches a hw_counters group before it asks the device "
                 "again (hw_counters/lifespan; a setting, not a counter).")

_NAME_OK = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED = frozenset({"info"})  # node_amazonefa_info is the identity family
_PORT_OK = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²"
# C0/C1 control characters: legal in a label value, but no kernel device name holds them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNKNOWN = object()
# Sample(name, labels, value) without the namedtuple's Python-level __new__: ~1 300 samples per
# scrape on a p5. The tail fills the optional fields (timestamp, exemplar, ...) with None.
_SAMPLE_TAIL = (None,) * (len(Sample._fields) - 3)


def _sample(name: str, labels: dict[str, str], value: float) -> Sample:
    return tuple.__new__(Sample, (name, labels, value, *_SAMPLE_TAIL))


def valid_device_name(name: str) -> bool:
    """Whether a directory name under class/infiniband can be a ``device`` label value: UTF-8
    text without control characters (os.listdir() hands undecodable bytes over as lone
    surrogates, which no label value may hold)."""
    if not name or _CONTROL.search(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _Identity:
    pci_address: str
    pci_device: str
    node_guid: str


@dataclass
class _DeviceRead:
    """What one pass over a device's files found."""

    device: str
    identity: _Identity | None  # None: not an EFA device, or not known yet
    identified: bool = True  # False: the PCI vendor could not be read
    ports: list[tuple[str, dict[str, int], float | None]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, path, detail)


def _read_bytes(path: str, size: int = 128) -> bytes:
    # os.open/os.read instead of open(): no buffered text layer, a third of the cost per file.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _parse_counter(data: bytes) -> int | None:
    text = data.strip()
    # "%llu\n" only: no sign, no "N/A (no PMA)", nothing empty.
    return int(text) if text.isdigit() else None


class _FdBudget:
    """How many counter files, across the process, may stay open between scrapes.

    Reading an open sysfs attribute again at offset 0 makes the kernel call its show() again
    (seq_file restarts at position 0), so a cached descriptor costs one pread() per scrape
    instead of open()+read()+close() — most of the EFA collector's time. The budget keeps
    that below the open-files limit, which many simulated nodes in one process would hit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used = 0
        self._limit: int | None = None

    def take(self, n: int) -> bool:
        with self._lock:
            if self._limit is None:
                soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
                self._limit = max(0, soft - 512) // 2  # the rest for sockets, logs, libraries
            if self._used + n > self._limit:
                return False
            self._used += n
            return True

    @property
    def used(self) -> int:
        return self._used

    def give(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)


FD_BUDGET = _FdBudget()


class _CounterDir:
    """The open counter files of one hw_counters directory, reopened whenever the directory
    changes (a file added, removed or replaced changes its mtime, ctime or inode)."""

    __slots__ = ("key", "fds")

    def __init__(self, key: tuple[int, ...], fds: dict[str, int]) -> None:
        self.key = key
        self.fds = fds

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        FD_BUDGET.give(len(self.fds))
        self.fds = {}


def _dir_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class _CounterReader:
    """Reads hw_counters directories, keeping their files open between scrapes when the
    descriptor budget allows. Used by one device read at a time (the collector never reads
    a device twice at once), so it needs no lock of its own."""

    def __init__(self) -> None:
        self._dirs: dict[str, _CounterDir] = {}

    def read(self, path: str, result: _DeviceRead) -> dict[str, int]:
        """Every counter file of one directory. An absent directory or file (older drivers) is
        not an error; an unreadable or non-numeric file is, for this device only."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self.forget(path)
            return {}
        except OSError as exc:
            result.errors.append(("read", path, exc.strerror or str(exc)))
            return {}
        cached = self._dirs.get(path)
        if cached is not None and cached.key == _dir_key(st):
            return self._read_cached(path, cached, result)
        self.forget(path)
        values, fds = self._read_opening(path, result)
        if fds is not None:
            self._dirs[path] = _CounterDir(_dir_key(st), fds)
        return values

    def _read_cached(self, path: str, cached: _CounterDir, result: _DeviceRead) -> dict[str, int]:
        values: dict[str, int] = {}
        failed = False
        pread = os.pread  # the hot loop of a scrape: ~1 200 files on a p5
        for name, fd in cached.fds.items():
            try:
                data = pread(fd, 128, 0)
            except OSError as exc:
                result.errors.append(("read", path + "/" + name, exc.strerror or str(exc)))
                failed = True
                continue
            if data[:-1].isdigit() and data[-1:] == b"\n":  # "%llu\n": int() takes the newline
                values[name] = int(data)
            elif (text := data.strip()).isdigit():  # (same test as _parse_counter, inlined)
                values[name] = int(text)
            else:
                result.errors.append(("parse", path + "/" + name, repr(data[:40])))
        if failed:  # e.g. ENODEV: the device went away under us. Reopen everything next time.
            self.forget(path)
        return values

    def _read_opening(self, path: str, result: _DeviceRead) -> tuple[dict[str, int], dict[str, int] | None]:
        """Read with open()+read(); keep the descriptors if every file opened and the budget
        allows, else close them (and try again next scrape)."""
        try:
            # Files are opened relative to the directory: the kernel resolves the long sysfs
            # path (through the class symlink) once per directory instead of once per file.
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return {}, None
        except OSError as exc:
            result.errors.append(("read", path, exc.strerror or str(exc)))
            return {}, None
        values: dict[str, int] = {}
        fds: dict[str, int] = {}
        keep = True
        try:
            for name in os.listdir(dfd):
                if not _NAME_OK.fullmatch(name) or name in _RESERVED:
                    # No kernel attribute is named so; it cannot be a metric name either (or
                    # would be a second family under the name of one of ours).
                    result.errors.append(("name", path + "/" + name, "not a counter name"))
                    keep = False  # look again next scrape (and count it again)
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    result.errors.append(("read", path + "/" + name, exc.strerror or str(exc)))
                    keep = False
                    continue
                try:
                    data = os.read(fd, 128)
                except OSError as exc:
                    result.errors.append(("read", path + "/" + name, exc.strerror or str(exc)))
                    os.close(fd)
                    keep = False  # open this directory afresh until the file reads again
                    continue
                fds[name] = fd
                value = _parse_counter(data)
                if value is None:
                    result.errors.append(("parse", path + "/" + name, repr(data[:40])))
                else:
                    values[name] = value
        except OSError as exc:  # listing failed
            result.errors.append(("read", path, exc.strerror or str(exc)))
            keep = False
        finally:
            os.close(dfd)
        if keep and FD_BUDGET.take(len(fds)):
            return values, fds
        for fd in fds.values():
            os.close(fd)
        return values, None

    def forget(self, path: str) -> None:
        cached = self._dirs.pop(path, None)
        if cached is not None:
            cached.close()

    def forget_under(self, prefix: str) -> None:
        for path in [p for p in self._dirs if p.startswith(prefix)]:
            self.forget(path)

    def close(self) -> None:
        for path in list(self._dirs):
            self.forget(path)


def _read_rate(path: str, result: _DeviceRead) -> float | None:
    """ports/<p>/rate, e.g. "100 Gb/sec (4X EDR)", as bytes per second."""
    try:
        text = _read_bytes(path).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        result.errors.append(("read", path, exc.strerror or str(exc)))
        return None
    parts = text.split()
    try:
        if len(parts) < 2 or parts[1] != "Gb/sec":
            raise ValueError(text)
        return float(parts[0]) * 1e9 / 8
    except ValueError:
        result.errors.append(("parse", path, repr(text[:40])))
        return None


def _identify(base: str) -> Any:
    """The device's PCI identity if it is an EFA device, None if it is another vendor's, and
    _UNKNOWN if the vendor cannot be read (asked again next scrape)."""
    try:
        vendor = int(_read_bytes(base + "/device/vendor").strip(), 16)
    except (OSError, ValueError):
        return _UNKNOWN
    if vendor != EFA_PCI_VENDOR:
        return None
    try:
        pci_device = _read_bytes(base + "/device/device").decode("ascii", "replace").strip()
    except OSError:
        pci_device = ""
    try:
        node_guid = _read_bytes(base + "/node_guid").decode("ascii", "replace").strip()
    except OSError:
        node_guid = ""
    pci_address = label_text(os.path.basename(os.path.realpath(base + "/device")))
    return _Identity(pci_address, pci_device, node_guid)


class _Batch:
    """The devices of one scrape, read one after another by whichever workers drain it."""

    def __init__(self, devices: list[tuple[str, Any]], read: Callable[[str, Any], _DeviceRead],
                 on_bug: Callable[[str, BaseException], None]) -> None:
        self._queue = list(reversed(devices))
        self._total = len(devices)
        self._read = read
        self._on_bug = on_bug
        self._cond = threading.Condition()
        self._active: set[str] = set()
        self._closed = False
        self.results: dict[str, _DeviceRead] = {}

    def drain(self) -> None:
        while True:
            with self._cond:
                if self._closed or not self._queue:
                    return
                device, identity = self._queue.pop()
                self._active.add(device)
            try:
                result = self._read(device, identity)
            except Exception as exc:  # a bug must cost one device, not the scrape
                self._on_bug(device, exc)
                result = _DeviceRead(device, identity if isinstance(identity, _Identity) else None,
                                     identified=False, errors=[("read", device, repr(exc))])
            with self._cond:
                self._active.discard(device)
                if not self._closed:
                    self.results[device] = result
                    if len(self.results) == self._total:
                        self._cond.notify_all()  # wake the scrape once, not per device

    def wait(self, done: int, timeout: float) -> int | None:
        """Block until every device is read (→ None) or ``timeout`` passes (→ devices done)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.results) == self._total, timeout)
            return None if len(self.results) == self._total else len(self.results)

    def close(self) -> set[str]:
        """Stop handing out devices; returns the devices whose read is still stuck."""
        with self._cond:
            self._closed = True
            return set(self._active)

    def is_active(self, device: str) -> bool:
        with self._cond:
            return device in self._active


class EfaCollector:
    """Collects EFA counters from ``<sysfs_path>/class/infiniband`` on every call to collect()."""

    name = "efa"

    def __init__(self, sysfs_path: str | os.PathLike[str] = "/sys", *, timeout: float = 1.0,
                 workers: int = 1) -> None:
        if not (math.isfinite(timeout) and timeout > 0):  # NaN fails every comparison
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.sysfs_path = os.fspath(sysfs_path)
        self.timeout = timeout
        self._class_dir = os.path.join(self.sysfs_path, "class", "infiniband")
        self._pool = DaemonPool(max(1, workers), "rankwatch-efa")
        self._lock = threading.Lock()
        self._lock_bugs = threading.Lock()
        self._identities: dict[str, _Identity | None] = {}
        self._readers: dict[str, _CounterReader] = {}  # per device: reads of one device never overlap
        self._inflight: dict[str, _Batch] = {}  # devices whose read is stuck in the kernel
        self._errors: dict[str, dict[str, int]] = {}
        self._logged: set[tuple[str, str]] = set()
        self._logged_no_class = False
        self._invalid_names = 0
        self._bugs_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ reading
    def _reader(self, device: str) -> _CounterReader:
        reader = self._readers.get(device)
        if reader is None:
            reader = self._readers.setdefault(device, _CounterReader())
        return reader

    def _read_device(self, device: str, identity: Any) -> _DeviceRead:
        base = self._class_dir + "/" + device
        if identity is _UNKNOWN:
            identity = _identify(base)
        if identity is _UNKNOWN or identity is None:
            return _DeviceRead(device, None, identified=identity is None)
        result = _DeviceRead(device, identity)
        ports_dir = base + "/ports"
        try:
            names = os.listdir(ports_dir)
        except FileNotFoundError:
            names = []
        except OSError as exc:
            result.errors.append(("read", ports_dir, exc.strerror or str(exc)))
            names = []
        ports = []
        for port in names:
            if _PORT_OK.fullmatch(port):
                ports.append(port)
            else:  # the kernel numbers ports 1..N
                result.errors.append(("name", ports_dir + "/" + port, "not a port number"))
        ports.sort(key=int)
        for port in ports:
            pdir = ports_dir + "/" + port
            counters = self._reader(device).read(pdir + "/hw_counters", result)
            result.ports.append((port, counters, _read_rate(pdir + "/rate", result)))
        result.counters = self._reader(device).read(base + "/hw_counters", result)
        return result

    def _read_all(self) -> tuple[list[_DeviceRead], list[str]]:
        """Read every device within the deadline: (finished reads, devices that timed out)."""
        try:
            names = sorted(os.listdir(self._class_dir))
        except (FileNotFoundError, NotADirectoryError):
            if not self._logged_no_class:
                log.info("no RDMA devices: %s does not exist", self._class_dir)
                self._logged_no_class = True
            names = []
        valid = [n for n in names if valid_device_name(n)]
        self._invalid_names = len(names) - len(valid)
        for bad in names:
            if bad not in valid and ("name", bad) not in self._logged:
                self._logged.add(("name", bad))
                log.warning("EFA: skipping %r under %s: a device name must be UTF-8 text "
                            "(counted in rankwatch_efa_invalid_device_names)", os.fsencode(bad), self._class_dir)
        names = valid
        present = set(names)
        self._inflight = {d: b for d, b in self._inflight.items() if b.is_active(d)}
        for gone in [d for d in self._identities if d not in present]:
            del self._identities[gone]
        for gone in [d for d in self._readers if d not in present and d not in self._inflight]:
            self._readers.pop(gone).close()
        self._pool.resize(len(self._inflight))
        timed_out: list[str] = [d for d in names if d in self._inflight]
        todo = [d for d in names if d not in self._inflight and self._identities.get(d, _UNKNOWN) is not None]
        batch = _Batch([(d, self._identities.get(d, _UNKNOWN)) for d in todo], self._read_device, self._on_bug)
        if todo:
            self._pool.submit(batch.drain)
            self._wait(batch)
        stuck = batch.close()
        for device in stuck:
            self._inflight[device] = batch
        reads: list[_DeviceRead] = []
        for device in todo:
            result = batch.results.get(device)
            if result is None:  # stuck, or never reached before the deadline
                timed_out.append(device)
                continue
            if result.identified:
                self._identities[device] = result.identity
            reads.append(result)
        # A device we have never identified and that timed out may not be EFA: still report it
        # (its health series), since silence would hide a wedged NIC.
        timed_out = sorted(d for d in timed_out if self._identities.get(d, _UNKNOWN) is not None)
        return [r for r in reads if r.identity is not None], timed_out

    def _wait(self, batch: _Batch) -> None:
        """Wait for the batch until the deadline. One worker reads the devices one after
        another (more workers would only fight over the GIL); when no device finishes for a
        quarter of the timeout, that worker is stuck on a wedged device and another one takes
        over the rest of the queue."""
        deadline = time.monotonic() + self.timeout
        done = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            progress = batch.wait(done, min(left, self.timeout / 4))
            if progress is None:
                return  # all read
            if progress == done:
                self._pool.grow()
                self._pool.submit(batch.drain)
            done = progress

    def _on_bug(self, device: str, exc: BaseException) -> None:
        """An unexpected exception while reading one device: logged with its traceback once per
        device and kind, then only counted (a read error of that device)."""
        key = (device, type(exc).__name__)
        with self._lock_bugs:
            first = key not in self._bugs_logged
            self._bugs_logged.add(key)
        if first:
            log.error("reading EFA device %s failed; further failures of this kind are only counted "
                      "(rankwatch_efa_read_errors_total)", device, exc_info=exc)

    def _count_errors(self, device: str, errors: list[tuple[str, str, str]]) -> None:
        counts = self._errors.setdefault(device, dict.fromkeys(ERROR_REASONS, 0))
        for reason, path, detail in errors:
            counts[reason] += 1
            if (reason, path) not in self._logged:  # once per file until the device recovers
                self._logged.add((reason, path))
                log.warning("EFA device %s: %s error on %r: %s", device, reason, path, detail)

    # ------------------------------------------------------------------ families
    def collect(self) -> list[Metric]:
        with self._lock:  # the node daemon never overlaps scrapes; a library user might
            reads, timed_out = self._read_all()
            for r in reads:
                self._count_errors(r.device, r.errors)
                if not r.errors:
                    prefix = self._class_dir + "/" + r.device
                    self._logged = {k for k in self._logged if k[1] != prefix and not k[1].startswith(prefix + "/")}
            for device in timed_out:
                self._count_errors(device, [("timeout", self._class_dir + "/" + device,
                                             f"no answer within {self.timeout:g}s")])
            for gone in [d for d in self._errors if d not in {r.device for r in reads} | set(timed_out)]:
                del self._errors[gone]
            return self._families(reads, timed_out)

    def _families(self, reads: list[_DeviceRead], timed_out: list[str]) -> list[Metric]:
        info = GaugeMetricFamily(PREFIX + "info", "EFA device information (always 1).",
                                 labels=["device", "pci_address", "node_guid", "pci_device"])
        lifespan = Metric(PREFIX + "lifespan", LIFESPAN_HELP, "gauge")
        rate = GaugeMetricFamily("rankwatch_efa_port_rate_bytes_per_second",
                                 "Link rate of the EFA port from sysfs ports/<port>/rate, in bytes per second.",
                                 labels=["device", "port"])
        # A device that did not answer keeps its info series (identity known from earlier
        # scrapes): a wedged NIC must stay visible, not vanish.
        identities = {d: i for d in timed_out if isinstance(i := self._identities.get(d), _Identity)}
        identities.update({r.device: r.identity for r in reads if r.identity is not None})
        for device, ident in sorted(identities.items()):
            info.add_metric([device, ident.pci_address, ident.node_guid, ident.pci_device], 1)
        # Samples are built directly, sharing one label dict per (device, port): ~1 300 of
        # them per scrape on a p5, so add_sample()'s per-call overhead shows.
        port_values: dict[str, list[Sample]] = {}
        device_values: dict[str, list[tuple[dict[str, str], int]]] = {}
        for r in sorted(reads, key=lambda r: r.device):
            device = r.device
            port_names: set[str] = set()
            for port, counters, link_rate in r.ports:
                labels = {"device": device, "port": port}
                for name, value in counters.items():
                    if name == "lifespan":
                        lifespan.samples.append(_sample(PREFIX + "lifespan", labels, value))
                    else:
                        port_values.setdefault(name, []).append(_sample(PREFIX + name, labels, value))
                        port_names.add(name)
                if link_rate is not None:
                    rate.samples.append(_sample(rate.name, labels, link_rate))
            dev_labels = {"device": device}
            for name, value in r.counters.items():
                if name == "lifespan":
                    lifespan.samples.append(_sample(PREFIX + "lifespan", dev_labels, value))
                elif name not in port_names:
                    # Drivers before r1.14 listed the port stats at device level too: one
                    # series per value, never the same bytes twice.
                    device_values.setdefault(name, []).append((dev_labels, value))
        families: list[Metric] = [info] if info.samples else []
        for name in _ordered(port_values, PORT_COUNTER_HELP):
            fam = Metric(PREFIX + name, PORT_COUNTER_HELP.get(name, f"EFA port counter {name} from sysfs hw_counters."),
                         "counter")
            fam.samples = port_values[name]
            families.append(fam)
        if lifespan.samples:
            families.append(lifespan)
        used = {f.name for f in families} | {PREFIX + "lifespan"}
        for name in _ordered(device_values, DEVICE_COUNTER_HELP):
            # never mix label sets in one family: a device counter named like a port counter
            fam_name = PREFIX + ("device_" + name if name in port_values else name)
            if fam_name in used:  # only a tree no kernel writes gets here (port file device_<x>)
                continue
            fam = Metric(fam_name, DEVICE_COUNTER_HELP.get(name, f"EFA device counter {name} from sysfs hw_counters."),
                         "counter")
            fam.samples = [_sample(fam_name, labels, value) for labels, value in device_values[name]]
            families.append(fam)
        if rate.samples:
            families.append(rate)
        families.extend(self._health_families(reads, timed_out))
        return families

    def _health_families(self, reads: list[_DeviceRead], timed_out: list[str]) -> list[Metric]:
        success = GaugeMetricFamily("rankwatch_efa_device_read_success",
                                    "1 if every sysfs file of the EFA device was read and parsed in this "
                                    "scrape, 0 if a file failed or the device did not answer in time.",
                                    labels=["device"])
        errors = CounterMetricFamily("rankwatch_efa_read_errors",
                                     "sysfs files of the EFA device that could not be read (read), held no "
                                     "number (parse), did not answer within the timeout (timeout), or "
                                     "had a name no kernel writes (name: skipped).",
                                     labels=["device", "reason"])
        open_files = GaugeMetricFamily("rankwatch_efa_open_files",
                                       "Counter files the EFA collectors of this process keep open between "
                                       "scrapes (each is re-read with one pread).")
        open_files.add_metric([], FD_BUDGET.used)
        invalid = GaugeMetricFamily("rankwatch_efa_invalid_device_names",
                                    "Entries under class/infiniband skipped in this scrape because their name "
                                    "cannot be a label value (not UTF-8 text, or control characters).")
        invalid.add_metric([], self._invalid_names)
        status = {r.device: not r.errors for r in reads}
        status.update(dict.fromkeys(timed_out, False))
        for device in sorted(status):
            success.add_metric([device], 1 if status[device] else 0)
            for reason in ERROR_REASONS:
                errors.add_metric([device, reason], self._errors.get(device, {}).get(reason, 0))
        return [f for f in (success, errors) if f.samples] + [open_files, invalid]

    def close(self) -> None:
        """Stop the reader threads and close cached files (not those of a read still stuck)."""
        with self._lock:
            self._pool.close()
            for device, reader in list(self._readers.items()):
                batch = self._inflight.get(device)
                if batch is None or not batch.is_active(device):
                    reader.close()
            self._readers.clear()


def _ordered(values: dict[str, Any], known: dict[str, str]) -> list[str]:
    """Known counters in kernel order, then any newer ones alphabetically."""
    return [n for n in known if n in values] + sorted(n for n in values if n not in known)
