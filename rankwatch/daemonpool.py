"""A small pool of daemon worker threads, shared by the EFA collector's sysfs readers and the
HTTP servers' request workers.

Not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined at interpreter exit, so
one call stuck in the kernel (a wedged EFA device) or in a handler would keep an exporter or a
training process from ever exiting. Threads start only when work waits and none is idle, up to
the target size; ``grow()``/``resize()`` raise the target for callers that know some threads
are stuck, and a worker whose stuck call finally returns leaves when the pool is over target.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class DaemonPool:
    """At most ``size`` (+ ``resize``/``grow``) daemon threads named ``<name>-<n>``."""

    def __init__(self, size: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._name = name
        self._base = size
        self._target = size
        self._live = 0
        self._idle = 0
        self._queued = 0
        self._started = 0
        self._closed = False

    @property
    def live(self) -> int:
        """Worker threads running now."""
        return self._live

    def resize(self, extra: int) -> None:
        """Allow ``extra`` threads beyond the base size (one per call known to be stuck)."""
        with self._lock:
            self._target = self._base + extra

    def grow(self) -> None:
        """Allow one more thread: the queue makes no progress, a worker is probably stuck."""
        with self._lock:
            self._target += 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        with self._lock:
            self._queued += 1
            if self._queued > self._idle and self._live < self._target and not self._closed:
                self._live += 1
                self._idle += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._started}", daemon=True).start()
        self._queue.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                self._queued -= 1
                self._idle -= 1
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever waits on the future
                    fut.set_exception(exc)
            with self._lock:
                if self._live > self._target:  # a stuck call came back: shrink again
                    self._live -= 1
                    return
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = self._live
        for _ in range(live):
            self._queue.put(None)
