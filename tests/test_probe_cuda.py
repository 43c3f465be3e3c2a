"""The probe's CUDA-event path, driven through a fake of the torch.cuda boundary it uses
(``Event(enable_timing=True)``, ``record``, ``query``, ``elapsed_time``). The fake models one
stream whose clock the test advances, and fails the test on any synchronisation call."""

from __future__ import annotations

import sys
import time
import types

import pytest

from rankwatch import Probe
from rankwatch.exporters import probe as probe_mod
from rankwatch.exporters.cuda_timing import CudaSectionTimer
from rankwatch.exporters.identity import RankIdentity


class FakeStream:
    """One CUDA stream: work queues behind earlier work; ``now`` is the GPU's clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.tail = 0.0
        self.syncs = 0

    def launch(self, seconds: float) -> None:
        self.tail = max(self.tail, self.now) + seconds


class FakeEvent:
    def __init__(self, stream: FakeStream, enable_timing: bool = False) -> None:
        assert enable_timing, "timing events must be created with enable_timing=True"
        self._s = stream
        self.t: float | None = None

    def record(self, stream: object = None) -> None:
        self.t = max(self._s.tail, self._s.now)
        self._s.tail = self.t

    def query(self) -> bool:
        return self.t is not None and self._s.now >= self.t

    def elapsed_time(self, end: FakeEvent) -> float:
        # torch raises if either event has not completed: so does the fake.
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time on an incomplete event")
        return (end.t - self.t) * 1000.0

    def synchronize(self) -> None:
        self._s.syncs += 1
        raise AssertionError("Event.synchronize() on the hot path")

    def wait(self, stream: object = None) -> None:
        self.synchronize()


def fake_cuda(stream: FakeStream) -> types.SimpleNamespace:
    def synchronize(device: object = None) -> None:
        stream.syncs += 1
        raise AssertionError("torch.cuda.synchronize() on the hot path")

    return types.SimpleNamespace(
        Event=lambda enable_timing=False: FakeEvent(stream, enable_timing),
        is_initialized=lambda: True, is_available=lambda: True, current_device=lambda: 0,
        init=lambda: None, synchronize=synchronize)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeStream:
    """Make the probe see a script that has initialised CUDA (sys.modules['torch'] is the fake)."""
    stream = FakeStream()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=fake_cuda(stream)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return stream


def make_probe(**kw: object) -> Probe:
    return Probe(run="cuda", port=0, wandb_run=None,
                 identity=RankIdentity(rank=0, world_size=1, node="n"), **kw)  # type: ignore[arg-type]


def sections(p: Probe) -> dict[str, tuple[float, int]]:
    return p.totals().sections


def test_gpu_time_is_read_a_step_later_without_synchronising(gpu: FakeStream) -> None:
    p = make_probe()
    with p.step(tokens=1):
        with p.section("forward"):
            gpu.launch(0.050)   # asynchronous: the host returns at once
        with p.section("comm"):
            gpu.launch(0.020)
    # The GPU has not run yet: the step is counted (host time), its sections not yet.
    assert p.totals().steps == 1 and sections(p) == {}
    gpu.now = 1.0               # the GPU catches up while the host starts the next step
    with p.step(tokens=1):
        with p.section("forward"):
            gpu.launch(0.050)
    s = sections(p)
    assert s["forward"][1] == 1 and s["forward"][0] == pytest.approx(0.050)
    assert s["comm"][1] == 1 and s["comm"][0] == pytest.approx(0.020)
    gpu.now = 2.0
    p.close()                   # drains what completed, by polling
    assert sections(p)["forward"] == (pytest.approx(0.100), 2)
    assert gpu.syncs == 0 and p.errors == 0


def test_host_bound_section_records_host_time(gpu: FakeStream) -> None:
    p = make_probe()
    with p.step():
        with p.section("dataloader"):
            time.sleep(0.03)    # waiting for a batch: no GPU work between the events
    gpu.now = 1.0
    with p.step():
        pass
    sec, n = sections(p)["dataloader"]
    assert n == 1 and sec >= 0.03
    p.close()


def test_cuda_timing_false_keeps_host_timing(gpu: FakeStream, monkeypatch: pytest.MonkeyPatch) -> None:
    host = [10.0]
    monkeypatch.setattr(probe_mod, "_perf", lambda: host[0])
    p = make_probe(cuda_timing=False)
    with p.step():
        with p.section("forward"):
            gpu.launch(0.5)  # asynchronous: 0.5 s of GPU work
            host[0] += 0.002  # 2 ms on the host
    assert sections(p)["forward"] == (pytest.approx(0.002), 1)  # the host's time, not the GPU's
    p.close()


def test_close_gives_up_on_a_gpu_that_never_finishes(gpu: FakeStream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "CLOSE_DRAIN_SECONDS", 0.2)
    p = make_probe()
    with p.step():
        with p.section("forward"):
            gpu.launch(10.0)
    p.close()  # gives up after CLOSE_DRAIN_SECONDS: returning at all is the check
    assert gpu.syncs == 0 and "forward" not in sections(p)


def test_pending_pairs_are_bounded_and_drops_counted(gpu: FakeStream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "CLOSE_DRAIN_SECONDS", 0.1)
    p = make_probe()
    with p.step():
        pass                    # enables CUDA timing
    assert p._cuda is not None
    p._cuda.max_pending = 8
    gpu.now = -1.0              # a GPU that is stuck: nothing ever completes
    with p.step():
        for _ in range(12):
            with p.section("forward"):
                gpu.launch(0.001)
    assert p._cuda.pending == 8
    assert p.errors == 4
    p.close()


def test_timer_resolves_in_order_and_checks_both_events() -> None:
    stream = FakeStream()
    t = CudaSectionTimer(fake_cuda(stream))
    a = t.start()
    stream.launch(0.01)
    t.stop("forward", a, 0.0)
    b = t.start()
    stream.launch(0.02)
    t.stop("backward", b, 0.0)
    stream.now = 0.015          # forward done, backward still running
    assert t.poll() == [("forward", pytest.approx(0.01))]
    assert t.pending == 1
    stream.now = 1.0
    assert t.poll() == [("backward", pytest.approx(0.02))]
    # Completed events are reused instead of created anew.
    assert len(t._free) == 4
    t.start()
    assert len(t._free) == 3
    assert stream.syncs == 0
