"""Simulated NVML: a node of H100 SXM 80GB GPUs behind pynvml's own function API.

The GPU collector talks to "an nvml module"; this one stands in for ``pynvml`` at that
boundary. It keeps pynvml's names and signatures, returns pynvml's own ctypes structures
(``c_nvmlFieldValue_t`` arrays, ``c_nvmlMemory_v2_t``, ``c_nvmlEventData_t``, …), hands out
device handles that are ``c_nvmlDevice_t`` pointers (never dereferenced) and raises pynvml's
own ``NVMLError`` subclasses. Constants, structures and exception classes are pynvml's
(looked up there, not redefined); an NVML function the simulation lacks raises
``NVMLError_FunctionNotFound``, as pynvml does against an old driver.

A module is global, so several simulated nodes live as ``SimulatedNVML`` objects
(``GpuCollector(nvml=SimulatedNVML("node-7"))``); the module-level names are bound to a
default instance, so ``GpuCollector(nvml=rankwatch.sim.nvml)`` works too.

Faults: ``inject(gpu, fault, **params)`` and ``clear(gpu, fault=None)``; see FAULTS.

``rankwatch.sim.nvml_lib`` puts the same simulation one layer lower, under the real pynvml
module in place of libnvidia-ml, so that pynvml's own wrappers run too.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import random
import socket
import threading
import time
import types
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pynvml

MODEL_NAME = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "550.127.08"
NVML_VERSION = "12.550.127.08"
PCI_DEVICE_ID = 0x233010DE  # H100 SXM5 80GB
# PCI buses of the eight GPUs of a p5.48xlarge-like node.
_PCI_BUSES = (0x53, 0x64, 0x75, 0x86, 0x97, 0xA8, 0xB9, 0xCA, 0x1B, 0x2B, 0x3B, 0x4B, 0xDB, 0xE4, 0xEB, 0xF4)
_FB_TOTAL_MIB = 81559
_FB_RESERVED_MIB = 529
_MAX_SM_MHZ = 1980
_IDLE_SM_MHZ = 345
_MEM_MHZ = 2619
_POWER_LIMIT_W = 700.0
_NVLINK_KIB_PER_S = 1.6e8  # per direction at full load, about 164 GB/s
_MIB = 1 << 20

# Every fault and its parameters (defaults). Rates are per second of simulated time.
FAULTS: dict[str, dict[str, Any]] = {
    "thermal": {"temp": 92, "sm_clock": 1095, "hw": False},
    "power_cap": {"limit": 450.0, "sm_clock": 1410},
    "xid": {"xid": 13},
    "fell_off_bus": {"xid": True},
    "dbe": {"count": 1, "xid": True},
    "sbe": {"count": 10},
    "remap_pending": {"xid": True},
    "remap_failure": {"xid": True},
    "nvlink_errors": {"crc_flit": 50.0, "crc_data": 5.0, "replay": 20.0, "recovery": 0.1, "xid": False},
    "pcie_replay": {"rate": 20.0},
    "field_error": {"field_id": pynvml.NVML_FI_DEV_MEMORY_TEMP, "error": pynvml.NVML_ERROR_UNKNOWN},
    "call_error": {"call": "nvmlDeviceGetPowerUsage", "error": pynvml.NVML_ERROR_UNKNOWN},
}
# Faults that are events, not lasting states: injecting one changes counters or delivers an
# XID and leaves nothing to clear.
_ONE_SHOT = {"xid", "dbe", "sbe"}

_ADDRESSES = itertools.count(0x7F5A00001000, 0x100)  # fake pointer values, unique per process


def _pointer(ptype: Any, address: int) -> Any:
    return ctypes.cast(ctypes.c_void_p(address), ptype)


def _address(ptr: Any) -> int | None:
    try:
        return ctypes.cast(ptr, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


def _fail(code: int) -> None:
    raise pynvml.NVMLError(code)  # NVMLError.__new__ picks the subclass, e.g. NVMLError_GpuIsLost


class ManualClock:
    """A clock that moves only when told; for deterministic tests and golden files."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self._t = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds


