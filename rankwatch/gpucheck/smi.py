"""Read ``nvidia-smi -q -x``: the values gpu-check compares with the GPU collector's.

The XML's layout has moved between drivers (``power_readings`` became ``gpu_power_readings``
with ``instant_power_draw`` / ``average_power_draw`` in R535; SRAM ECC counts split into parity
and SEC-DED in R550), so every value is looked up under each of the names drivers have used,
and a value a driver prints as ``N/A`` or ``[N/A]`` is absent rather than zero.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from rankwatch.errors import InputError

_NUMBER = re.compile(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)")


@dataclass
class SmiGpu:
    pci_bus_id: str
    uuid: str
    name: str
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class SmiReport:
    driver_version: str
    gpus: list[SmiGpu]


def _number(el: ET.Element | None) -> float | None:
    if el is None or el.text is None:
        return None
    m = _NUMBER.match(el.text)
    return float(m.group(1)) if m else None


def _first(gpu: ET.Element, *paths: str) -> float | None:
    for path in paths:
        value = _number(gpu.find(path))
        if value is not None:
            return value
    return None


def _ecc_sum(gpu: ET.Element, scope: str, names: tuple[str, ...]) -> float | None:
    found = [_number(gpu.find(f"ecc_errors/{scope}/{n}")) for n in names]
    known = [v for v in found if v is not None]
    return sum(known) if known else None


_CORRECTABLE = ("sram_correctable", "dram_correctable", "single_bit/total")
_UNCORRECTABLE = ("sram_uncorrectable", "sram_uncorrectable_parity", "sram_uncorrectable_secded",
                  "dram_uncorrectable", "double_bit/total")


def parse_smi_xml(text: str, source: str = "nvidia-smi -q -x") -> SmiReport:
    """Parse the XML; a document that is not nvidia-smi's is an InputError naming ``source``."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{source}: not XML ({exc})") from None
    if root.tag != "nvidia_smi_log":
        raise InputError(f"{source}: root element is <{root.tag}>, expected <nvidia_smi_log>")
    gpus = []
    for el in root.findall("gpu"):
        bus = (el.findtext("pci/pci_bus_id") or el.get("id") or "").strip()
        values = {
            "gpu_temp_c": _first(el, "temperature/gpu_temp"),
            "memory_temp_c": _first(el, "temperature/memory_temp"),
            "power_w": _first(el, "gpu_power_readings/instant_power_draw", "gpu_power_readings/power_draw",
                              "gpu_power_readings/average_power_draw", "power_readings/power_draw"),
            "sm_clock_mhz": _first(el, "clocks/sm_clock"),
            "mem_clock_mhz": _first(el, "clocks/mem_clock"),
            "fb_total_mib": _first(el, "fb_memory_usage/total"),
            "fb_used_mib": _first(el, "fb_memory_usage/used"),
            "fb_reserved_mib": _first(el, "fb_memory_usage/reserved"),
            "gpu_util_pct": _first(el, "utilization/gpu_util"),
            "ecc_sbe_volatile": _ecc_sum(el, "volatile", _CORRECTABLE),
            "ecc_dbe_volatile": _ecc_sum(el, "volatile", _UNCORRECTABLE),
            "ecc_sbe_aggregate": _ecc_sum(el, "aggregate", _CORRECTABLE),
            "ecc_dbe_aggregate": _ecc_sum(el, "aggregate", _UNCORRECTABLE),
        }
        gpus.append(SmiGpu(pci_bus_id=bus, uuid=(el.findtext("uuid") or "").strip(),
                           name=(el.findtext("product_name") or "").strip(),
                           values={k: v for k, v in values.items() if v is not None}))
    return SmiReport(driver_version=(root.findtext("driver_version") or "").strip(), gpus=gpus)
