"""GPU collector: NVML (through pynvml's API) → dcgm-exporter 4.8.2 metric families.

The collector only talks to "an nvml module": the real ``pynvml`` by default, or
``rankwatch.sim.nvml`` swapped in at that boundary. Values come from the NVML calls DCGM
itself uses; every call and every field of ``nvmlDeviceGetFieldValues`` is checked on its
own, so one failing field or one lost GPU never breaks a scrape or hides the other GPUs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml
from prometheus_client.metrics_core import Metric

from rankwatch.exporters import dcgm_fields as F
from rankwatch.exporters.xid import FAIL, PASS, WARN, XidListener, XidState, classify

log = logging.getLogger(__name__)

_MIB = 1 << 20
_UINT_MAX = 0xFFFFFFFF
_HEALTH_WATCHES = ("ALL", "MEM", "NVLINK", "PCIE", "PMU", "POWER", "THERMAL")
# XIDs that get a zero series from the start, so that increase() sees their first event.
_WATCHED_XIDS = (48, 63, 64, 74, 79, 94, 95, 119)
# Counters whose recent growth makes a GPU "warn": (metric, watch, error code, threshold).
_GROWTH_RULES = (
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "NVLINK", "DCGM_FR_NVLINK_ERROR_THRESHOLD", 0),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "PCIE", "DCGM_FR_PCI_REPLAY_RATE", 40),
)
# Samples kept per health window and counter (one per second at the default 300 s).
_HISTORY_SLOTS = 300
_JOB_FILE = re.compile(r"^(\d+)(\.\d+)?$")

# nvmlDeviceGetFieldValues ids → metric name. One batched call per GPU, each field's
# nvmlReturn checked on its own.
_FIELD_IDS: tuple[tuple[str, int], ...] = (
    ("DCGM_FI_DEV_MEMORY_TEMP", pynvml.NVML_FI_DEV_MEMORY_TEMP),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL),
    ("DCGM_FI_DEV_RETIRED_SBE", pynvml.NVML_FI_DEV_RETIRED_SBE),
    ("DCGM_FI_DEV_RETIRED_DBE", pynvml.NVML_FI_DEV_RETIRED_DBE),
    ("DCGM_FI_DEV_RETIRED_PENDING", pynvml.NVML_FI_DEV_RETIRED_PENDING),
    ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL),
    ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL),
    ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL),
    ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL),
    ("DCGM_FI_DEV_POWER_VIOLATION", pynvml.NVML_FI_DEV_PERF_POLICY_POWER),
    ("DCGM_FI_DEV_THERMAL_VIOLATION", pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", pynvml.NVML_FI_DEV_REMAPPED_COR),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", pynvml.NVML_FI_DEV_REMAPPED_UNC),
    ("DCGM_FI_DEV_ROW_REMAP_PENDING", pynvml.NVML_FI_DEV_REMAPPED_PENDING),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", pynvml.NVML_FI_DEV_REMAPPED_FAILURE),
    ("nvlink_tx_kib", pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX),
    ("nvlink_rx_kib", pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX),
)
_SCOPED = {pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX}

# GPM metric → (DCGM name, scale): ratios 0–1 from percent, bytes/s from MiB/s.
_GPM_METRICS: tuple[tuple[str, int, float], ...] = (
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, 0.01),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, 0.01),
    ("DCGM_FI_PROF_DRAM_ACTIVE", pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, 0.01),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, float(_MIB)),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, float(_MIB)),
)
_INT_PROF = {"DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"}


# Errors after which a GPU counts as not answering (it fell off the bus, needs a reset, or
# the driver underneath NVML went away); any other error costs only the one reading.
_NOT_ANSWERING = {
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_GPU_NOT_FOUND,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_UNINITIALIZED,
}


class _Lost(Exception):
    """The GPU stopped answering (GPU_IS_LOST and friends) in the middle of a read."""

    def __init__(self, error: Any) -> None:
        super().__init__(str(error))
        self.error = error


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_ERROR_NAMES = {
    getattr(pynvml, n): n for n in sorted(dir(pynvml), reverse=True) if n.startswith("NVML_ERROR_")
}


def _error_name(exc: Any) -> str:
    """NVML_ERROR_* name of an NVMLError (stable, unlike its message)."""
    value = getattr(exc, "value", None)
    return _ERROR_NAMES.get(value, f"NVML_ERROR_{value}")


_VALUE_MEMBER = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


def _field_value(fv: Any) -> float:
    """The value of a c_nvmlFieldValue_t, read through the union member its valueType names."""
    return getattr(fv.value, _VALUE_MEMBER.get(fv.valueType, "ullVal"))


def read_job_mapping(path: str) -> dict[int, list[str]]:
    """dcgm-exporter's HPC job mapping: files named ``<gpu>`` (or ``<gpu>.<gi>``, counted for
    the parent GPU), one job id per line. A missing directory means no jobs."""
    jobs: dict[int, list[str]] = {}
    try:
        entries = list(os.scandir(path))
    except OSError:
        return jobs
    for entry in sorted(entries, key=lambda e: e.name):
        m = _JOB_FILE.match(entry.name)
        if not m:
            continue
        try:
            with open(entry.path, encoding="utf-8", errors="replace") as fh:
                ids = [line.strip() for line in fh if line.strip()]
        except OSError:
            continue
        per_gpu = jobs.setdefault(int(m.group(1)), [])
        per_gpu.extend(j for j in ids if j not in per_gpu)
    return {g: j for g, j in jobs.items() if j}


@dataclass
class _Gpu:
    index: int
    handle: Any = None
    uuid: str = ""
    pci_bus_id: str = ""
    model: str = ""
    lost_error: str | None = None  # NVML_ERROR_* name while the GPU does not answer
    logged_lost: bool = False
    unsupported: set[str] = field(default_factory=set)  # calls/fields NVML says it lacks
    gpm: bool = False
    gpm_off_reason: str | None = None  # why DCGM_FI_PROF_* are not exported (None: exported)
    gpm_samples: list[Any] = field(default_factory=list)  # [previous, spare]
    gpm_time: float = 0.0
    gpm_values: dict[str, float] | None = None
    nvlink_prev: tuple[float, float] | None = None  # (KiB tx+rx, seconds)
    nvlink_rate: float = 0.0
    prev_reasons: int = 0
    clock_events: dict[str, int] = field(default_factory=lambda: {n: 0 for _, n in F.CLOCK_EVENT_BITS})
    history: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)  # last successful reading


class _Families:
    """The DCGM families of one scrape, emitted in default-counters.csv order."""

    _ORDER = (*F.FIELDS, F.XID_COUNT, F.CLOCK_EVENTS_COUNT, F.HEALTH_STATUS)

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def get(self, f: F.Field) -> Metric:
        fam = self._by_name.get(f.name)
        if fam is None:
            fam = self._by_name[f.name] = Metric(f.name, f.help, f.type)
        return fam

    def ordered(self) -> list[Metric]:
        return [self._by_name[f.name] for f in self._ORDER if f.name in self._by_name]


class _Series:
    """Adds one GPU's samples, once per HPC job when the GPU has jobs (as dcgm-exporter does)."""

    def __init__(self, families: _Families, base: dict[str, str], jobs: list[str] | None) -> None:
        self._families, self._base, self._jobs = families, base, jobs

    def add(self, f: F.Field, value: float, extra: dict[str, str] | None = None) -> None:
        # Callers pass `extra` sorted by name: dcgm-exporter sorts the labels after Hostname.
        fam = self._families.get(f)
        if self._jobs is None:
            fam.add_sample(f.name, {**self._base, **extra} if extra else self._base, value)
            return
        for job in self._jobs:
            more = {**(extra or {}), "hpc_job": job}
            fam.add_sample(f.name, {**self._base, **{k: more[k] for k in sorted(more)}}, value)


