"""Error paths of the GPU collector, the XID listener and the simulated NVML as a pynvml drop-in."""

from __future__ import annotations

import ctypes
import inspect
import logging
import re
import threading
import time
from pathlib import Path

import pynvml
import pytest
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

import rankwatch.sim.nvml as sim_module
from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.sim.nvml import SimulatedNVML


def scrape(collector: GpuCollector) -> dict:
    return {f.name: f for f in text_string_to_metric_families(render(collector.collect()).decode())}


def value(fams: dict, name: str, **labels: str) -> float | None:
    for s in fams[name].samples if name in fams else []:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def gpus_of(fams: dict, name: str) -> list[int]:
    return sorted(int(s.labels["gpu"]) for s in fams.get(name, type("F", (), {"samples": []})).samples)


def _real_nvml_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_pynvml_without_or_with_the_library(caplog) -> None:
    """The real pynvml: on a CPU-only machine it says so in the log (once) and in a metric; on a
    GPU machine the same collector lists the real GPUs."""
    caplog.set_level(logging.WARNING)
    collector = GpuCollector(nvml=pynvml, hostname="h", listen_xid_events=False)
    try:
        fams = [scrape(collector) for _ in range(3)][-1]
    finally:
        collector.close()
    available = fams["rankwatch_gpu_nvml_available"].samples[0]
    if _real_nvml_loads():
        assert available.value == 1
        assert value(fams, "rankwatch_gpu_answering") == value(fams, "rankwatch_gpu_expected") >= 1
        assert len(fams["DCGM_FI_DEV_GPU_TEMP"].samples) == value(fams, "rankwatch_gpu_answering")
    else:
        assert available.value == 0
        assert available.labels == {"Hostname": "h", "error": "NVML Shared Library Not Found"}
        assert value(fams, "rankwatch_gpu_expected") == 0
        assert value(fams, "rankwatch_gpu_answering") == 0
        assert not [n for n in fams if n.startswith("DCGM_")]
        assert len([r for r in caplog.records if "NVML unavailable" in r.getMessage()]) == 1


def test_driver_not_loaded_then_loaded(caplog) -> None:
    caplog.set_level(logging.WARNING)
    sim = SimulatedNVML("n", seed=1, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    collector = GpuCollector(nvml=sim, listen_xid_events=False, init_retry_s=0.0, expected_gpus=8)
    try:
        fams = scrape(collector)
        assert value(fams, "rankwatch_gpu_nvml_available", error="Driver Not Loaded") == 0
        assert value(fams, "rankwatch_gpu_expected") == 8  # configured: the loss is visible
        assert value(fams, "rankwatch_gpu_answering") == 0
        scrape(collector)
        assert len([r for r in caplog.records if "NVML unavailable" in r.getMessage()]) == 1
        sim.init_error = None  # the driver comes up; the collector retries on the next scrape
        fams = scrape(collector)
        assert fams["rankwatch_gpu_nvml_available"].samples[0].labels == {"Hostname": collector.hostname}
        assert value(fams, "rankwatch_gpu_nvml_available") == 1
        assert value(fams, "rankwatch_gpu_answering") == 8
        assert gpus_of(fams, "DCGM_FI_DEV_SM_CLOCK") == list(range(8))
    finally:
        collector.close()


def test_a_field_that_errors_is_omitted_and_the_rest_kept() -> None:
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, listen_xid_events=False)
    try:
        sim.inject(2, "field_error", field_id=pynvml.NVML_FI_DEV_MEMORY_TEMP, error=pynvml.NVML_ERROR_UNKNOWN)
        fams = scrape(collector)
    finally:
        collector.close()
    assert gpus_of(fams, "DCGM_FI_DEV_MEMORY_TEMP") == [0, 1, 3, 4, 5, 6, 7]
    # The same nvmlDeviceGetFieldValues call carried these; they stay.
    assert gpus_of(fams, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == list(range(8))
    assert gpus_of(fams, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL") == list(range(8))
    assert value(fams, "rankwatch_gpu_answering") == 8
    errors = fams["rankwatch_gpu_nvml_errors"].samples
    assert [(s.labels, s.value) for s in errors] == [
        ({"gpu": "2", "call": "DCGM_FI_DEV_MEMORY_TEMP", "error": "NVML_ERROR_UNKNOWN"}, 1.0)
    ]


def test_a_call_that_errors_is_omitted_and_the_rest_kept() -> None:
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, listen_xid_events=False)
    try:
        sim.inject(5, "call_error", call="nvmlDeviceGetPowerUsage", error=pynvml.NVML_ERROR_TIMEOUT)
        sim.inject(
            6, "call_error", call="nvmlDeviceGetUtilizationRates", error=pynvml.NVML_ERROR_NOT_SUPPORTED
        )
        fams = scrape(collector)
        fams = scrape(collector)
    finally:
        collector.close()
    assert gpus_of(fams, "DCGM_FI_DEV_POWER_USAGE") == [0, 1, 2, 3, 4, 6, 7]
    assert gpus_of(fams, "DCGM_FI_DEV_GPU_UTIL") == [0, 1, 2, 3, 4, 5, 7]
    assert gpus_of(fams, "DCGM_FI_DEV_SM_CLOCK") == list(range(8))
    assert value(fams, "rankwatch_gpu_nvml_errors", gpu="5", call="nvmlDeviceGetPowerUsage") == 2
    # NOT_SUPPORTED is what the GPU is, not an error: not counted.
    assert value(fams, "rankwatch_gpu_nvml_errors", gpu="6") is None


def test_an_unexpected_exception_costs_one_gpu_not_the_scrape(caplog) -> None:
    class Broken(SimulatedNVML):
        def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802 - pynvml's name
            if self._by_address[ctypes.cast(handle, ctypes.c_void_p).value].index == 1:
                return 42  # not what NVML returns: the collector trips over it
            return super().nvmlDeviceGetUtilizationRates(handle)

    caplog.set_level(logging.ERROR)
    collector = GpuCollector(nvml=Broken("n", seed=1), listen_xid_events=False)
    try:
        fams = scrape(collector)
    finally:
        collector.close()
    assert gpus_of(fams, "DCGM_FI_DEV_SM_CLOCK") == [0, 2, 3, 4, 5, 6, 7]
    assert value(fams, "rankwatch_gpu_nvml_errors", gpu="1", call="read", error="exception") == 1
    assert "GPU 1: unexpected error" in caplog.text


def test_hpc_job_mapping(tmp_path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "0").write_text("1234\n5678\n")
    (jobs / "3").write_text("42\n")
    (jobs / "3.1").write_text("43\n\n")  # a MIG instance's file counts for its GPU
    (jobs / "notes.txt").write_text("999\n")  # not a GPU file: ignored
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, hostname="n", listen_xid_events=False, job_mapping_dir=str(jobs))
    try:
        text = render(collector.collect()).decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        temps = [(s.labels["gpu"], s.labels.get("hpc_job")) for s in fams["DCGM_FI_DEV_GPU_TEMP"].samples]
        assert temps[:3] == [("0", "1234"), ("0", "5678"), ("1", None)]
        assert ("3", "42") in temps and ("3", "43") in temps and ("3", None) not in temps
        assert len(temps) == 8 + 2  # one series per job: GPUs 0 and 3 twice
        assert not [s for s in fams["DCGM_FI_DEV_GPU_TEMP"].samples if s.labels.get("hpc_job") == "999"]
        line = next(x for x in text.splitlines() if x.startswith('DCGM_EXP_XID_ERRORS_COUNT{gpu="0"'))
        assert re.findall(r'(\w+)="', line)[-3:] == ["DCGM_FI_DRIVER_VERSION", "hpc_job", "xid"]
        (jobs / "0").unlink()  # the job ended: Slurm's epilog removed the file
        fams = scrape(collector)
        assert {s.labels.get("hpc_job") for s in fams["DCGM_FI_DEV_GPU_TEMP"].samples} == {None, "42", "43"}
    finally:
        collector.close()


