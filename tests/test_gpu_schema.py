"""The GPU collector's output against dcgm-exporter 4.8.2: names, types, HELP, labels, units."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rankwatch.exporters import dcgm_fields
from rankwatch.exporters.exposition import render
from rankwatch.exporters.gpu import GpuCollector
from rankwatch.sim.nvml import ManualClock, SimulatedNVML

CSV = Path(__file__).parent / "fixtures" / "gpu" / "default-counters.csv"
DCGM_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"]


def parse_csv(path: Path) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(enabled rows, commented-out rows) of a dcgm-exporter counters file: name → (type, help)."""
    enabled: dict[str, tuple[str, str]] = {}
    commented: dict[str, tuple[str, str]] = {}
    for line in path.read_text().splitlines():
        target = enabled
        text = line.strip()
        if text.startswith("#"):
            target, text = commented, text.lstrip("#").strip()
        parts = [p.strip() for p in text.split(",", 2)]
        if len(parts) == 3 and re.fullmatch(r"DCGM_[A-Z0-9_]+", parts[0]):
            target[parts[0]] = (parts[1], parts[2])
    return enabled, commented


def scrape_text(collector: GpuCollector) -> str:
    return render(collector.collect()).decode()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
def node():
    clock = ManualClock()
    sim = SimulatedNVML("node-a", seed=3, clock=clock)
    collector = GpuCollector(nvml=sim, hostname="node-a", xid_wait_ms=50)
    yield sim, clock, collector
    collector.close()


def test_field_table_matches_default_counters_csv() -> None:
    enabled, commented = parse_csv(CSV)
    assert len(enabled) == 26  # 25 metrics + the DCGM_FI_DRIVER_VERSION label row
    assert enabled.pop("DCGM_FI_DRIVER_VERSION")[0] == "label"
    for name, (ptype, help_) in enabled.items():
        field = dcgm_fields.FIELD_BY_NAME[name]
        assert (field.type, field.help, field.default) == (ptype, help_, True), name
    # The failure rows dcgm-exporter ships commented out keep their upstream type and HELP here.
    for field in dcgm_fields.FIELDS:
        if field.default:
            continue
        if field.name in commented:
            assert (field.type, field.help) == commented[field.name], field.name
        else:
            # Not rows of the CSV at all: remap pending and the clock event reasons bitmask.
            assert field.name in {"DCGM_FI_DEV_ROW_REMAP_PENDING", "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"}


def test_every_default_counter_is_served_with_its_type_help_and_labels(node) -> None:
    sim, clock, collector = node
    collector.collect()
    clock.advance(15)
    text = scrape_text(collector)
    fams = families(text)
    enabled, _ = parse_csv(CSV)
    enabled.pop("DCGM_FI_DRIVER_VERSION")
    for name, (ptype, help_) in enabled.items():
        fam = fams[name]
        assert (fam.type, fam.documentation) == (ptype, help_), name
        assert sorted(int(s.labels["gpu"]) for s in fam.samples) == list(range(8)), name
        # the exposition itself: HELP/TYPE under the upstream name, no "_total" added
        assert f"# TYPE {name} {ptype}\n" in text
        assert re.search(rf"^{name}{{gpu=", text, re.M), name
    for name in (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        "DCGM_FI_DEV_POWER_VIOLATION",
        "DCGM_FI_DEV_THERMAL_VIOLATION",
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
    ):
        assert len(fams[name].samples) == 8, name
    # H100 has no page retirement (row remapping instead): NVML says NOT_SUPPORTED, series absent.
    assert "DCGM_FI_DEV_RETIRED_DBE" not in fams
    assert fams["DCGM_EXP_GPU_HEALTH_STATUS"].type == "gauge"
    assert fams["DCGM_EXP_XID_ERRORS_COUNT"].type == "counter"


