"""The C side of libnvidia-ml, backed by a SimulatedNVML, under pynvml's own wrappers.

``rankwatch.sim.nvml`` stands in for the pynvml *module*. This goes one layer lower: it
takes the place of the shared library that pynvml loads (``pynvml.nvmlLib``), so that every
pynvml wrapper runs unchanged — ctypes argument packing, ``byref`` out-parameters, struct
versions, ``_nvmlCheckReturn`` turning return codes into ``NVMLError`` subclasses — and only
the C functions are simulated. Functions return NVML return codes, as the C library does.

pynvml keeps one library per process, so one simulated node at a time can sit under it::

    with installed_in_pynvml(SimulatedNVML("node-0")):
        collector = GpuCollector(nvml=pynvml)
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pynvml

from rankwatch.sim.nvml import SimulatedNVML

_INSTALL_LOCK = threading.Lock()


def _out(ref: Any) -> Any:
    """The object behind a ``byref(...)`` argument: where C would write its result."""
    return ref._obj


def _val(arg: Any) -> Any:
    return arg.value if isinstance(arg, ctypes._SimpleCData) else arg


def _copy(dst: Any, src: Any) -> None:
    ctypes.memmove(ctypes.addressof(dst), ctypes.addressof(src), ctypes.sizeof(src))


def _code(thunk: Callable[[], None]) -> int:
    try:
        thunk()
    except pynvml.NVMLError as exc:
        return exc.value
    return pynvml.NVML_SUCCESS


class SimulatedLibrary:
    """libnvidia-ml's C functions (the subset the GPU collector reaches), as pynvml calls them.

    A function not defined here is missing from the "library": pynvml answers
    ``NVMLError_FunctionNotFound``, as with an old driver.
    """

    def __init__(self, sim: SimulatedNVML) -> None:
        self.sim = sim

    # library
    def nvmlInitWithFlags(self, flags: Any) -> int:
        return _code(lambda: self.sim.nvmlInitWithFlags(_val(flags)))

    def nvmlShutdown(self) -> int:
        return _code(self.sim.nvmlShutdown)

    def nvmlErrorString(self, result: Any) -> bytes:
        return pynvml.NVMLError._errcode_to_string.get(_val(result), "Unknown Error").encode()

    def nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        return _code(lambda: setattr(buf, "value", self.sim.nvmlSystemGetDriverVersion().encode()))

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        return _code(lambda: setattr(_out(count), "value", self.sim.nvmlDeviceGetCount()))

    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, device: Any) -> int:
        return _code(lambda: _copy(_out(device), self.sim.nvmlDeviceGetHandleByIndex(_val(index))))

    # identity
    def nvmlDeviceGetIndex(self, handle: Any, index: Any) -> int:
        return _code(lambda: setattr(_out(index), "value", self.sim.nvmlDeviceGetIndex(handle)))

    def nvmlDeviceGetUUID(self, handle: Any, buf: Any, size: Any) -> int:
        return _code(lambda: setattr(buf, "value", self.sim.nvmlDeviceGetUUID(handle).encode()))

    def nvmlDeviceGetName(self, handle: Any, buf: Any, size: Any) -> int:
        return _code(lambda: setattr(buf, "value", self.sim.nvmlDeviceGetName(handle).encode()))

    def nvmlDeviceGetPciInfo_v3(self, handle: Any, info: Any) -> int:
        return _code(lambda: _copy(_out(info), self.sim.nvmlDeviceGetPciInfo(handle)))

    # readings
    def _scalar(self, out: Any, read: Callable[[], Any]) -> int:
        return _code(lambda: setattr(_out(out), "value", read()))

    def nvmlDeviceGetClockInfo(self, handle: Any, type_: Any, clock: Any) -> int:
        return self._scalar(clock, lambda: self.sim.nvmlDeviceGetClockInfo(handle, _val(type_)))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, temp: Any) -> int:
        return self._scalar(temp, lambda: self.sim.nvmlDeviceGetTemperature(handle, _val(sensor)))

    def nvmlDeviceGetPowerUsage(self, handle: Any, power: Any) -> int:
        return self._scalar(power, lambda: self.sim.nvmlDeviceGetPowerUsage(handle))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, energy: Any) -> int:
        return self._scalar(energy, lambda: self.sim.nvmlDeviceGetTotalEnergyConsumption(handle))

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any, replay: Any) -> int:
        return self._scalar(replay, lambda: self.sim.nvmlDeviceGetPcieReplayCounter(handle))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any, reasons: Any) -> int:
        return self._scalar(reasons, lambda: self.sim.nvmlDeviceGetCurrentClocksEventReasons(handle))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any, reasons: Any) -> int:
        return self._scalar(reasons, lambda: self.sim.nvmlDeviceGetCurrentClocksEventReasons(handle))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: Any, counter_type: Any, count: Any) -> int:
        return self._scalar(
            count, lambda: self.sim.nvmlDeviceGetTotalEccErrors(handle, _val(error_type), _val(counter_type))
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Any, util: Any) -> int:
        return _code(lambda: _copy(_out(util), self.sim.nvmlDeviceGetUtilizationRates(handle)))

    def _sampled(self, util: Any, period: Any, read: Callable[[], list[int]]) -> int:
        def run() -> None:
            _out(util).value, _out(period).value = read()

        return _code(run)

    def nvmlDeviceGetEncoderUtilization(self, handle: Any, util: Any, period: Any) -> int:
        return self._sampled(util, period, lambda: self.sim.nvmlDeviceGetEncoderUtilization(handle))

    def nvmlDeviceGetDecoderUtilization(self, handle: Any, util: Any, period: Any) -> int:
        return self._sampled(util, period, lambda: self.sim.nvmlDeviceGetDecoderUtilization(handle))

    def nvmlDeviceGetMemoryInfo(self, handle: Any, memory: Any) -> int:
        return _code(lambda: _copy(_out(memory), self.sim.nvmlDeviceGetMemoryInfo(handle)))

    def nvmlDeviceGetMemoryInfo_v2(self, handle: Any, memory: Any) -> int:
        mem = _out(memory)
        return _code(lambda: _copy(mem, self.sim.nvmlDeviceGetMemoryInfo(handle, version=mem.version)))

    def nvmlDeviceGetGridLicensableFeatures_v4(self, handle: Any, features: Any) -> int:
        return _code(lambda: _copy(_out(features), self.sim.nvmlDeviceGetGridLicensableFeatures(handle)))

    def nvmlDeviceGetRemappedRows(self, handle: Any, corr: Any, unc: Any, pending: Any, failure: Any) -> int:
        def run() -> None:
            values = self.sim.nvmlDeviceGetRemappedRows(handle)
            for ref, value in zip((corr, unc, pending, failure), values, strict=True):
                _out(ref).value = value

        return _code(run)

    def nvmlDeviceGetViolationStatus(self, device: Any, policy: Any, violation: Any) -> int:
        return _code(
            lambda: _copy(_out(violation), self.sim.nvmlDeviceGetViolationStatus(device, _val(policy)))
        )

    def nvmlDeviceGetFieldValues(self, handle: Any, count: Any, values: Any) -> int:
        array = _out(values)

        def run() -> None:
            ids = [(v.fieldId, v.scopeId) if v.scopeId else v.fieldId for v in array[: _val(count)]]
            _copy(array, self.sim.nvmlDeviceGetFieldValues(handle, ids))

        return _code(run)

    # GPM
    def nvmlGpmQueryDeviceSupport(self, device: Any, support: Any) -> int:
        return _code(lambda: _copy(_out(support), self.sim.nvmlGpmQueryDeviceSupport(device)))

    def nvmlGpmSampleAlloc(self, sample: Any) -> int:
        return _code(lambda: _copy(_out(sample), self.sim.nvmlGpmSampleAlloc()))

    def nvmlGpmSampleFree(self, sample: Any) -> int:
        return _code(lambda: self.sim.nvmlGpmSampleFree(sample))

    def nvmlGpmSampleGet(self, device: Any, sample: Any) -> int:
        return _code(lambda: self.sim.nvmlGpmSampleGet(device, sample))

    def nvmlGpmMetricsGet(self, metrics_get: Any) -> int:
        return _code(lambda: self.sim.nvmlGpmMetricsGet(_out(metrics_get)))

    # events
    def nvmlEventSetCreate(self, event_set: Any) -> int:
        return _code(lambda: _copy(_out(event_set), self.sim.nvmlEventSetCreate()))

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: Any, event_set: Any) -> int:
        return _code(lambda: self.sim.nvmlDeviceRegisterEvents(handle, _val(event_types), event_set))

    def nvmlEventSetWait_v2(self, event_set: Any, data: Any, timeout_ms: Any) -> int:
        return _code(lambda: _copy(_out(data), self.sim.nvmlEventSetWait_v2(event_set, _val(timeout_ms))))

    def nvmlEventSetFree(self, event_set: Any) -> int:
        return _code(lambda: self.sim.nvmlEventSetFree(event_set))


@contextlib.contextmanager
def installed_in_pynvml(sim: SimulatedNVML) -> Iterator[Any]:
    """Put ``sim`` under the real pynvml module for the duration; yields pynvml."""
    with _INSTALL_LOCK:
        saved = pynvml.nvmlLib
        pynvml.nvmlLib = SimulatedLibrary(sim)
        pynvml._nvmlGetFunctionPointer_cache.clear()  # pynvml caches looked-up functions
    try:
        yield pynvml
    finally:
        with _INSTALL_LOCK:
            pynvml.nvmlLib = saved
            pynvml._nvmlGetFunctionPointer_cache.clear()