def test_missing_job_mapping_directory_means_no_jobs(tmp_path) -> None:
    collector = GpuCollector(
        nvml=SimulatedNVML("n", seed=1), listen_xid_events=False, job_mapping_dir=str(tmp_path / "none")
    )
    try:
        fams = scrape(collector)
    finally:
        collector.close()
    assert len(fams["DCGM_FI_DEV_GPU_TEMP"].samples) == 8
    assert all("hpc_job" not in s.labels for s in fams["DCGM_FI_DEV_GPU_TEMP"].samples)


def thread_cpu_ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))


def test_xid_listener_blocks_wakes_on_events_and_stops_on_close() -> None:
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, xid_wait_ms=1500)
    try:
        assert collector.listener_alive
        # Blocked in the event wait: the listener thread uses no CPU while nothing happens.
        stat = Path(f"/proc/self/task/{collector.xid_listener.native_id}/stat")
        ticks0 = thread_cpu_ticks(stat)
        time.sleep(0.5)
        assert thread_cpu_ticks(stat) - ticks0 <= 2  # a polling loop would burn ~50 ticks (100 Hz)
    finally:
        collector.close()  # returns within one wait timeout: the thread is gone after it
    assert not collector.listener_alive
    assert not [t for t in threading.enumerate() if t.name == "rankwatch-xid-listener" and t.is_alive()]
    collector.close()  # idempotent
    assert list(collector.collect()) == []


def test_xid_listener_is_woken_by_the_event_not_by_its_wait_timeout() -> None:
    # The wait timeout is far longer than this test waits: only a wake can deliver the XID.
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, xid_wait_ms=3_600_000)
    closer = threading.Thread(target=collector.close)
    try:
        sim.inject(4, "xid", xid=119)
        wait_until(lambda: value(scrape(collector), "DCGM_EXP_XID_ERRORS_COUNT", gpu="4", xid="119") == 1,
                   "the XID to reach the exporter")
    finally:
        # close() waits for the listener's wait to return: wake it with events until it stops
        closer.start()
        wait_until(lambda: (sim.inject(4, "xid", xid=119), not collector.listener_alive)[1],
                   "the woken listener to stop", every=0.2)
        closer.join()
    with pytest.raises(pynvml.NVMLError_Uninitialized):  # the collector shut NVML down
        sim.nvmlDeviceGetCount()


