"""The comparisons gpu-check makes, as pure functions over parsed readings.

A reading is ``{gpu index: {family: value}}`` from one scrape of the GPU collector, and
``nvidia-smi``'s values from :mod:`rankwatch.gpucheck.smi`. Tolerances are for two readings
taken a moment apart of quantities that move (power, clocks), and exact for counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from rankwatch.exporters import dcgm_fields as F
from rankwatch.gpucheck.smi import SmiGpu

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"

Reading = dict[int, dict[str, float]]

# DCGM_FI_PROF_* ratios (0–1) and the byte counters beside them.
GPM_RATIOS = ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE")
GPM_BYTES = ("DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES")


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip | info
    detail: str
    gpu: int | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def default_families() -> list[str]:
    """The families dcgm-exporter's default-counters.csv turns on (its uncommented rows)."""
    return [f.name for f in F.FIELDS if f.default]


@dataclass
class Scrape:
    reading: Reading  # DCGM families per GPU (families with extra labels summed per GPU)
    errors: dict[tuple[str, str, str], float]  # rankwatch_gpu_nvml_errors_total by (gpu, call, error)
    pci_bus_ids: dict[int, str]


def parse_scrape(text: str) -> Scrape:
    """One scrape of the GPU collector, in Prometheus text format."""
    out = Scrape({}, {}, {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rankwatch_gpu_nvml_errors_total":
                out.errors[(s.labels.get("gpu", ""), s.labels.get("call", ""), s.labels.get("error", ""))] = s.value
            elif s.name.startswith("DCGM_") and "gpu" in s.labels:
                # The parser gives counters a _total suffix that dcgm-exporter's names lack.
                name = family.name if family.type == "counter" else s.name
                gpu = int(s.labels["gpu"])
                per_gpu = out.reading.setdefault(gpu, {})
                per_gpu[name] = per_gpu.get(name, 0.0) + s.value
                if "pci_bus_id" in s.labels:
                    out.pci_bus_ids.setdefault(gpu, s.labels["pci_bus_id"])
    return out


def families_present(reading: Reading, gpus: Iterable[int], expected: Iterable[str],
                     unsupported: Mapping[int, Iterable[str]] | None = None,
                     gpm_off: Iterable[int] = ()) -> list[Check]:
    """Every default family on every GPU. Where GPM profiling is off (pre-Hopper, or no
    permission), the DCGM_FI_PROF_* families are left to the GPM check, which names the reason."""
    expected = list(expected)
    gpm_off = set(gpm_off)
    out = []
    for gpu in gpus:
        have = reading.get(gpu, {})
        missing = [name for name in expected if name not in have
                   and not (gpu in gpm_off and name.startswith("DCGM_FI_PROF_"))]
        if not missing:
            out.append(Check("families", PASS, f"all {len(expected)} default families present", gpu))
            continue
        calls = sorted((unsupported or {}).get(gpu, ()))
        why = f"; NVML calls answering NOT_SUPPORTED: {', '.join(calls)}" if calls else ""
        out.append(Check("families", FAIL, f"missing {len(missing)} of {len(expected)}: "
                         f"{', '.join(missing)}{why}", gpu))
    return out


def nvml_errors(errors: Mapping[tuple[str, str, str], float], scrapes: int) -> Check:
    """NVML errors at or near zero: a transient error or two pass; a call that fails again fails."""
    total = sum(errors.values())
    listing = ", ".join(f"GPU {g} {call} {err}×{n:.0f}" for (g, call, err), n in sorted(errors.items()))
    if total == 0:
        return Check("nvml errors", PASS, f"0 failed NVML calls in {scrapes} scrapes")
    status = PASS if total <= 2 and max(errors.values()) <= 1 else FAIL
    return Check("nvml errors", status, f"{total:.0f} failed NVML calls in {scrapes} scrapes: {listing}")


# family, nvidia-smi key, absolute tolerance, relative tolerance
_AGREE = (
    ("DCGM_FI_DEV_GPU_TEMP", "gpu_temp_c", 3.0, 0.0),
    ("DCGM_FI_DEV_MEMORY_TEMP", "memory_temp_c", 3.0, 0.0),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w", 20.0, 0.15),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz", 100.0, 0.10),
    ("DCGM_FI_DEV_MEM_CLOCK", "mem_clock_mhz", 50.0, 0.05),
    ("DCGM_FI_DEV_FB_USED", "fb_used_mib", 64.0, 0.02),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_sbe_volatile", 0.0, 0.0),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_dbe_volatile", 0.0, 0.0),
    ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "ecc_sbe_aggregate", 0.0, 0.0),
    ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "ecc_dbe_aggregate", 0.0, 0.0),
)