class GpuCollector:
    """dcgm-exporter-compatible GPU metrics from NVML, built afresh on every scrape.

    ``nvml``: the pynvml module, or anything with its API (``rankwatch.sim.nvml``).
    ``hostname``: the ``Hostname`` label (default ``$NODE_NAME``, else the host name).
    ``job_mapping_dir``: dcgm-exporter's HPC job mapping directory (``hpc_job`` label).
    ``listen_xid_events``: run the XID listener thread (``xid_wait_ms`` bounds its wait, so
    also how long ``close()`` takes). ``expected_gpus``: how many GPUs the node should have
    when NVML cannot say (default: NVML's count at start). ``init_retry_s``: how often a
    failed ``nvmlInit`` is retried at scrape time. ``rate_interval_s``: the shortest interval
    for GPM ratios and the NVLink rate (closer scrapes reuse the last value).
    ``health_window_s``: how long growing NVLink recovery / PCIe replay counters keep a warning.
    """

    name = "gpu"

    def __init__(
        self,
        nvml: Any = pynvml,
        *,
        hostname: str | None = None,
        job_mapping_dir: str | None = None,
        listen_xid_events: bool = True,
        expected_gpus: int | None = None,
        xid_wait_ms: int = 1000,
        init_retry_s: float = 60.0,
        rate_interval_s: float = 1.0,
        health_window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self.hostname = hostname or os.environ.get("NODE_NAME") or socket.gethostname()
        self._job_dir = job_mapping_dir
        self._listen = listen_xid_events
        self._expected_override = expected_gpus
        self._xid_wait_ms = xid_wait_ms
        self._init_retry_s = init_retry_s
        self._rate_interval_s = rate_interval_s
        self._health_window_s = health_window_s
        self._clock = clock  # paces GPM samples and the health window; injectable for tests
        self._lock = threading.Lock()
        self._initialized = False
        self._init_error: str | None = None
        self._init_logged = False
        self._next_init = 0.0
        self._driver = ""
        self._gpus: list[_Gpu] = []
        self._xids = XidState()
        self._listener: XidListener | None = None
        self._errors: dict[tuple[str, str, str], int] = {}
        self._closed = False
        if job_mapping_dir and not os.path.isdir(job_mapping_dir):
            log.info("HPC job mapping directory %s does not exist yet: no job has started on this node "
                     "(Slurm's prolog creates it); no hpc_job labels until it appears", job_mapping_dir)
        with self._lock:
            self._try_init()

    # --- lifecycle -----------------------------------------------------------------------------
    def _try_init(self) -> None:
        nvml = self._nvml
        self._next_init = time.monotonic() + self._init_retry_s
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self._init_error = str(exc)
            if not self._init_logged:
                log.warning(
                    "NVML unavailable (%s): no GPU metrics; retrying every %.0f s", exc, self._init_retry_s
                )
                self._init_logged = True
            return
        try:
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            self._init_error = str(exc)
            log.warning("NVML initialised but cannot list GPUs: %s", exc)
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass
            return
        self._initialized = True
        if self._init_logged:
            log.warning("NVML available now (driver %s, %d GPUs)", self._driver, count)
        self._init_error = None
        self._gpus = [_Gpu(index=i) for i in range(max(count, self._expected_override or 0))]
        for g in self._gpus[:count]:
            self._discover(g)
        if self._listen:
            handles = {g.index: g.handle for g in self._gpus if g.handle is not None}
            try:
                self._listener = XidListener(nvml, handles, self._xids, wait_ms=self._xid_wait_ms)
            except nvml.NVMLError as exc:
                log.warning("XID events unavailable: %s", exc)
        log.info("GPU collector: driver %s, %d GPUs", self._driver, count)

    def _discover(self, g: _Gpu) -> None:
        """Identity (cached: a lost GPU keeps its labels) and the first GPM sample of one GPU."""
        nvml = self._nvml
        try:
            g.handle = nvml.nvmlDeviceGetHandleByIndex(g.index)
            g.uuid = _text(nvml.nvmlDeviceGetUUID(g.handle))
            g.pci_bus_id = _text(nvml.nvmlDeviceGetPciInfo(g.handle).busId)
            g.model = _text(nvml.nvmlDeviceGetName(g.handle))
        except nvml.NVMLError as exc:
            g.handle = None
            g.lost_error = _error_name(exc)
            return
        g.lost_error = None
        try:
            g.gpm = bool(nvml.nvmlGpmQueryDeviceSupport(g.handle).isSupportedDevice)
            g.gpm_off_reason = None if g.gpm else "nvmlGpmQueryDeviceSupport: device not supported"
            if g.gpm:
                g.gpm_samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
                nvml.nvmlGpmSampleGet(g.handle, g.gpm_samples[0])
                g.gpm_time = self._clock()
        except (nvml.NVMLError, AttributeError) as exc:
            # Pre-Hopper GPUs, old drivers (FUNCTION_NOT_FOUND) or an nvidia-ml-py without the
            # GPM wrappers: DCGM_FI_PROF_* are omitted.
            log.info("GPU %d: no GPM profiling metrics (%s)", g.index, exc)
            g.gpm = False
            g.gpm_off_reason = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Stop the XID listener, free NVML resources, shut NVML down. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if not self._initialized:
                return
            nvml = self._nvml
            for g in self._gpus:
                for sample in g.gpm_samples:
                    try:
                        nvml.nvmlGpmSampleFree(sample)
                    except nvml.NVMLError:
                        pass
                g.gpm_samples = []
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._initialized = False

    @property
    def listener_alive(self) -> bool:
        return self._listener is not None and self._listener.alive

    @property
    def xid_listener(self) -> XidListener | None:
        return self._listener

    def support_report(self) -> dict[int, dict[str, Any]]:
        """Per GPU: the NVML calls that answered NOT_SUPPORTED (their families are left out, as
        DCGM leaves out unsupported fields) and why GPM profiling is off (None when on)."""
        with self._lock:
            return {g.index: {"unsupported_calls": sorted(g.unsupported), "gpm_off_reason": g.gpm_off_reason}
                    for g in self._gpus}

    # --- reading -----------------------------------------------------------------------------------
    def _note_error(self, g: _Gpu, call: str, exc: Any) -> None:
        nvml = self._nvml
        code = getattr(exc, "value", None)
        if code in _NOT_ANSWERING:
            raise _Lost(exc)
        if code in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            g.unsupported.add(call)  # DCGM also stops watching unsupported fields
            return
        key = (str(g.index), call, _error_name(exc))
        self._errors[key] = self._errors.get(key, 0) + 1

    def _call(self, g: _Gpu, call: str, *args: Any) -> Any:
        if call in g.unsupported:
            return None
        nvml = self._nvml
        fn = getattr(nvml, call, None)
        if fn is None:  # an older nvidia-ml-py without this wrapper
            g.unsupported.add(call)
            return None
        try:
            return fn(g.handle, *args)
        except nvml.NVMLError as exc:
            self._note_error(g, call, exc)
            return None

    def _read(self, g: _Gpu) -> dict[str, float]:
        nvml, v = self._nvml, {}
        sm = self._call(g, "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM)
        if sm is not None:
            v["DCGM_FI_DEV_SM_CLOCK"] = sm
        mem = self._call(g, "nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_MEM)
        if mem is not None:
            v["DCGM_FI_DEV_MEM_CLOCK"] = mem
        temp = self._call(g, "nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU)
        if temp is not None and temp <= 200:  # DCGM drops impossible readings
            v["DCGM_FI_DEV_GPU_TEMP"] = temp
        power = self._call(g, "nvmlDeviceGetPowerUsage")
        if power is not None:
            v["DCGM_FI_DEV_POWER_USAGE"] = power / 1000.0
        replay = self._call(g, "nvmlDeviceGetPcieReplayCounter")
        if replay is not None:
            v["DCGM_FI_DEV_PCIE_REPLAY_COUNTER"] = replay
        util = self._call(g, "nvmlDeviceGetUtilizationRates")
        if util is not None:
            # NVML sometimes reports 4294967295; a percentage above 100 is no reading.
            if util.gpu <= 100:
                v["DCGM_FI_DEV_GPU_UTIL"] = util.gpu
            if util.memory <= 100:
                v["DCGM_FI_DEV_MEM_COPY_UTIL"] = util.memory
        enc = self._call(g, "nvmlDeviceGetEncoderUtilization")
        if enc is not None:
            v["DCGM_FI_DEV_ENC_UTIL"] = enc[0]
        dec = self._call(g, "nvmlDeviceGetDecoderUtilization")
        if dec is not None:
            v["DCGM_FI_DEV_DEC_UTIL"] = dec[0]
        # v2: v1's "used" includes the reserved memory.
        meminfo = self._call(g, "nvmlDeviceGetMemoryInfo", nvml.nvmlMemory_v2)
        if meminfo is not None:
            v["DCGM_FI_DEV_FB_FREE"] = meminfo.free // _MIB
            v["DCGM_FI_DEV_FB_USED"] = meminfo.used // _MIB
            v["DCGM_FI_DEV_FB_RESERVED"] = meminfo.reserved // _MIB
        v["DCGM_FI_DEV_VGPU_LICENSE_STATUS"] = self._vgpu_license(g)
        reasons = self._call(g, "nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None and "nvmlDeviceGetCurrentClocksEventReasons" in g.unsupported:
            reasons = self._call(g, "nvmlDeviceGetCurrentClocksThrottleReasons")  # pre-535 name
        if reasons is not None:
            v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] = reasons
        self._read_fields(g, v)
        if g.gpm:
            self._read_gpm(g, v)
        return v

    def _vgpu_license(self, g: _Gpu) -> int:
        # DCGM: 0 where vGPU licensing is unsupported (bare metal), else 1 if a feature is licensed.
        feats = self._call(g, "nvmlDeviceGetGridLicensableFeatures")
        if feats is None or not feats.isGridLicenseSupported:
            return 0
        n = min(feats.licensableFeaturesCount, len(feats.gridLicensableFeatures))
        return int(any(feats.gridLicensableFeatures[i].featureState > 0 for i in range(n)))

    def _read_fields(self, g: _Gpu, v: dict[str, float]) -> None:
        nvml = self._nvml
        wanted = [(name, fid) for name, fid in _FIELD_IDS if name not in g.unsupported]
        if not wanted:
            return
        ids = [(fid, _UINT_MAX) if fid in _SCOPED else fid for _, fid in wanted]
        try:
            values = nvml.nvmlDeviceGetFieldValues(g.handle, ids)
        except nvml.NVMLError as exc:
            self._note_error(g, "nvmlDeviceGetFieldValues", exc)
            return
        stamp = None
        for (name, _fid), fv in zip(wanted, values, strict=True):
            if fv.nvmlReturn != nvml.NVML_SUCCESS:
                # nvmlDeviceGetFieldValues does not raise for one field: check each.
                self._note_error(g, name, nvml.NVMLError(fv.nvmlReturn))
                continue
            v[name] = _field_value(fv)
            stamp = stamp or (fv.timestamp / 1e6 if fv.timestamp > 0 else None)
        if v.get("DCGM_FI_DEV_MEMORY_TEMP", 0) > 200:
            del v["DCGM_FI_DEV_MEMORY_TEMP"]
        tx, rx = v.pop("nvlink_tx_kib", None), v.pop("nvlink_rx_kib", None)
        if tx is not None and rx is not None:
            v["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = self._nvlink_rate(g, tx + rx, stamp or time.time())

    def _nvlink_rate(self, g: _Gpu, total_kib: float, now: float) -> float:
        # DCGM publishes (Δ KiB / Δ s) / 1000 — a rate, despite "# TYPE counter" — and 0 on
        # the first sample. Scrapes closer than rate_interval_s reuse the last rate.
        prev = g.nvlink_prev
        if prev is None or total_kib < prev[0]:
            g.nvlink_prev, g.nvlink_rate = (total_kib, now), 0.0
        elif now - prev[1] >= self._rate_interval_s:
            g.nvlink_rate = (total_kib - prev[0]) / (now - prev[1]) / 1000.0
            g.nvlink_prev = (total_kib, now)
        return float(int(g.nvlink_rate))

    def _read_gpm(self, g: _Gpu, v: dict[str, float]) -> None:
        nvml = self._nvml
        now = self._clock()
        if g.gpm_values is None or now - g.gpm_time >= self._rate_interval_s:
            try:
                nvml.nvmlGpmSampleGet(g.handle, g.gpm_samples[1])
                mg = nvml.c_nvmlGpmMetricsGet_t()
                mg.version = nvml.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = len(_GPM_METRICS)
                mg.sample1, mg.sample2 = g.gpm_samples[0], g.gpm_samples[1]
                for i, (_, metric_id, _) in enumerate(_GPM_METRICS):
                    mg.metrics[i].metricId = metric_id
                nvml.nvmlGpmMetricsGet(mg)
            except nvml.NVMLError as exc:
                self._note_error(g, "nvmlGpmMetricsGet", exc)
                return
            g.gpm_samples.reverse()  # the new sample is the next interval's start
            g.gpm_time = now
            g.gpm_values = {}
            for i, (name, _, scale) in enumerate(_GPM_METRICS):
                m = mg.metrics[i]
                if m.nvmlReturn == nvml.NVML_SUCCESS:
                    value = m.value * scale
                    g.gpm_values[name] = float(int(value)) if name in _INT_PROF else value
                else:
                    self._note_error(g, name, nvml.NVMLError(m.nvmlReturn))
        v.update(g.gpm_values)

    # --- health --------------------------------------------------------------------------------
    def _grew(self, g: _Gpu, name: str, value: float, now: float) -> float:
        """How much a counter grew within the health window (from this collector's samples)."""
        hist = g.history.setdefault(name, deque())
        if hist and value < hist[-1][1]:
            hist.clear()  # counter reset (driver reload)
        if len(hist) >= 2 and now - hist[-2][0] < self._health_window_s / _HISTORY_SLOTS:
            # Thinned to about one sample per window/_HISTORY_SLOTS seconds so that the
            # history's size does not follow the scrape rate; the counters only grow, so
            # replacing the newest sample loses no growth.
            hist[-1] = (now, value)
        else:
            hist.append((now, value))
        while len(hist) > 2 and hist[1][0] <= now - self._health_window_s:
            hist.popleft()
        return value - hist[0][1]

    def _health(self, g: _Gpu, xid_counts: dict[int, int], now: float) -> dict[str, tuple[int, str]]:
        findings: list[tuple[str, int, str]] = []
        if g.lost_error is not None:
            findings.append(("ALL", FAIL, g.lost_error))
        for xid in xid_counts:
            c = classify(xid)
            if c.status > PASS:
                findings.append((c.watch, c.status, c.code))
        v = g.values if g.lost_error is None else {}
        if v.get("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 0) > 0:
            findings.append(("MEM", FAIL, "DCGM_FR_VOLATILE_DBE_DETECTED"))
        if v.get("DCGM_FI_DEV_ROW_REMAP_FAILURE", 0) > 0:
            findings.append(("MEM", FAIL, "DCGM_FR_ROW_REMAP_FAILURE"))
        if v.get("DCGM_FI_DEV_ROW_REMAP_PENDING", 0) > 0:
            findings.append(("MEM", WARN, "DCGM_FR_PENDING_ROW_REMAP"))
        if v.get("DCGM_FI_DEV_RETIRED_PENDING", 0) > 0:
            findings.append(("MEM", WARN, "DCGM_FR_PENDING_PAGE_RETIREMENTS"))
        reasons = int(v.get("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 0))
        if reasons & (0x20 | 0x40):
            findings.append(("THERMAL", WARN, "DCGM_FR_CLOCK_THROTTLE_THERMAL"))
        if reasons & (0x8 | 0x80):
            findings.append(("POWER", WARN, "DCGM_FR_CLOCK_THROTTLE_POWER"))
        for name, watch, code, threshold in _GROWTH_RULES:
            if name in v and self._grew(g, name, v[name], now) > threshold:
                findings.append((watch, WARN, code))
        result = {w: (PASS, "DCGM_FR_OK") for w in _HEALTH_WATCHES}
        for watch, status, code in findings:
            watch = watch if watch in result else "ALL"
            if status > result[watch][0]:
                result[watch] = (status, code)
        return result

    # --- scrape ----------------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._closed:
                return []
            if not self._initialized and time.monotonic() >= self._next_init:
                self._try_init()
            return self._collect_locked()

    def _collect_locked(self) -> list[Metric]:
        out = _Families()
        now = self._clock()
        last_xid, xid_counts = self._xids.snapshot()
        jobs = read_job_mapping(self._job_dir) if self._job_dir else {}
        up = Metric("rankwatch_gpu_up", "1 if the GPU answered NVML at this scrape, 0 if not.", "gauge")
        answering = 0
        for g in self._gpus if self._initialized else []:
            answered, values = self._poll(g)
            answering += answered
            base = {
                "gpu": str(g.index),
                "UUID": g.uuid,
                "pci_bus_id": g.pci_bus_id,
                "device": f"nvidia{g.index}",
                "modelName": g.model,
                "Hostname": self.hostname,
                "DCGM_FI_DRIVER_VERSION": self._driver,
            }
            series = _Series(out, base, jobs.get(g.index))
            for job in jobs.get(g.index) or [None]:
                # Our own family: snake_case labels only (no modelName), still joinable on gpu+Hostname.
                ident = {k: base[k] for k in ("gpu", "UUID", "pci_bus_id", "device", "Hostname")}
                up.add_sample(
                    "rankwatch_gpu_up", ident if job is None else {**ident, "hpc_job": job}, float(answered)
                )
            if answered:
                for f in F.FIELDS:
                    if f.name in values:
                        series.add(f, float(values[f.name]))
                for _bit, name in F.CLOCK_EVENT_BITS:
                    series.add(F.CLOCK_EVENTS_COUNT, float(g.clock_events[name]), {"clock_event": name})
            # What a lost GPU still reports: its XIDs and its health, under its cached labels.
            last = last_xid.get(g.index, 0)
            series.add(
                F.FIELD_BY_NAME["DCGM_FI_DEV_XID_ERRORS"],
                float(last),
                {"err_code": str(last), "err_msg": classify(last).text},
            )
            counts = xid_counts.get(g.index, {})
            for xid in sorted(set(_WATCHED_XIDS) | set(counts)):
                series.add(F.XID_COUNT, float(counts.get(xid, 0)), {"xid": str(xid)})
            for watch, (status, code) in self._health(g, counts, now).items():
                series.add(F.HEALTH_STATUS, float(status), {"health_error_code": code, "health_watch": watch})
        return out.ordered() + self._own_metrics(answering, up)

    def _poll(self, g: _Gpu) -> tuple[bool, dict[str, float]]:
        """Read one GPU; never raises. Returns whether it answered, and its values."""
        if g.handle is None:
            self._discover(g)
        values: dict[str, float] = {}
        was_lost = g.lost_error
        if g.handle is not None:
            try:
                values = self._read(g)
                g.lost_error = None
            except _Lost as lost:
                g.lost_error = _error_name(lost.error)
            except Exception:  # noqa: BLE001 - one GPU's surprise must not break the scrape
                log.exception("GPU %d: unexpected error while reading", g.index)
                key = (str(g.index), "read", "exception")
                self._errors[key] = self._errors.get(key, 0) + 1
        answered = g.lost_error is None and g.handle is not None
        if g.lost_error != was_lost or (not answered and not g.logged_lost):
            g.logged_lost = not answered
            if answered:
                log.warning("GPU %d answers again", g.index)
            else:
                log.warning("GPU %d does not answer NVML: %s", g.index, g.lost_error)
        if answered:
            g.values = values
            self._count_clock_events(g, int(values.get("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 0)))
        return answered, values

    def _own_metrics(self, answering: int, up: Metric) -> list[Metric]:
        host = {"Hostname": self.hostname}
        avail = Metric(
            "rankwatch_gpu_nvml_available", "1 if NVML answered, 0 if not (see label error).", "gauge"
        )
        avail.add_sample(
            "rankwatch_gpu_nvml_available",
            {**host, **({"error": self._init_error} if self._init_error else {})},
            1.0 if self._initialized else 0.0,
        )
        own = [avail]
        expected = max(len(self._gpus), self._expected_override or 0)
        for name, help_, value in (
            (
                "rankwatch_gpu_expected",
                "GPUs this node should have (NVML count at start, or as configured).",
                expected,
            ),
            ("rankwatch_gpu_answering", "GPUs that answered NVML at this scrape.", answering),
        ):
            m = Metric(name, help_, "gauge")
            m.add_sample(name, host, float(value))
            own.append(m)
        if up.samples:
            own.append(up)
        if self._errors:
            errs = Metric(
                "rankwatch_gpu_nvml_errors",
                "NVML calls or fields that failed, by GPU, call and error.",
                "counter",
            )
            for (gpu, call, err), n in sorted(self._errors.items()):
                errs.add_sample(
                    "rankwatch_gpu_nvml_errors_total", {"gpu": gpu, "call": call, "error": err}, n
                )
            own.append(errs)
        return own

    def _count_clock_events(self, g: _Gpu, reasons: int) -> None:
        # A reason counts once each time it becomes active, so the count does not depend on
        # how often, or by how many servers, the exporter is scraped.
        started = reasons & ~g.prev_reasons
        for bit, name in F.CLOCK_EVENT_BITS:
            if started & bit:
                g.clock_events[name] += 1
        g.prev_reasons = reasons
