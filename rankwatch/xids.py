"""What each XID means for a GPU: the one table behind the exporter's health status
(``DCGM_EXP_GPU_HEALTH_STATUS``), the detector's ``gpu_fault`` severity and the Prometheus XID
alerts (``rankwatch.rulegen`` writes their code lists from it; tests check all three agree).

Classes: ``FAIL`` (the GPU needs a reset or replacement: critical everywhere), ``WARN``
(worth a look: a warning), ``PASS`` (caused by the application, not the GPU: no alert). A code
not in the table is a warning, as nobody has vetted it. Texts follow NVIDIA's XID catalogue
(dcgm-exporter uses the same wording for 48, 79, 94, 95 and 119)."""

from __future__ import annotations

from dataclasses import dataclass

PASS, WARN, FAIL = 0, 10, 20


@dataclass(frozen=True)
class XidClass:
    text: str
    watch: str  # dcgm-exporter health_watch: MEM, NVLINK, PCIE, ALL, …
    status: int  # PASS, WARN or FAIL
    code: str  # DCGM_FR_* health_error_code


XIDS: dict[int, XidClass] = {
    13: XidClass("Graphics Engine Exception", "SM", PASS, "DCGM_FR_OK"),
    31: XidClass("GPU memory page fault", "SM", PASS, "DCGM_FR_OK"),
    43: XidClass("GPU stopped processing", "SM", PASS, "DCGM_FR_OK"),
    45: XidClass("Preemptive cleanup, due to previous errors", "SM", PASS, "DCGM_FR_OK"),
    48: XidClass("Double Bit ECC Error", "MEM", FAIL, "DCGM_FR_VOLATILE_DBE_DETECTED"),
    61: XidClass("Internal micro-controller breakpoint/warning", "PMU", WARN, "DCGM_FR_XID_ERROR"),
    62: XidClass("Internal micro-controller halt", "PMU", FAIL, "DCGM_FR_XID_ERROR"),
    63: XidClass("ECC page retirement or row remapping recording event", "MEM", WARN, "DCGM_FR_PENDING_ROW_REMAP"),
    64: XidClass("ECC page retirement or row remapper recording failure", "MEM", FAIL, "DCGM_FR_ROW_REMAP_FAILURE"),
    69: XidClass("Graphics Engine class error", "SM", PASS, "DCGM_FR_OK"),
    74: XidClass("NVLINK Error", "NVLINK", FAIL, "DCGM_FR_NVLINK_ERROR_CRITICAL"),
    79: XidClass("GPU has fallen off the bus", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    92: XidClass("High single-bit ECC error rate", "MEM", WARN, "DCGM_FR_VOLATILE_SBE_DETECTED"),
    94: XidClass("Contained ECC error", "MEM", WARN, "DCGM_FR_XID_ERROR"),
    95: XidClass("Uncontained ECC error", "ALL", FAIL, "DCGM_FR_UNCONTAINED_ERROR"),
    119: XidClass("GSP RPC Timeout", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    120: XidClass("GSP Error", "ALL", FAIL, "DCGM_FR_XID_ERROR"),
    140: XidClass("Unrecovered ECC Error", "MEM", FAIL, "DCGM_FR_VOLATILE_DBE_DETECTED"),
    154: XidClass("GPU Recovery Action Changed", "ALL", WARN, "DCGM_FR_XID_ERROR"),
}
NO_ERROR = XidClass("No Error", "ALL", PASS, "DCGM_FR_OK")
UNKNOWN = XidClass("Unknown Error", "ALL", WARN, "DCGM_FR_XID_ERROR")


def classify(xid: int) -> XidClass:
    """Health meaning of an XID; an unknown code is a warning."""
    if xid == 0:
        return NO_ERROR
    return XIDS.get(xid, UNKNOWN)


def codes(status: int) -> tuple[int, ...]:
    """The table's XIDs of one class, ascending."""
    return tuple(sorted(x for x, c in XIDS.items() if c.status == status))


def severity(xid: int, critical: tuple[int, ...] | frozenset[int] | None = None) -> str | None:
    """The alert severity of an XID: "critical", "warning", or None for an application XID.
    ``critical`` overrides which codes are critical (the detector's ``critical_xids``)."""
    crit = codes(FAIL) if critical is None else critical
    if xid in crit:
        return "critical"
    return None if classify(xid).status == PASS else "warning"
