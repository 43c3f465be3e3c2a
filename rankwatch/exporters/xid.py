"""XID errors: what each code means for GPU health, and the NVML event listener.

The listener is one thread blocked in ``nvmlEventSetWait_v2``; it wakes only for an event
or for its wait timeout (which bounds how long ``close()`` takes), so it costs no CPU
between scrapes. Counters live behind a lock and are read on scrape.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PASS, WARN, FAIL = 0, 10, 20


@dataclass(frozen=True)
class XidClass:
    text: str
    watch: str  # dcgm-exporter health_watch: MEM, NVLINK, PCIE, ALL, …
    status: int  # PASS, WARN or FAIL
    code: str  # DCGM_FR_* health_error_code


# Texts follow NVIDIA's XID catalogue (dcgm-exporter uses the same wording for 48, 79, 94,
# 95 and 119). Application-caused XIDs (13, 31, 43, 45, 69) do not make a GPU unhealthy.
_XIDS: dict[int, XidClass] = {
    13: XidClass("Graphics Engine Exception", "SM", PASS, "DCGM_FR_OK"),
    31: XidClass("GPU memory page fault", "SM", PASS, "DCGM_FR_OK"),
    43: XidClass("GPU stopped processing", "SM", PASS, "DCGM_FR_OK"),
    45: XidClass("Preemptive cleanup, due to previous errors", "SM", PASS, "DCGM_FR_OK"),
    48: XidClass("Double Bit ECC Error", "MEM", FAIL, "DCGM_FR_VOLATILE_DBE_DETECTED"),
    61: XidClass("Internal micro-controller breakpoint/warning", "PMU", WARN, "DCGM_FR_XID_ERROR"),
    62: XidClass("Internal micro-controller halt", "PMU", FAIL, "DCGM_FR_XID_ERROR"),
    63: XidClass(
        "ECC page retirement or row remapping recording event", "MEM", WARN, "DCGM_FR_PENDING_ROW_REMAP"
    ),
    64: XidClass(
        "ECC page retirement or row remapper recording failure", "MEM", FAIL, "DCGM_FR_ROW_REMAP_FAILURE"
    ),
    69: XidClass("Graphics Engine class error", "SM", PASS, "DCGM_FR_OK"),
    74: XidClass("NVLINK Error", "NVLINK", FAIL, "DCGM_FR_NVLINK_ERROR_CRITICAL"),
    79: XidClass("GPU has fallen off the bus", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    92: XidClass("High single-bit ECC error rate", "MEM", WARN, "DCGM_FR_VOLATILE_SBE_DETECTED"),
    94: XidClass("Contained ECC error", "MEM", WARN, "DCGM_FR_XID_ERROR"),
    95: XidClass("Uncontained ECC error", "ALL", FAIL, "DCGM_FR_UNCONTAINED_ERROR"),
    119: XidClass("GSP RPC Timeout", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    120: XidClass("GSP Error", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    140: XidClass("Unrecovered ECC Error", "MEM", FAIL, "DCGM_FR_VOLATILE_DBE_DETECTED"),
    154: XidClass("GPU Recovery Action Changed", "ALL", WARN, "DCGM_FR_XID_ERROR"),
}


def classify(xid: int) -> XidClass:
    """Health meaning of an XID; an unknown code is a warning, as nobody has vetted it."""
    if xid == 0:
        return XidClass("No Error", "ALL", PASS, "DCGM_FR_OK")
    return _XIDS.get(xid, XidClass("Unknown Error", "ALL", WARN, "DCGM_FR_XID_ERROR"))


def handle_key(handle: Any) -> Any:
    """A hashable identity for an NVML device handle (a ctypes pointer: its address)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


class XidState:
    """Per-GPU XID history: last code, count per code. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._counts: dict[int, dict[int, int]] = {}

    def record(self, gpu: int, xid: int) -> None:
        with self._lock:
            self._last[gpu] = xid
            per_gpu = self._counts.setdefault(gpu, {})
            per_gpu[xid] = per_gpu.get(xid, 0) + 1

    def snapshot(self) -> tuple[dict[int, int], dict[int, dict[int, int]]]:
        with self._lock:
            return dict(self._last), {g: dict(c) for g, c in self._counts.items()}


class XidListener:
    """One thread blocked in ``nvmlEventSetWait_v2``, recording XIDs into an XidState."""

    def __init__(
        self,
        nvml: Any,
        handles: dict[int, Any],
        state: XidState,
        *,
        wait_ms: int = 1000,
        on_event: Callable[[int, int], None] | None = None,
    ) -> None:
        self._nvml = nvml
        self._state = state
        self._wait_ms = wait_ms
        self._on_event = on_event
        self._stop = threading.Event()
        self._by_key = {handle_key(h): gpu for gpu, h in handles.items()}
        self._event_set = nvml.nvmlEventSetCreate()
        self.registered: list[int] = []
        for gpu, handle in sorted(handles.items()):
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._event_set)
                self.registered.append(gpu)
            except nvml.NVMLError as exc:
                log.warning("GPU %d: cannot listen for XID events: %s", gpu, exc)
        self._thread = threading.Thread(target=self._run, name="rankwatch-xid-listener", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def native_id(self) -> int | None:
        """The listener thread's OS thread id (to read its CPU time from /proc)."""
        return self._thread.native_id

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, self._wait_ms)
            except nvml.NVMLError_Timeout:
                continue
            except nvml.NVMLError as exc:
                # Not a timeout: the library is going away or the set is broken. Back off
                # instead of spinning, and keep trying until closed.
                log.warning("XID event wait failed: %s", exc)
                self._stop.wait(self._wait_ms / 1000)
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            gpu = self._by_key.get(handle_key(data.device))
            if gpu is None:
                log.warning("XID %d for a device this exporter does not know", data.eventData)
                continue
            xid = int(data.eventData)
            self._state.record(gpu, xid)
            log.warning("GPU %d: XID %d (%s)", gpu, xid, classify(xid).text)
            if self._on_event is not None:
                self._on_event(gpu, xid)

    def close(self) -> None:
        self._stop.set()
        # The wait cannot be interrupted safely; it returns within wait_ms.
        self._thread.join(timeout=self._wait_ms / 1000 + 5)
        if self._thread.is_alive():
            log.warning("XID listener did not stop within its wait timeout")
            return
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except self._nvml.NVMLError as exc:
            log.debug("nvmlEventSetFree: %s", exc)