def test_concurrent_scrapes_all_succeed_and_agree() -> None:
    sim = SimulatedNVML("n", seed=1)
    collector = GpuCollector(nvml=sim, listen_xid_events=False)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(2):
                text = render(collector.collect()).decode()
                # the series (name and labels) of every sample line; values move with time
                results.append([line.rsplit(" ", 1)[0] for line in text.splitlines() if line[0] != "#"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        collector.close()
    assert not errors
    assert len(results) == 40
    assert all(r == results[0] for r in results)
    assert len(results[0]) > 400 and len(set(results[0])) == len(results[0])


# --- the simulated NVML as a drop-in for pynvml ------------------------------------------------


def test_simulated_functions_have_pynvml_names_and_signatures() -> None:
    simulated = [n for n, _ in inspect.getmembers(SimulatedNVML, inspect.isfunction) if n.startswith("nvml")]
    assert len(simulated) > 40
    for name in simulated:
        real = getattr(pynvml, name)
        ours = list(inspect.signature(getattr(SimulatedNVML, name)).parameters)[1:]
        assert ours == list(inspect.signature(real).parameters), name


def test_simulated_nvml_reuses_pynvml_constants_errors_and_structures() -> None:
    sim = SimulatedNVML("n", seed=1)
    assert sim.NVMLError is pynvml.NVMLError
    assert sim.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert sim.NVML_CLOCK_SM == pynvml.NVML_CLOCK_SM
    assert sim.nvmlEventTypeXidCriticalError == pynvml.nvmlEventTypeXidCriticalError
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetCount()
    sim.nvmlInit()
    try:
        handle = sim.nvmlDeviceGetHandleByIndex(0)
        assert isinstance(handle, pynvml.c_nvmlDevice_t)
        assert isinstance(
            sim.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2), pynvml.c_nvmlMemory_v2_t
        )
        assert sim.nvmlDeviceGetPciInfo(handle).busId == "00000000:53:00.0"  # pynvml decodes it
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            sim.nvmlDeviceGetHandleByIndex(8)
        with pytest.raises(pynvml.NVMLError_FunctionNotFound):
            sim.nvmlDeviceGetFanSpeed(handle)  # a real NVML function the simulation lacks
        with pytest.raises(pynvml.NVMLError_NotSupported):
            sim.nvmlDeviceGetGridLicensableFeatures(handle)
        event_set = sim.nvmlEventSetCreate()
        sim.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
        t0 = time.monotonic()
        with pytest.raises(pynvml.NVMLError_Timeout):
            sim.nvmlEventSetWait_v2(event_set, 100)
        assert time.monotonic() - t0 >= 0.09  # waited its timeout (returning at all: it did not wait forever)
        sim.inject(0, "xid", xid=31)
        data = sim.nvmlEventSetWait_v2(event_set, 1000)
        assert isinstance(data, pynvml.c_nvmlEventData_t)
        assert (data.eventType, data.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 31)
        assert ctypes.cast(data.device, ctypes.c_void_p).value == ctypes.cast(handle, ctypes.c_void_p).value
        sim.nvmlEventSetFree(event_set)
        with pytest.raises(ValueError, match="unknown fault"):
            sim.inject(0, "melted")
        with pytest.raises(ValueError, match="takes"):
            sim.inject(0, "thermal", celsius=120)
    finally:
        sim.nvmlShutdown()


def test_module_level_functions_drive_a_default_node() -> None:
    collector = GpuCollector(nvml=sim_module, hostname="default", listen_xid_events=False)
    try:
        fams = scrape(collector)
    finally:
        collector.close()
    assert gpus_of(fams, "DCGM_FI_DEV_GPU_TEMP") == list(range(8))
    assert sim_module.nvmlEventTypeXidCriticalError == pynvml.nvmlEventTypeXidCriticalError
    assert sim_module.default() is sim_module.default()


def test_several_simulated_nodes_in_one_process_are_independent() -> None:
    a, b = SimulatedNVML("node-00", seed=5), SimulatedNVML("node-01", seed=5)
    ca = GpuCollector(nvml=a, hostname="node-00", listen_xid_events=False)
    cb = GpuCollector(nvml=b, hostname="node-01", listen_xid_events=False)
    try:
        a.inject(0, "fell_off_bus", xid=False)
        fa, fb = scrape(ca), scrape(cb)
    finally:
        ca.close()
        cb.close()
    assert value(fa, "rankwatch_gpu_answering") == 7 and value(fb, "rankwatch_gpu_answering") == 8
    uuids_a = {s.labels["UUID"] for s in fa["DCGM_EXP_GPU_HEALTH_STATUS"].samples}
    uuids_b = {s.labels["UUID"] for s in fb["DCGM_EXP_GPU_HEALTH_STATUS"].samples}
    assert not uuids_a & uuids_b  # UUIDs differ per host even with the same seed