def agrees_with_smi(gpu: int, ours: Mapping[str, float], smi: SmiGpu) -> list[Check]:
    """Each value the collector exports against nvidia-smi's reading of the same GPU."""
    out = []
    for family, key, abs_tol, rel_tol in _AGREE:
        if key not in smi.values:
            out.append(Check(f"= nvidia-smi: {family}", SKIP, f"nvidia-smi prints no {key} (N/A)", gpu))
            continue
        if family not in ours:
            out.append(Check(f"= nvidia-smi: {family}", FAIL, f"not exported; nvidia-smi says {smi.values[key]:g}", gpu))
            continue
        a, b = ours[family], smi.values[key]
        tol = max(abs_tol, rel_tol * abs(b))
        ok = abs(a - b) <= tol
        out.append(Check(f"= nvidia-smi: {family}", PASS if ok else FAIL,
                         f"rankwatch {a:g}, nvidia-smi {b:g} (tolerance ±{tol:g})", gpu))
    # Framebuffer total: DCGM exports free/used/reserved; their sum is nvidia-smi's total.
    parts = [ours.get(f"DCGM_FI_DEV_FB_{p}") for p in ("FREE", "USED", "RESERVED")]
    if "fb_total_mib" in smi.values and all(p is not None for p in parts):
        total = sum(p for p in parts if p is not None)
        ok = abs(total - smi.values["fb_total_mib"]) <= 16
        out.append(Check("= nvidia-smi: framebuffer total", PASS if ok else FAIL,
                         f"free+used+reserved {total:g} MiB, nvidia-smi total {smi.values['fb_total_mib']:g} MiB", gpu))
    return out


def gpm_in_range(reading: Reading, gpus: Iterable[int], unsupported_reason: Mapping[int, str]) -> list[Check]:
    out = []
    for gpu in gpus:
        have = reading.get(gpu, {})
        present = [n for n in GPM_RATIOS if n in have]
        if not present:
            reason = unsupported_reason.get(gpu) or "no DCGM_FI_PROF_* series and no reason given"
            status = SKIP if gpu in unsupported_reason else FAIL
            out.append(Check("GPM ratios in [0, 1]", status, f"unsupported: {reason}", gpu))
            continue
        bad = [f"{n}={have[n]:g}" for n in present if not (0.0 <= have[n] <= 1.0) or math.isnan(have[n])]
        bad += [f"{n}={have[n]:g}" for n in GPM_BYTES if n in have and not have[n] >= 0]
        out.append(Check("GPM ratios in [0, 1]", FAIL if bad else PASS,
                         ("out of range: " + ", ".join(bad)) if bad else
                         ", ".join(f"{n.removeprefix('DCGM_FI_PROF_')}={have[n]:.3f}" for n in present), gpu))
    return out


def energy_advances(first: Reading, second: Reading, gpus: Iterable[int]) -> list[Check]:
    name = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    out = []
    for gpu in gpus:
        a, b = first.get(gpu, {}).get(name), second.get(gpu, {}).get(name)
        if a is None or b is None:
            out.append(Check("energy advances", FAIL, f"{name} not exported", gpu))
        else:
            out.append(Check("energy advances", PASS if b > a else FAIL, f"{a:.0f} → {b:.0f} mJ", gpu))
    return out


def xid_registered(registered: Iterable[int], gpus: Iterable[int], error: str | None = None) -> Check:
    want, got = sorted(gpus), sorted(registered)
    if error:
        return Check("XID event registration", FAIL, error)
    missing = sorted(set(want) - set(got))
    if missing:
        return Check("XID event registration", FAIL, f"not registered on GPUs {missing} (registered: {got})")
    return Check("XID event registration", PASS, f"registered on all {len(want)} GPUs")


def load_rises(idle: Reading, loaded: Reading, gpus: Iterable[int]) -> list[Check]:
    """Under a matmul load utilisation, tensor activity and power must rise on the loaded GPUs."""
    rules = (("DCGM_FI_DEV_GPU_UTIL", 30.0), ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 0.05),
             ("DCGM_FI_DEV_POWER_USAGE", 30.0))
    out = []
    for gpu in gpus:
        for family, rise in rules:
            a, b = idle.get(gpu, {}).get(family), loaded.get(gpu, {}).get(family)
            if a is None or b is None:
                status = SKIP if family.startswith("DCGM_FI_PROF_") else FAIL
                out.append(Check(f"load raises {family}", status, "not exported", gpu))
                continue
            out.append(Check(f"load raises {family}", PASS if b >= a + rise else FAIL,
                             f"idle {a:g} → loaded {b:g} (needs +{rise:g})", gpu))
    return out


def scrape_vs_smi(scrape_s: float, smi_s: float) -> Check:
    return Check("scrape time vs nvidia-smi -q", INFO,
                 f"collector scrape {scrape_s * 1e3:.1f} ms, nvidia-smi -q {smi_s * 1e3:.1f} ms "
                 f"({scrape_s / smi_s:.2f}×)" if smi_s > 0 else f"collector scrape {scrape_s * 1e3:.1f} ms")


def verdict(checks: Iterable[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)
