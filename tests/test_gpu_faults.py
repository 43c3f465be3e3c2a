"""Faults injected into the simulated NVML, as the GPU collector's scrape shows them."""

from __future__ import annotations

import pytest
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.sim.nvml import ManualClock, SimulatedNVML


class Scrape:
    def __init__(self, collector: GpuCollector) -> None:
        text = render(collector.collect()).decode()
        self.fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, name: str, gpu: int, **labels: str) -> float | None:
        for s in self.fams.get(name, type("F", (), {"samples": []})).samples:
            if s.labels.get("gpu") == str(gpu) and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None

    def health(self, gpu: int) -> dict[str, tuple[float, str]]:
        return {
            s.labels["health_watch"]: (s.value, s.labels["health_error_code"])
            for s in self.fams["DCGM_EXP_GPU_HEALTH_STATUS"].samples
            if s.labels["gpu"] == str(gpu)
        }

    def node(self, name: str) -> float:
        return self.fams[name].samples[0].value


@pytest.fixture
def node():
    clock = ManualClock()
    sim = SimulatedNVML("node-f", seed=7, clock=clock)
    collector = GpuCollector(nvml=sim, hostname="node-f", xid_wait_ms=50)
    yield sim, clock, collector
    collector.close()


def wait_for(predicate) -> None:
    wait_until(predicate, "the collector to see the injected fault", every=0.01)


def xid_count(collector: GpuCollector, gpu: int, xid: int) -> float | None:
    return Scrape(collector).value("DCGM_EXP_XID_ERRORS_COUNT", gpu, xid=str(xid))


def test_healthy_node_passes_everywhere(node) -> None:
    _sim, _clock, collector = node
    s = Scrape(collector)
    for gpu in range(8):
        assert set(s.health(gpu).values()) == {(0.0, "DCGM_FR_OK")}
    assert s.node("rankwatch_gpu_expected") == s.node("rankwatch_gpu_answering") == 8
    assert s.node("rankwatch_gpu_nvml_available") == 1
    assert s.value("DCGM_EXP_XID_ERRORS_COUNT", 0, xid="79") == 0  # born at 0: increase() sees the first XID


