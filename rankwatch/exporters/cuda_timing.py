"""Section timing with CUDA events, read back without ever stalling the host.

A section records one event on the current stream when it starts and one when it ends. The
pair goes into a FIFO; :meth:`CudaSectionTimer.poll` (called by the probe at the end of every
step) pops the pairs whose events have completed — ``Event.query()`` is a non-blocking
``cudaEventQuery`` — and only then calls ``elapsed_time``. Nothing here calls
``torch.cuda.synchronize()`` or ``Event.synchronize()``/``wait()``: a section's time arrives
when the GPU has finished it, normally within a step.

The recorded time is ``max(GPU time between the events, host wall time)``, as Megatron-LM's
StragglerDetector does: kernels are launched asynchronously, so the GPU time is what a forward
pass costs; a host-bound section (data loading, a blocking gloo collective) shows as host time.
A CUDA-event pair measures the stream's elapsed time, including any wait of that stream on
another (e.g. on NCCL's stream inside ``comm``): that is wanted for ``comm``, and it is why
compute and comm wait must be separate sections.

The only interface used from ``torch.cuda`` is ``Event(enable_timing=True)``, ``record()``,
``query()`` and ``elapsed_time()``, so tests drive this class with a small fake.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol


class _Event(Protocol):
    def record(self, stream: Any = None) -> None: ...
    def query(self) -> bool: ...
    def elapsed_time(self, end_event: Any) -> float: ...


class CudaSectionTimer:
    """Pending CUDA event pairs of one probe. Not thread-safe: used from the training thread
    (the probe's lock guards the counters it feeds)."""

    def __init__(self, cuda: Any, max_pending: int = 4096) -> None:
        self._cuda = cuda
        self._free: list[_Event] = []
        self._pending: deque[tuple[str, _Event, _Event, float]] = deque()
        self.max_pending = max_pending
        self.dropped = 0

    def _event(self) -> _Event:
        # Reuse completed events: creating one costs a driver call, recording a pooled one not.
        return self._free.pop() if self._free else self._cuda.Event(enable_timing=True)

    def start(self) -> _Event:
        ev = self._event()
        ev.record()
        return ev

    def stop(self, name: str, start: _Event, host_seconds: float) -> None:
        end = self._event()
        end.record()
        self._pending.append((name, start, end, host_seconds))
        if len(self._pending) > self.max_pending:
            # The GPU has not finished thousands of sections (hung or far behind): keep memory
            # bounded. The hang itself shows as steps that stop advancing.
            self._pending.popleft()
            self.dropped += 1

    def abandon(self, start: _Event) -> None:
        """Return the start event of a section that ended with an exception."""
        self._free.append(start)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self) -> list[tuple[str, float]]:
        """``(section, seconds)`` of every leading pair whose events have completed, oldest
        first; stops at the first pair still running (never waits)."""
        done: list[tuple[str, float]] = []
        pending = self._pending
        while pending:
            name, start, end, host = pending[0]
            # Both: the events may sit on different streams if the section switched streams.
            if not (end.query() and start.query()):
                break
            pending.popleft()
            gpu = start.elapsed_time(end) / 1000.0
            done.append((name, gpu if gpu > host else host))
            self._free.append(start)
            self._free.append(end)
        return done