@dataclass
class _Gpu:
    index: int
    uuid: str
    serial: str
    bus: int
    address: int
    phase: float
    power_offset: float
    temp_offset: float
    fb_used_mib: int
    last_t: float
    activity: float = 1.0
    lost: bool = False
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    energy_mj: float = 0.0
    nvlink_tx_kib: float = 0.0
    nvlink_rx_kib: float = 0.0
    pcie_replay: float = 0.0
    ecc: dict[str, int] = field(
        default_factory=lambda: {"sbe_vol": 0, "dbe_vol": 0, "sbe_agg": 0, "dbe_agg": 0}
    )
    retired: dict[str, int] = field(default_factory=lambda: {"sbe": 0, "dbe": 0, "pending": 0})
    remap: dict[str, int] = field(default_factory=lambda: {"cor": 0, "unc": 0, "pending": 0, "failure": 0})
    nvlink_err: dict[str, float] = field(
        default_factory=lambda: {"crc_flit": 0.0, "crc_data": 0.0, "replay": 0.0, "recovery": 0.0}
    )
    power_violation_ns: float = 0.0
    thermal_violation_ns: float = 0.0

    # --- instantaneous model --------------------------------------------------------------
    def wobble(self, t: float) -> float:
        return math.sin(2 * math.pi * t / 7.3 + self.phase)

    def load(self) -> float:
        return self.activity  # kept within 0…1 by set_activity

    def sm_clock(self) -> int:
        clocks = [_MAX_SM_MHZ if self.load() > 0.05 else _IDLE_SM_MHZ]
        if "thermal" in self.faults:
            clocks.append(int(self.faults["thermal"]["sm_clock"]))
        if "power_cap" in self.faults:
            clocks.append(int(self.faults["power_cap"]["sm_clock"]))
        return min(clocks)

    def clock_ratio(self) -> float:
        return self.sm_clock() / _MAX_SM_MHZ if self.load() > 0.05 else 1.0

    def power_w(self, t: float) -> float:
        p = 72.0 + self.power_offset + self.load() * (560.0 + 60.0 * self.wobble(t)) * self.clock_ratio()
        if "power_cap" in self.faults:
            p = min(p, float(self.faults["power_cap"]["limit"]))
        return p

    def gpu_temp(self, t: float) -> int:
        if "thermal" in self.faults:
            return int(self.faults["thermal"]["temp"])
        return int(round(33 + self.temp_offset + self.load() * (30 + 3 * self.wobble(t))))

    def util(self, t: float) -> int:
        return int(round(self.load() * (96 + 3 * self.wobble(t))))

    def mem_util(self, t: float) -> int:
        return int(round(self.load() * (38 + 6 * self.wobble(t))))

    def reasons(self) -> int:
        bits = 0
        if self.load() <= 0.05:
            bits |= pynvml.nvmlClocksEventReasonGpuIdle
        if "thermal" in self.faults:
            bits |= pynvml.nvmlClocksEventReasonSwThermalSlowdown
            if self.faults["thermal"]["hw"]:
                bits |= pynvml.nvmlClocksEventReasonHwThermalSlowdown
        if "power_cap" in self.faults:
            bits |= pynvml.nvmlClocksEventReasonSwPowerCap
        return bits

    def gpm(self, metric: int, t: float) -> float | None:
        load, w, r = self.load(), self.wobble(t), self.clock_ratio()
        values = {
            pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: load * (97.0 + 2.0 * w),
            pynvml.NVML_GPM_METRIC_SM_UTIL: load * (93.0 + 3.0 * w),
            pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: load * (41.0 + 4.0 * w),
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: load * (55.0 + 8.0 * w) * r,
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: load * (62.0 + 5.0 * w) * r,
            pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: load * (900.0 + 100.0 * w),
            pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: load * (1400.0 + 150.0 * w),
        }
        return values.get(metric)

    # --- integration of counters ----------------------------------------------------------
    def advance(self, t: float) -> None:
        dt = t - self.last_t
        if dt < 0.001:  # calls within a millisecond see the same state
            return
        self.last_t = t
        self.energy_mj += self.power_w(t) * dt * 1000.0
        rate = self.load() * _NVLINK_KIB_PER_S * self.clock_ratio()
        self.nvlink_tx_kib += rate * dt
        self.nvlink_rx_kib += rate * dt
        if not self.faults:
            return
        if "thermal" in self.faults:
            self.thermal_violation_ns += dt * 1e9
        if "power_cap" in self.faults:
            self.power_violation_ns += dt * 1e9
        if "pcie_replay" in self.faults:
            self.pcie_replay += float(self.faults["pcie_replay"]["rate"]) * dt
        if "nvlink_errors" in self.faults:
            for key in self.nvlink_err:
                self.nvlink_err[key] += float(self.faults["nvlink_errors"][key]) * dt