def test_thermal_throttling_drops_clock_and_shows_reasons(node) -> None:
    sim, clock, collector = node
    before = Scrape(collector)
    sim.inject(2, "thermal", temp=94, sm_clock=1100, hw=True)
    clock.advance(10)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_GPU_TEMP", 2) == 94
    assert s.value("DCGM_FI_DEV_SM_CLOCK", 2) == 1100
    assert s.value("DCGM_FI_DEV_SM_CLOCK", 3) == 1980
    assert int(s.value("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 2)) & 0x60 == 0x60  # sw + hw thermal
    grown = s.value("DCGM_FI_DEV_THERMAL_VIOLATION", 2) - before.value("DCGM_FI_DEV_THERMAL_VIOLATION", 2)
    assert grown == pytest.approx(10e9, rel=0.01)  # ns
    assert s.value("DCGM_FI_DEV_THERMAL_VIOLATION", 3) == 0
    assert s.value("DCGM_EXP_CLOCK_EVENTS_COUNT", 2, clock_event="sw_thermal") == 1
    assert s.value("DCGM_EXP_CLOCK_EVENTS_COUNT", 3, clock_event="sw_thermal") == 0
    assert s.health(2)["THERMAL"] == (10.0, "DCGM_FR_CLOCK_THROTTLE_THERMAL")
    assert s.value("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 2) < s.value("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 3)
    # Still throttled: the event is counted once, not once per scrape.
    clock.advance(10)
    assert Scrape(collector).value("DCGM_EXP_CLOCK_EVENTS_COUNT", 2, clock_event="sw_thermal") == 1
    sim.clear(2, "thermal")
    clock.advance(5)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_SM_CLOCK", 2) == 1980
    assert s.health(2)["THERMAL"] == (0.0, "DCGM_FR_OK")
    sim.inject(2, "thermal")
    assert Scrape(collector).value("DCGM_EXP_CLOCK_EVENTS_COUNT", 2, clock_event="sw_thermal") == 2


def test_power_capping(node) -> None:
    sim, clock, collector = node
    sim.inject(4, "power_cap", limit=420.0, sm_clock=1400)
    clock.advance(3)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_POWER_USAGE", 4) <= 420.0
    assert s.value("DCGM_FI_DEV_SM_CLOCK", 4) == 1400
    assert int(s.value("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 4)) & 0x4
    assert s.value("DCGM_EXP_CLOCK_EVENTS_COUNT", 4, clock_event="power_cap") == 1
    assert s.value("DCGM_FI_DEV_POWER_VIOLATION", 4) > 0
    assert s.health(4)["POWER"] == (0.0, "DCGM_FR_OK")  # a software power cap is not a fault


def test_double_bit_error(node) -> None:
    sim, _clock, collector = node
    sim.inject(1, "dbe", count=2)
    wait_for(lambda: xid_count(collector, 1, 48) == 1)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 1) == 2
    assert s.value("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 1) == 2
    assert s.value("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 0) == 0
    assert s.value("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 1) == 2
    assert s.value("DCGM_FI_DEV_XID_ERRORS", 1, err_code="48", err_msg="Double Bit ECC Error") == 48
    assert s.health(1)["MEM"] == (20.0, "DCGM_FR_VOLATILE_DBE_DETECTED")
    assert s.health(0)["MEM"] == (0.0, "DCGM_FR_OK")
    sim.inject(1, "sbe", count=5)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 1) == 5


def test_row_remapping_pending_then_failed(node) -> None:
    sim, _clock, collector = node
    sim.inject(6, "remap_pending")
    wait_for(lambda: xid_count(collector, 6, 63) == 1)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_ROW_REMAP_PENDING", 6) == 1
    assert s.value("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 6) == 1
    assert s.health(6)["MEM"] == (10.0, "DCGM_FR_PENDING_ROW_REMAP")
    sim.inject(6, "remap_failure")
    wait_for(lambda: xid_count(collector, 6, 64) == 1)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_ROW_REMAP_FAILURE", 6) == 1
    assert s.health(6)["MEM"] == (20.0, "DCGM_FR_ROW_REMAP_FAILURE")


def test_nvlink_errors_and_xid_74(node) -> None:
    sim, clock, collector = node
    Scrape(collector)
    sim.inject(3, "nvlink_errors", crc_flit=100.0, replay=10.0, recovery=0.5, xid=True)
    clock.advance(10)
    wait_for(lambda: xid_count(collector, 3, 74) == 1)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 3) == 1000
    assert s.value("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", 3) == 100
    assert s.value("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", 3) == 5
    assert s.value("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 2) == 0
    assert s.health(3)["NVLINK"] == (20.0, "DCGM_FR_NVLINK_ERROR_CRITICAL")


def test_nvlink_recovery_errors_warn_while_recent() -> None:
    clock = ManualClock()
    sim = SimulatedNVML("n", seed=1, clock=clock)
    collector = GpuCollector(nvml=sim, listen_xid_events=False, health_window_s=60, clock=clock)
    try:
        Scrape(collector)
        sim.inject(0, "nvlink_errors", recovery=1.0)
        clock.advance(5)
        assert Scrape(collector).health(0)["NVLINK"] == (10.0, "DCGM_FR_NVLINK_ERROR_THRESHOLD")
        sim.clear(0, "nvlink_errors")
        clock.advance(30)
        assert Scrape(collector).health(0)["NVLINK"][0] == 10.0  # still within the window
        clock.advance(40)
        assert Scrape(collector).health(0)["NVLINK"] == (0.0, "DCGM_FR_OK")
    finally:
        collector.close()


def test_pcie_replays(node) -> None:
    sim, clock, collector = node
    Scrape(collector)
    sim.inject(5, "pcie_replay", rate=20.0)
    clock.advance(3)
    s = Scrape(collector)
    assert s.value("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 5) == 60
    assert s.health(5)["PCIE"] == (10.0, "DCGM_FR_PCI_REPLAY_RATE")
    assert s.value("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 4) == 0
    assert s.health(4)["PCIE"] == (0.0, "DCGM_FR_OK")


def test_xids_are_counted_by_code(node) -> None:
    sim, _clock, collector = node
    for xid in (94, 94, 13, 999):
        sim.inject(7, "xid", xid=xid)
    wait_for(lambda: xid_count(collector, 7, 999) == 1)
    s = Scrape(collector)
    assert s.value("DCGM_EXP_XID_ERRORS_COUNT", 7, xid="94") == 2
    assert s.value("DCGM_EXP_XID_ERRORS_COUNT", 7, xid="13") == 1
    assert s.value("DCGM_EXP_XID_ERRORS_COUNT", 6, xid="94") == 0
    assert s.value("DCGM_FI_DEV_XID_ERRORS", 7, err_code="999", err_msg="Unknown Error") == 999
    health = s.health(7)
    assert health["MEM"] == (10.0, "DCGM_FR_XID_ERROR")  # 94: contained ECC error
    assert health["ALL"] == (10.0, "DCGM_FR_XID_ERROR")  # an unknown XID warns
    # An application XID (13) alone leaves a GPU healthy.
    sim.inject(0, "xid", xid=13)
    wait_for(lambda: xid_count(collector, 0, 13) == 1)
    assert set(Scrape(collector).health(0).values()) == {(0.0, "DCGM_FR_OK")}


def test_gpu_falls_off_the_bus(node) -> None:
    sim, clock, collector = node
    before = Scrape(collector)
    uuid = before.fams["DCGM_FI_DEV_GPU_TEMP"].samples[3].labels["UUID"]
    sim.inject(3, "fell_off_bus")
    wait_for(lambda: xid_count(collector, 3, 79) == 1)
    with pytest.raises(sim.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetPowerUsage(_handle(sim, 3))
    clock.advance(5)
    s = Scrape(collector)
    assert s.node("rankwatch_gpu_expected") == 8
    assert s.node("rankwatch_gpu_answering") == 7
    assert s.value("rankwatch_gpu_up", 3) == 0 and s.value("rankwatch_gpu_up", 2) == 1
    # The lost GPU keeps its identity and reports failure; its readings are absent, not zero.
    health = [x for x in s.fams["DCGM_EXP_GPU_HEALTH_STATUS"].samples if x.labels["gpu"] == "3"]
    assert {x.labels["UUID"] for x in health} == {uuid}
    assert s.health(3)["ALL"] == (20.0, "NVML_ERROR_GPU_IS_LOST")
    assert s.value("DCGM_FI_DEV_XID_ERRORS", 3) == 79
    assert s.value("DCGM_FI_DEV_GPU_TEMP", 3) is None
    # The other seven are untouched.
    assert sorted(int(x.labels["gpu"]) for x in s.fams["DCGM_FI_DEV_GPU_TEMP"].samples) == [
        0,
        1,
        2,
        4,
        5,
        6,
        7,
    ]
    for gpu in (0, 1, 2, 4, 5, 6, 7):
        assert s.health(gpu)["ALL"] == (0.0, "DCGM_FR_OK")
        assert s.value("DCGM_FI_DEV_POWER_USAGE", gpu) > 100
    # After a reset the GPU answers again; the XID it raised keeps it flagged.
    sim.clear(3, "fell_off_bus")
    s = Scrape(collector)
    assert s.node("rankwatch_gpu_answering") == 8
    assert s.value("DCGM_FI_DEV_GPU_TEMP", 3) is not None
    assert s.health(3)["ALL"] == (20.0, "DCGM_FR_XID_ERROR")


def _handle(sim: SimulatedNVML, index: int):
    """A handle to a GPU that NVML no longer hands out (taken from the XID event path)."""
    import ctypes

    import pynvml

    return ctypes.cast(ctypes.c_void_p(sim._gpus[index].address), pynvml.c_nvmlDevice_t)


def test_gpu_lost_before_the_exporter_started() -> None:
    sim = SimulatedNVML("n", seed=2)
    sim.nvmlInit()
    sim.inject(0, "fell_off_bus", xid=False)
    collector = GpuCollector(nvml=sim, hostname="n", listen_xid_events=False)
    try:
        s = Scrape(collector)
        assert s.node("rankwatch_gpu_answering") == 7
        assert s.health(0)["ALL"] == (20.0, "NVML_ERROR_GPU_IS_LOST")
        lost_labels = next(
            x.labels for x in s.fams["DCGM_EXP_GPU_HEALTH_STATUS"].samples if x.labels["gpu"] == "0"
        )
        assert lost_labels["device"] == "nvidia0" and lost_labels.get("UUID", "") == ""  # never known
        sim.clear(0)
        s = Scrape(collector)  # discovered on the next scrape
        assert s.node("rankwatch_gpu_answering") == 8
        assert s.value("DCGM_FI_DEV_GPU_TEMP", 0) is not None
    finally:
        collector.close()
        sim.nvmlShutdown()


def test_expected_gpus_can_exceed_what_nvml_lists() -> None:
    sim = SimulatedNVML("n", gpu_count=7, seed=2)
    collector = GpuCollector(nvml=sim, listen_xid_events=False, expected_gpus=8)
    try:
        s = Scrape(collector)
    finally:
        collector.close()
    assert s.node("rankwatch_gpu_expected") == 8
    assert s.node("rankwatch_gpu_answering") == 7
    assert s.value("rankwatch_gpu_up", 7) == 0
    assert s.health(7)["ALL"][0] == 20.0


def test_health_history_bounded_under_rapid_scrapes() -> None:
    # Scraped 20 times a second for longer than the health window: the growth rule still
    # warns and clears on time, and the kept history does not grow with the scrape rate.
    from rankwatch.exporters.gpu import _HISTORY_SLOTS

    clock = ManualClock()
    sim = SimulatedNVML("n", gpu_count=1, seed=1, clock=clock)
    collector = GpuCollector(nvml=sim, listen_xid_events=False, health_window_s=30, clock=clock)

    def scrape_for(seconds: float) -> None:
        for _ in range(int(seconds * 20)):
            clock.advance(0.05)
            list(collector.collect())

    try:
        scrape_for(40)
        sim.inject(0, "nvlink_errors", recovery=1.0)
        scrape_for(5)
        sim.clear(0, "nvlink_errors")
        scrape_for(20)
        assert Scrape(collector).health(0)["NVLINK"] == (10.0, "DCGM_FR_NVLINK_ERROR_THRESHOLD")
        scrape_for(15)
        assert Scrape(collector).health(0)["NVLINK"] == (0.0, "DCGM_FR_OK")
        sizes = [len(h) for g in collector._gpus for h in g.history.values()]
        assert sizes and max(sizes) <= _HISTORY_SLOTS + 2  # 600 scrapes fall in the window
    finally:
        collector.close()
