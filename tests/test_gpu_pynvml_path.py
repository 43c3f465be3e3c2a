"""The GPU collector on the real pynvml module, with only libnvidia-ml's C functions simulated.

Every pynvml wrapper the collector uses runs unchanged here: ctypes argument packing,
out-parameters, struct versions and the conversion of return codes into NVMLError
subclasses.
"""

from __future__ import annotations

import pynvml
import pytest
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.sim.nvml import ManualClock, SimulatedNVML
from rankwatch.sim.nvml_lib import installed_in_pynvml


def families(collector: GpuCollector) -> dict:
    return {f.name: f for f in text_string_to_metric_families(render(collector.collect()).decode())}


def by_gpu(fams: dict, name: str, **labels: str) -> dict[int, float]:
    return {
        int(s.labels["gpu"]): s.value
        for s in fams[name].samples
        if all(s.labels.get(k) == v for k, v in labels.items())
    }


def test_real_pynvml_module_and_simulated_module_agree_exactly() -> None:
    """The same node read through pynvml's wrappers and through the pynvml-like module gives
    byte-identical exposition: the module stand-in returns what pynvml returns."""
    clock = ManualClock()
    outputs = []
    for through_pynvml in (True, False):
        sim = SimulatedNVML("twin", seed=11, clock=clock)
        sim.inject(1, "thermal")
        sim.inject(2, "field_error", field_id=pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION)
        sim.inject(3, "call_error", call="nvmlDeviceGetTemperature", error=pynvml.NVML_ERROR_NO_PERMISSION)
        if through_pynvml:
            with installed_in_pynvml(sim) as nvml:
                collector = GpuCollector(nvml=nvml, hostname="twin", listen_xid_events=False)
                outputs.append(render(collector.collect()))
                collector.close()
        else:
            collector = GpuCollector(nvml=sim, hostname="twin", listen_xid_events=False)
            outputs.append(render(collector.collect()))
            collector.close()
    assert outputs[0] == outputs[1]
    assert b'DCGM_FI_DEV_GPU_TEMP{gpu="3"' not in outputs[0]
    assert b'call="nvmlDeviceGetTemperature",error="NVML_ERROR_NO_PERMISSION"' in outputs[0]


def test_scrape_faults_and_xid_events_through_pynvml() -> None:
    clock = ManualClock()
    sim = SimulatedNVML("p5", seed=4, clock=clock)
    library_before = pynvml.nvmlLib
    with installed_in_pynvml(sim) as nvml:
        assert nvml is pynvml
        collector = GpuCollector(nvml=pynvml, hostname="p5", xid_wait_ms=100)
        try:
            families(collector)
            clock.advance(10)
            fams = families(collector)
            assert by_gpu(fams, "DCGM_FI_DEV_SM_CLOCK") == dict.fromkeys(range(8), 1980.0)
            assert all(
                v == pytest.approx(320000, rel=0.02)
                for v in by_gpu(fams, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL").values()
            )
            assert len(by_gpu(fams, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")) == 8
            assert fams["DCGM_FI_DEV_GPU_TEMP"].samples[0].labels["pci_bus_id"] == "00000000:53:00.0"

            sim.inject(5, "fell_off_bus")
            sim.inject(6, "xid", xid=95)
            wait_until(lambda: by_gpu(families(collector), "DCGM_EXP_XID_ERRORS_COUNT", xid="95").get(6) == 1,
                       "XID 95 from the listener")
            fams = families(collector)
            assert fams["rankwatch_gpu_answering"].samples[0].value == 7
            health = {
                (int(s.labels["gpu"]), s.labels["health_watch"]): (s.value, s.labels["health_error_code"])
                for s in fams["DCGM_EXP_GPU_HEALTH_STATUS"].samples
            }
            assert health[(5, "ALL")] == (20.0, "NVML_ERROR_GPU_IS_LOST")
            assert health[(6, "ALL")] == (20.0, "DCGM_FR_UNCONTAINED_ERROR")
            assert by_gpu(fams, "DCGM_EXP_XID_ERRORS_COUNT", xid="79")[5] == 1
            with pytest.raises(pynvml.NVMLError_GpuIsLost):
                pynvml.nvmlDeviceGetHandleByIndex(5)
            with pytest.raises(pynvml.NVMLError_FunctionNotFound):  # not in the simulated library
                pynvml.nvmlDeviceGetFanSpeed(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            collector.close()
        assert not collector.listener_alive
    assert pynvml.nvmlLib is library_before  # uninstalled: whatever pynvml had loaded is back