class _EventSet:
    def __init__(self, lock: threading.RLock) -> None:
        self.cond = threading.Condition(lock)
        self.queue: deque[tuple[int, int, int]] = deque()  # (gpu index, event type, data)
        self.masks: dict[int, int] = {}
        self.freed = False


class SimulatedNVML:
    """One simulated node: ``gpu_count`` H100 SXM 80GB GPUs, pynvml's API as methods."""

    def __init__(
        self,
        hostname: str | None = None,
        gpu_count: int = 8,
        seed: int = 0,
        *,
        clock: Callable[[], float] = time.time,
        gpm_supported: bool = True,
        page_retirement_supported: bool = False,
        init_error: int | None = None,
    ) -> None:
        self.hostname = hostname or socket.gethostname()
        self.clock = clock
        self.gpm_supported = gpm_supported
        # H100 replaced page retirement with row remapping: NVML answers NOT_SUPPORTED.
        self.page_retirement_supported = page_retirement_supported
        # An NVML_ERROR_* code that nvmlInit raises (LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, …).
        self.init_error = init_error
        self._lock = threading.RLock()
        self._init_count = 0
        rng = random.Random(f"{seed}:{self.hostname}")
        now = clock()
        self._gpus = [
            _Gpu(
                index=i,
                uuid="GPU-" + str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                serial=str(1650923000000 + rng.randrange(10**6)),
                bus=_PCI_BUSES[i % len(_PCI_BUSES)],
                address=next(_ADDRESSES),
                phase=rng.uniform(0, 2 * math.pi),
                power_offset=rng.uniform(-12.0, 12.0),
                temp_offset=rng.uniform(-3.0, 3.0),
                fb_used_mib=72_000 + rng.randrange(2_000),
                last_t=now,
                energy_mj=rng.uniform(1e9, 5e9),
            )
            for i in range(gpu_count)
        ]
        self._by_address = {g.address: g for g in self._gpus}
        self._event_sets: dict[int, _EventSet] = {}
        self._samples: dict[int, tuple[int, float] | None] = {}

    # --- pynvml constants, structures and exceptions ------------------------------------
    def __getattr__(self, name: str) -> Any:
        value = getattr(pynvml, name)  # AttributeError for names pynvml lacks too
        if isinstance(value, types.FunctionType) and name.startswith("nvml"):

            def not_simulated(*_args: Any, **_kwargs: Any) -> Any:
                _fail(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

            not_simulated.__name__ = name
            value = not_simulated
        setattr(self, name, value)  # found once; later lookups skip __getattr__
        return value

    # --- fault injection --------------------------------------------------------------------
    def inject(self, gpu_index: int, fault: str, **params: Any) -> None:
        """Start a fault on one GPU (see FAULTS for names and parameters)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(sorted(FAULTS))}")
        unknown = set(params) - set(FAULTS[fault])
        if unknown:
            raise ValueError(f"fault {fault!r} takes {sorted(FAULTS[fault])}, not {sorted(unknown)}")
        p = {**FAULTS[fault], **params}
        with self._lock:
            g = self._gpu(gpu_index)
            g.advance(self.clock())
            if fault == "xid":
                self._deliver_xid(g, int(p["xid"]))
            elif fault == "dbe":
                n = int(p["count"])
                g.ecc["dbe_vol"] += n
                g.ecc["dbe_agg"] += n
                g.remap["unc"] += n
                g.remap["pending"] = 1
                if self.page_retirement_supported:
                    g.retired["dbe"] += n
                    g.retired["pending"] = 1
                if p["xid"]:
                    self._deliver_xid(g, 48)
            elif fault == "sbe":
                n = int(p["count"])
                g.ecc["sbe_vol"] += n
                g.ecc["sbe_agg"] += n
            else:
                g.faults[fault] = p
                if fault == "fell_off_bus":
                    if p["xid"]:
                        self._deliver_xid(g, 79)
                    g.lost = True
                elif fault == "remap_pending":
                    g.remap["pending"] = 1
                    g.remap["cor"] += 1
                    if p["xid"]:
                        self._deliver_xid(g, 63)
                elif fault == "remap_failure":
                    g.remap["failure"] = 1
                    if p["xid"]:
                        self._deliver_xid(g, 64)
                elif fault == "nvlink_errors" and p["xid"]:
                    self._deliver_xid(g, 74)

    def clear(self, gpu_index: int, fault: str | None = None) -> None:
        """End one fault (or all) on a GPU. Counters keep what they counted; a GPU that fell
        off the bus answers again (as after a reset); remap flags return to 0."""
        with self._lock:
            g = self._gpu(gpu_index)
            g.advance(self.clock())
            names = [fault] if fault is not None else list(g.faults)
            for name in names:
                g.faults.pop(name, None)
                if name == "fell_off_bus":
                    g.lost = False
                elif name == "remap_pending":
                    g.remap["pending"] = 0
                elif name == "remap_failure":
                    g.remap["failure"] = 0

    def set_activity(self, gpu_index: int | None, level: float) -> None:
        """Set how busy a GPU (or every GPU, for None) is: 0 idle … 1 training flat out."""
        with self._lock:
            for g in self._gpus if gpu_index is None else [self._gpu(gpu_index)]:
                g.advance(self.clock())
                g.activity = max(0.0, min(1.0, float(level)))

    def faults(self, gpu_index: int) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._gpu(gpu_index).faults.items()}

    def _deliver_xid(self, g: _Gpu, xid: int) -> None:
        for es in self._event_sets.values():
            if es.masks.get(g.index, 0) & pynvml.nvmlEventTypeXidCriticalError:
                es.queue.append((g.index, pynvml.nvmlEventTypeXidCriticalError, xid))
                es.cond.notify_all()

    # --- helpers -----------------------------------------------------------------------------
    def _gpu(self, index: int) -> _Gpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no GPU {index} on simulated node {self.hostname} ({len(self._gpus)} GPUs)")
        return self._gpus[index]

    def _check_init(self) -> None:
        if self._init_count == 0:
            _fail(pynvml.NVML_ERROR_UNINITIALIZED)

    def _dev(self, handle: Any, call: str) -> _Gpu:
        """Resolve a handle for an NVML call: raises what NVML would for this GPU now."""
        self._check_init()
        g = self._by_address.get(_address(handle))  # type: ignore[arg-type]
        if g is None:
            _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if g.lost:
            _fail(pynvml.NVML_ERROR_GPU_IS_LOST)
        err = g.faults.get("call_error")
        if err is not None and err["call"] == call:
            _fail(int(err["error"]))
        g.advance(self.clock())
        return g

    # --- library ---------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        with self._lock:
            if self.init_error is not None:
                _fail(self.init_error)
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            self._check_init()
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return DRIVER_VERSION

    def nvmlSystemGetNVMLVersion(self) -> str:
        return NVML_VERSION

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        with self._lock:
            self._check_init()
            if not 0 <= index < len(self._gpus):
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            g = self._gpus[index]
            if g.lost:
                _fail(pynvml.NVML_ERROR_GPU_IS_LOST)
            return _pointer(pynvml.c_nvmlDevice_t, g.address)

    # --- identity ----------------------------------------------------------------------------
    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        with self._lock:
            return self._dev(handle, "nvmlDeviceGetIndex").index

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        with self._lock:
            return self._dev(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        with self._lock:
            return self._dev(handle, "nvmlDeviceGetSerial").serial

    def nvmlDeviceGetName(self, handle: Any) -> str:
        with self._lock:
            self._dev(handle, "nvmlDeviceGetName")
            return MODEL_NAME

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        info.domain, info.bus, info.device, info.pciDeviceId = 0, g.bus, 0, PCI_DEVICE_ID
        info.pciSubSystemId = 0x16C110DE
        info.busIdLegacy = (pynvml.NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT % (0, g.bus, 0)).encode()
        info.busId = (pynvml.NVML_DEVICE_PCI_BUS_ID_FMT % (0, g.bus, 0)).encode()
        return info

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> Any:
        return self.nvmlDeviceGetPciInfo(handle)

    # --- readings ----------------------------------------------------------------------------
    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:  # noqa: A002 - pynvml's name
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetClockInfo")
            if type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
                return g.sm_clock()
            if type == pynvml.NVML_CLOCK_MEM:
                return _MEM_MHZ
            if type == pynvml.NVML_CLOCK_VIDEO:
                return 1755 if g.load() > 0.05 else 765
            _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return 0

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, type: int) -> int:  # noqa: A002
        with self._lock:
            self._dev(handle, "nvmlDeviceGetMaxClockInfo")
            return {pynvml.NVML_CLOCK_SM: _MAX_SM_MHZ, pynvml.NVML_CLOCK_MEM: _MEM_MHZ}.get(type, 1980)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetTemperature")
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return g.gpu_temp(self.clock())

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetPowerUsage")
            return int(g.power_w(self.clock()) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetEnforcedPowerLimit")
            cap = g.faults.get("power_cap")
            return int((float(cap["limit"]) if cap else _POWER_LIMIT_W) * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        with self._lock:
            return int(self._dev(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj)

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        with self._lock:
            return int(self._dev(handle, "nvmlDeviceGetPcieReplayCounter").pcie_replay)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetUtilizationRates")
            t = self.clock()
            return pynvml.c_nvmlUtilization_t(gpu=g.util(t), memory=g.mem_util(t))

    def nvmlDeviceGetEncoderUtilization(self, handle: Any) -> list[int]:
        with self._lock:
            self._dev(handle, "nvmlDeviceGetEncoderUtilization")
            return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, handle: Any) -> list[int]:
        with self._lock:
            self._dev(handle, "nvmlDeviceGetDecoderUtilization")
            return [0, 167000]

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetMemoryInfo")
            used = g.fb_used_mib * _MIB if g.load() > 0.05 else 0
        total = _FB_TOTAL_MIB * _MIB
        if version is None:  # v1: "used" includes the reserved memory
            mem = pynvml.c_nvmlMemory_t()
            mem.total, mem.used = total, used + _FB_RESERVED_MIB * _MIB
            mem.free = total - mem.used
            return mem
        if version != pynvml.nvmlMemory_v2:
            _fail(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        mem = pynvml.c_nvmlMemory_v2_t()
        mem.version, mem.total, mem.reserved, mem.used = version, total, _FB_RESERVED_MIB * _MIB, used
        mem.free = total - mem.reserved - used
        return mem

    def nvmlDeviceGetGridLicensableFeatures(self, handle: Any) -> Any:
        with self._lock:
            self._dev(handle, "nvmlDeviceGetGridLicensableFeatures")
        _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)  # bare-metal H100: no vGPU licensing

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        with self._lock:
            return self._dev(handle, "nvmlDeviceGetCurrentClocksEventReasons").reasons()

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        with self._lock:
            r = self._dev(device, "nvmlDeviceGetRemappedRows").remap
            return (r["cor"], r["unc"], r["pending"], r["failure"])

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetTotalEccErrors")
            kind = "sbe" if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else "dbe"
            scope = "vol" if counterType == pynvml.NVML_VOLATILE_ECC else "agg"
            return g.ecc[f"{kind}_{scope}"]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: Any) -> int:
        with self._lock:
            g = self._dev(device, "nvmlDeviceGetRetiredPagesPendingStatus")
            if not self.page_retirement_supported:
                _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return g.retired["pending"]

    def nvmlDeviceGetViolationStatus(self, device: Any, perfPolicyType: int) -> Any:
        with self._lock:
            g = self._dev(device, "nvmlDeviceGetViolationStatus")
            ns = {
                pynvml.NVML_PERF_POLICY_POWER: g.power_violation_ns,
                pynvml.NVML_PERF_POLICY_THERMAL: g.thermal_violation_ns,
            }.get(perfPolicyType, 0.0)
            return pynvml.c_nvmlViolationTime_t(referenceTime=int(self.clock() * 1e6), violationTime=int(ns))

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        with self._lock:
            self._dev(device, "nvmlDeviceGetNvLinkState")
            if not 0 <= link < 18:
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        with self._lock:
            self._dev(handle, "nvmlDeviceGetSupportedEventTypes")
            return (
                pynvml.nvmlEventTypeXidCriticalError
                | pynvml.nvmlEventTypeSingleBitEccError
                | (pynvml.nvmlEventTypeDoubleBitEccError)
            )

    # --- field values --------------------------------------------------------------------------
    def _fields(self, g: _Gpu, t: float) -> dict[int, tuple[int, int, int]]:
        """Every simulated field: id → (nvmlReturn, valueType, value)."""
        ull, uint = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
        ok = pynvml.NVML_SUCCESS
        retired_ret = ok if self.page_retirement_supported else pynvml.NVML_ERROR_NOT_SUPPORTED
        return {
            pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: (ok, ull, g.ecc["sbe_vol"]),
            pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: (ok, ull, g.ecc["dbe_vol"]),
            pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: (ok, ull, g.ecc["sbe_agg"]),
            pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: (ok, ull, g.ecc["dbe_agg"]),
            pynvml.NVML_FI_DEV_RETIRED_SBE: (retired_ret, uint, g.retired["sbe"]),
            pynvml.NVML_FI_DEV_RETIRED_DBE: (retired_ret, uint, g.retired["dbe"]),
            pynvml.NVML_FI_DEV_RETIRED_PENDING: (retired_ret, uint, g.retired["pending"]),
            pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: (ok, ull, int(g.nvlink_err["crc_flit"])),
            pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL: (ok, ull, int(g.nvlink_err["crc_data"])),
            pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL: (ok, ull, int(g.nvlink_err["replay"])),
            pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL: (ok, ull, int(g.nvlink_err["recovery"])),
            pynvml.NVML_FI_DEV_PERF_POLICY_POWER: (ok, ull, int(g.power_violation_ns)),
            pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL: (ok, ull, int(g.thermal_violation_ns)),
            pynvml.NVML_FI_DEV_PERF_POLICY_SYNC_BOOST: (ok, ull, 0),
            pynvml.NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT: (ok, ull, 0),
            pynvml.NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION: (ok, ull, 0),
            pynvml.NVML_FI_DEV_PERF_POLICY_RELIABILITY: (ok, ull, 0),
            pynvml.NVML_FI_DEV_MEMORY_TEMP: (ok, uint, g.gpu_temp(t) + 6),
            pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: (ok, ull, int(g.energy_mj)),
            pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: (ok, uint, int(g.pcie_replay)),
            pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: (ok, ull, int(g.nvlink_tx_kib)),
            pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: (ok, ull, int(g.nvlink_rx_kib)),
            pynvml.NVML_FI_DEV_REMAPPED_COR: (ok, uint, g.remap["cor"]),
            pynvml.NVML_FI_DEV_REMAPPED_UNC: (ok, uint, g.remap["unc"]),
            pynvml.NVML_FI_DEV_REMAPPED_PENDING: (ok, uint, g.remap["pending"]),
            pynvml.NVML_FI_DEV_REMAPPED_FAILURE: (ok, uint, g.remap["failure"]),
        }

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: list[Any]) -> Any:
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        with self._lock:
            g = self._dev(handle, "nvmlDeviceGetFieldValues")
            t = self.clock()
            broken = g.faults.get("field_error")
            table = self._fields(g, t)
            unsupported = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 0)
            stamp = int(t * 1e6)
            for i, fid in enumerate(fieldIds):
                fv = values[i]
                if isinstance(fid, tuple):
                    field_id, fv.scopeId = fid
                else:
                    field_id = fid
                fv.fieldId = field_id
                ret, vtype, value = table.get(field_id, unsupported)
                if broken is not None and int(broken["field_id"]) == field_id:
                    ret = int(broken["error"])
                fv.timestamp = stamp
                fv.nvmlReturn = ret
                fv.valueType = vtype
                if ret == pynvml.NVML_SUCCESS:
                    if vtype == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
                        fv.value.uiVal = value
                    else:
                        fv.value.ullVal = value
        return values

    # --- GPM (Hopper profiling metrics) ----------------------------------------------------------
    def nvmlGpmQueryDeviceSupport(self, device: Any) -> Any:
        with self._lock:
            self._dev(device, "nvmlGpmQueryDeviceSupport")
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1 if self.gpm_supported else 0
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        with self._lock:
            self._check_init()
            address = next(_ADDRESSES)
            self._samples[address] = None
            return _pointer(pynvml.c_nvmlGpmSample_t, address)

    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:
        with self._lock:
            if self._samples.pop(_address(gpmSample), False) is False:  # type: ignore[arg-type]
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlGpmSampleGet(self, device: Any, gpmSample: Any) -> Any:
        with self._lock:
            g = self._dev(device, "nvmlGpmSampleGet")
            if not self.gpm_supported:
                _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
            address = _address(gpmSample)
            if address not in self._samples:
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            self._samples[address] = (g.index, self.clock())  # type: ignore[index]
            return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:
        with self._lock:
            self._check_init()
            if metricsGet.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
                _fail(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            s1 = self._samples.get(_address(metricsGet.sample1))  # type: ignore[arg-type]
            s2 = self._samples.get(_address(metricsGet.sample2))  # type: ignore[arg-type]
            if s1 is None or s2 is None or s1[0] != s2[0]:
                _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            g = self._gpus[s2[0]]  # type: ignore[index]
            if g.lost:
                _fail(pynvml.NVML_ERROR_GPU_IS_LOST)
            for i in range(metricsGet.numMetrics):
                m = metricsGet.metrics[i]
                value = g.gpm(m.metricId, s2[1])  # type: ignore[index]
                if value is None:
                    m.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                else:
                    m.nvmlReturn, m.value = pynvml.NVML_SUCCESS, value
            return metricsGet

    # --- events ---------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> Any:
        with self._lock:
            self._check_init()
            address = next(_ADDRESSES)
            self._event_sets[address] = _EventSet(self._lock)
            return _pointer(pynvml.c_nvmlEventSet_t, address)

    def _event_set(self, event_set: Any) -> _EventSet:
        es = self._event_sets.get(_address(event_set))  # type: ignore[arg-type]
        if es is None or es.freed:
            _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return es  # type: ignore[return-value]

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        with self._lock:
            g = self._dev(handle, "nvmlDeviceRegisterEvents")
            es = self._event_set(eventSet)
            es.masks[g.index] = es.masks.get(g.index, 0) | int(eventTypes)

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        with self._lock:
            self._check_init()
            es = self._event_set(eventSet)
            # Blocks on the condition (releasing the lock); woken by an injected event.
            es.cond.wait_for(lambda: es.queue or es.freed, timeout=timeoutms / 1000)
            if es.freed:
                _fail(pynvml.NVML_ERROR_UNINITIALIZED)
            if not es.queue:
                _fail(pynvml.NVML_ERROR_TIMEOUT)
            index, event_type, event_data = es.queue.popleft()
            data = pynvml.c_nvmlEventData_t()
            data.device = _pointer(pynvml.c_nvmlDevice_t, self._gpus[index].address)
            data.eventType, data.eventData = event_type, event_data
            data.gpuInstanceId = data.computeInstanceId = 0xFFFFFFFF
            return data

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> Any:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        with self._lock:
            es = self._event_set(eventSet)
            es.freed = True
            es.cond.notify_all()
            del self._event_sets[_address(eventSet)]


_default: SimulatedNVML | None = None
_default_lock = threading.Lock()


def default() -> SimulatedNVML:
    """The instance behind this module's pynvml-style functions (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SimulatedNVML()
        return _default


def __getattr__(name: str) -> Any:
    # Module-level drop-in: rankwatch.sim.nvml.nvmlInit() etc. go to the default node.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(default(), name)
