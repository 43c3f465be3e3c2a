"""The metric families of the GPU collector: dcgm-exporter 4.8.2 names, types and HELP.

HELP strings and types are those of dcgm-exporter's ``etc/default-counters.csv`` (the
commented-out failure rows included, since rankwatch turns them on); tests compare this
table with a committed copy of that file. Units follow DCGM, not Prometheus base units.
"""

from __future__ import annotations

from dataclasses import dataclass

# Label names of every per-GPU series, in dcgm-exporter's order (render_metrics.go). Extra
# labels (hpc_job, xid, err_code, …) follow, sorted by name as dcgm-exporter sorts them.
GPU_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # "gauge" | "counter"
    help: str
    default: bool  # an uncommented row of default-counters.csv


def _f(name: str, type_: str, help_: str, default: bool = True) -> Field:
    return Field(name, type_, help_, default)


# Order follows default-counters.csv; the failure fields that dcgm-exporter ships commented
# out come after, marked default=False.
FIELDS: tuple[Field, ...] = (
    _f("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    _f("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz)."),
    _f("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C)."),
    _f("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    _f("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    _f("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ)."),
    _f("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries."),
    _f("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    _f("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %)."),
    _f("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %)."),
    _f("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %)."),
    _f("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
    _f("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    _f("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    _f("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB)."),
    _f(
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes.",
    ),
    _f("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge", "vGPU License status"),
    _f(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
    ),
    _f("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter", "Number of remapped rows for correctable errors"),
    _f("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed"),
    _f("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active."),
    _f("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge", "Ratio of cycles the tensor (HMMA) pipe is active."),
    _f(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
    ),
    _f(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data "
        "payloads - in bytes per second.",
    ),
    _f(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data "
        "payloads - in bytes per second.",
    ),
    # Failing-GPU fields: commented out upstream, on by default here.
    _f(
        "DCGM_FI_DEV_POWER_VIOLATION",
        "counter",
        "Throttling duration due to power constraints (in ns).",
        False,
    ),
    _f(
        "DCGM_FI_DEV_THERMAL_VIOLATION",
        "counter",
        "Throttling duration due to thermal constraints (in ns).",
        False,
    ),
    _f("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter", "Total number of single-bit volatile ECC errors.", False),
    _f("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter", "Total number of double-bit volatile ECC errors.", False),
    _f(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "counter", "Total number of single-bit persistent ECC errors.", False
    ),
    _f(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "counter", "Total number of double-bit persistent ECC errors.", False
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_SBE",
        "counter",
        "Total number of retired pages due to single-bit errors.",
        False,
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_DBE",
        "counter",
        "Total number of retired pages due to double-bit errors.",
        False,
    ),
    _f("DCGM_FI_DEV_RETIRED_PENDING", "counter", "Total number of pages pending retirement.", False),
    _f(
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink flow-control CRC errors.",
        False,
    ),
    _f(
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink data CRC errors.",
        False,
    ),
    _f("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter", "Total number of NVLink retries.", False),
    _f(
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        "counter",
        "Total number of NVLink recovery errors.",
        False,
    ),
    # Not rows of the CSV at all; HELP written here after DCGM's field descriptions.
    _f("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", "Whether remapping of rows is pending", False),
    _f(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "gauge",
        "Current clock event reasons (bitmask of DCGM_CLOCKS_EVENT_REASON_*).",
        False,
    ),
)

FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}

# Exporter-owned families (dcgm-exporter's names; ours are cumulative, see README).
XID_COUNT = Field(
    "DCGM_EXP_XID_ERRORS_COUNT", "counter", "Count of XID errors seen since the exporter started.", False
)
CLOCK_EVENTS_COUNT = Field(
    "DCGM_EXP_CLOCK_EVENTS_COUNT",
    "counter",
    "Count of clock event reasons that became active, as observed at scrapes since the exporter started.",
    False,
)
HEALTH_STATUS = Field(
    "DCGM_EXP_GPU_HEALTH_STATUS",
    "gauge",
    "GPU health per watch: 0 pass, 10 warn, 20 fail, from XIDs, ECC, row remapping, clocks and GPU loss.",
    False,
)

# Bits of nvmlDeviceGetCurrentClocksEventReasons → clock_event label values, as
# dcgm-exporter's clock_events_collector.go names them.
CLOCK_EVENT_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "clocks_setting"),
    (0x4, "power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal"),
    (0x40, "hw_thermal"),
    (0x80, "hw_power_brake"),
    (0x100, "display_clocks"),
)
