"""A simulated ``nvidia-smi -q -x``: the XML the R550 driver prints, read from a SimulatedNVML.

Like the real tool, it reads the same device state NVML does, so gpu-check's comparisons can
be exercised on a CPU. Only the elements gpu-check reads are filled in; the rest of
nvidia-smi's document is left out, as elements a driver does not support are.
"""

from __future__ import annotations

import time
from typing import Any
from xml.sax.saxutils import escape

import pynvml

from rankwatch.sim.nvml import SimulatedNVML


def smi_xml(sim: SimulatedNVML, *, cuda_version: str = "12.4") -> str:
    """The ``nvidia-smi -q -x`` document for every GPU of ``sim``."""
    sim.nvmlInit()
    try:
        count = sim.nvmlDeviceGetCount()
        out = ['<?xml version="1.0" ?>',
               '<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">',
               "<nvidia_smi_log>",
               f"\t<timestamp>{time.strftime('%a %b %d %H:%M:%S %Y', time.localtime(sim.clock()))}</timestamp>",
               f"\t<driver_version>{escape(sim.nvmlSystemGetDriverVersion())}</driver_version>",
               f"\t<cuda_version>{cuda_version}</cuda_version>",
               f"\t<attached_gpus>{count}</attached_gpus>"]
        for i in range(count):
            out += _gpu(sim, i)
        out.append("</nvidia_smi_log>")
        return "\n".join(out) + "\n"
    finally:
        sim.nvmlShutdown()


def _reading(fn: Any, fmt: str) -> str:
    """A value as nvidia-smi prints it, or its words for a failing read."""
    try:
        return fmt.format(fn())
    except pynvml.NVMLError_NotSupported:
        return "N/A"
    except pynvml.NVMLError as exc:
        return str(exc)  # e.g. "Unknown Error", as nvidia-smi prints it


def _gpu(sim: SimulatedNVML, index: int) -> list[str]:
    try:
        h = sim.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError:
        return []  # nvidia-smi leaves out a GPU that fell off the bus
    bus = sim.nvmlDeviceGetPciInfo(h).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus
    mem = sim.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    util = sim.nvmlDeviceGetUtilizationRates(h)
    mib = 1 << 20

    def ecc(kind: int, scope: int) -> int:
        return sim.nvmlDeviceGetTotalEccErrors(h, kind, scope)

    corrected, uncorrected = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    scopes = {"volatile": pynvml.NVML_VOLATILE_ECC, "aggregate": pynvml.NVML_AGGREGATE_ECC}
    lines = [f'\t<gpu id="{bus}">',
             f"\t\t<product_name>{escape(sim.nvmlDeviceGetName(h))}</product_name>",
             "\t\t<product_architecture>Hopper</product_architecture>",
             f"\t\t<uuid>{sim.nvmlDeviceGetUUID(h)}</uuid>",
             f"\t\t<minor_number>{index}</minor_number>",
             f"\t\t<pci>\n\t\t\t<pci_bus_id>{bus}</pci_bus_id>\n\t\t</pci>",
             "\t\t<fb_memory_usage>",
             f"\t\t\t<total>{mem.total // mib} MiB</total>",
             f"\t\t\t<reserved>{mem.reserved // mib} MiB</reserved>",
             f"\t\t\t<used>{mem.used // mib} MiB</used>",
             f"\t\t\t<free>{mem.free // mib} MiB</free>",
             "\t\t</fb_memory_usage>",
             "\t\t<utilization>",
             f"\t\t\t<gpu_util>{util.gpu} %</gpu_util>",
             f"\t\t\t<memory_util>{util.memory} %</memory_util>",
             "\t\t</utilization>",
             "\t\t<ecc_errors>"]
    for scope, counter in scopes.items():
        # R550 splits SRAM uncorrectable errors by parity / SEC-DED; the simulation keeps all of
        # its counts in DRAM.
        lines += [f"\t\t\t<{scope}>",
                  "\t\t\t\t<sram_correctable>0</sram_correctable>",
                  "\t\t\t\t<sram_uncorrectable_parity>0</sram_uncorrectable_parity>",
                  "\t\t\t\t<sram_uncorrectable_secded>0</sram_uncorrectable_secded>",
                  f"\t\t\t\t<dram_correctable>{ecc(corrected, counter)}</dram_correctable>",
                  f"\t\t\t\t<dram_uncorrectable>{ecc(uncorrected, counter)}</dram_uncorrectable>",
                  f"\t\t\t</{scope}>"]
    lines += ["\t\t</ecc_errors>",
              "\t\t<temperature>",
              f"\t\t\t<gpu_temp>{_reading(lambda: sim.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU), '{} C')}</gpu_temp>",
              "\t\t\t<memory_temp>N/A</memory_temp>",
              "\t\t</temperature>",
              "\t\t<gpu_power_readings>",
              f"\t\t\t<power_draw>{_reading(lambda: sim.nvmlDeviceGetPowerUsage(h) / 1000, '{:.2f} W')}</power_draw>",
              f"\t\t\t<current_power_limit>{sim.nvmlDeviceGetEnforcedPowerLimit(h) / 1000:.2f} W</current_power_limit>",
              "\t\t</gpu_power_readings>",
              "\t\t<clocks>",
              f"\t\t\t<graphics_clock>{sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_GRAPHICS)} MHz</graphics_clock>",
              f"\t\t\t<sm_clock>{sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)} MHz</sm_clock>",
              f"\t\t\t<mem_clock>{sim.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)} MHz</mem_clock>",
              "\t\t</clocks>",
              "\t</gpu>"]
    return lines