def test_labels_come_in_dcgm_exporter_order(node) -> None:
    sim, _clock, collector = node
    text = scrape_text(collector)
    line = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_GPU_TEMP{"))
    keys = re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', line)
    assert keys == DCGM_LABELS
    labels = families(text)["DCGM_FI_DEV_GPU_TEMP"].samples[0].labels
    handle = sim.nvmlDeviceGetHandleByIndex(int(labels["gpu"]))
    assert labels["UUID"] == sim.nvmlDeviceGetUUID(handle)
    assert labels["pci_bus_id"] == "00000000:53:00.0"
    assert labels["device"] == "nvidia0"
    assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert labels["Hostname"] == "node-a"
    assert labels["DCGM_FI_DRIVER_VERSION"] == sim.nvmlSystemGetDriverVersion()
    # Extra labels follow, sorted by name, as dcgm-exporter writes them.
    xid_line = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_XID_ERRORS{"))
    assert re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', xid_line) == [*DCGM_LABELS, "err_code", "err_msg"]
    assert xid_line.endswith('err_code="0",err_msg="No Error"} 0.0')


def test_values_are_in_dcgm_units(node) -> None:
    sim, clock, collector = node
    collector.collect()
    first = families(scrape_text(collector))
    clock.advance(10)
    fams = families(scrape_text(collector))

    def v(name: str, gpu: int = 0, fams=fams) -> float:
        return next(s.value for s in fams[name].samples if s.labels["gpu"] == str(gpu))

    handle = sim.nvmlDeviceGetHandleByIndex(0)
    assert v("DCGM_FI_DEV_SM_CLOCK") == sim.nvmlDeviceGetClockInfo(handle, sim.NVML_CLOCK_SM) == 1980
    assert v("DCGM_FI_DEV_MEM_CLOCK") == 2619
    assert 40 <= v("DCGM_FI_DEV_GPU_TEMP") <= 85
    assert 300 <= v("DCGM_FI_DEV_POWER_USAGE") <= 700  # W, not mW
    assert 90 <= v("DCGM_FI_DEV_GPU_UTIL") <= 100  # %
    # MiB from the v2 memory info: free + used + reserved is the whole 80 GB framebuffer.
    fb = v("DCGM_FI_DEV_FB_FREE") + v("DCGM_FI_DEV_FB_USED") + v("DCGM_FI_DEV_FB_RESERVED")
    assert fb == 81559 and v("DCGM_FI_DEV_FB_RESERVED") > 0
    # Energy is an mJ counter: 10 s at ~600 W add ~6e6 mJ.
    energy_gain = v("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") - v(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", fams=first
    )
    assert 3e6 <= energy_gain <= 7e6
    # NVLink "bandwidth total" is DCGM's rate: (Δ KiB tx+rx / Δ s) / 1000.
    assert v("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL") == pytest.approx(2 * 1.6e8 / 1000, rel=0.02)
    for ratio in (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
    ):
        assert 0.3 <= v(ratio) <= 1.0, ratio
    assert v("DCGM_FI_PROF_PCIE_TX_BYTES") > 500 * 1024 * 1024  # bytes per second, from MiB/s
    assert v("DCGM_FI_DEV_VGPU_LICENSE_STATUS") == 0  # bare metal: no vGPU licensing
    assert v("DCGM_FI_DEV_CLOCKS_EVENT_REASONS") == 0


def test_idle_gpu_reports_idle_clocks_and_reason(node) -> None:
    sim, clock, collector = node
    sim.set_activity(2, 0.0)
    clock.advance(5)
    fams = families(scrape_text(collector))
    gpu2 = {
        n: next(s.value for s in fams[n].samples if s.labels["gpu"] == "2")
        for n in fams
        if n.startswith("DCGM_FI")
    }
    assert gpu2["DCGM_FI_DEV_GPU_UTIL"] == 0
    assert gpu2["DCGM_FI_DEV_SM_CLOCK"] == 345
    assert gpu2["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] == 0x1  # gpu_idle
    assert gpu2["DCGM_FI_DEV_FB_USED"] == 0


def test_profiling_fields_are_omitted_without_gpm() -> None:
    sim = SimulatedNVML("pre-hopper", seed=1, gpm_supported=False)
    collector = GpuCollector(nvml=sim, listen_xid_events=False)
    try:
        fams = families(scrape_text(collector))
    finally:
        collector.close()
    assert not [n for n in fams if n.startswith("DCGM_FI_PROF_")]
    assert len(fams["DCGM_FI_DEV_GPU_UTIL"].samples) == 8
    assert "rankwatch_gpu_nvml_errors" not in fams  # unsupported is not an error


def test_old_driver_without_gpm_functions_is_not_an_error() -> None:
    class OldDriver(SimulatedNVML):
        def nvmlGpmQueryDeviceSupport(self, device):  # noqa: N802 - pynvml's name
            raise self.NVMLError_FunctionNotFound()

    collector = GpuCollector(nvml=OldDriver("old", seed=1), listen_xid_events=False)
    try:
        fams = families(scrape_text(collector))
    finally:
        collector.close()
    assert not [n for n in fams if n.startswith("DCGM_FI_PROF_")]
    assert fams["rankwatch_gpu_answering"].samples[0].value == 8


def test_page_retirement_fields_where_the_gpu_has_them() -> None:
    sim = SimulatedNVML("volta-like", seed=1, page_retirement_supported=True)
    collector = GpuCollector(nvml=sim, listen_xid_events=False)
    try:
        sim.inject(5, "dbe", count=2)
        fams = families(scrape_text(collector))
    finally:
        collector.close()
    by_gpu = {s.labels["gpu"]: s.value for s in fams["DCGM_FI_DEV_RETIRED_DBE"].samples}
    assert by_gpu["5"] == 2 and by_gpu["4"] == 0
    assert {s.labels["gpu"]: s.value for s in fams["DCGM_FI_DEV_RETIRED_PENDING"].samples}["5"] == 1
    assert len(fams["DCGM_FI_DEV_RETIRED_SBE"].samples) == 8
