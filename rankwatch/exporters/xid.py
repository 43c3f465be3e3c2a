"""XID errors: the NVML event listener (what each code means: ``rankwatch.xids``).

The listener is one thread blocked in ``nvmlEventSetWait_v2``; it wakes only for an event
or for its wait timeout (which bounds how long ``close()`` takes), so it costs no CPU
between scrapes. Counters live behind a lock and are read on scrape.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

from rankwatch.xids import FAIL, PASS, WARN, XidClass, classify

log = logging.getLogger(__name__)

# The classification lives in rankwatch.xids, shared with the detector and the alert rules.
__all__ = ["FAIL", "PASS", "WARN", "XidClass", "XidListener", "XidState", "classify", "handle_key"]


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
