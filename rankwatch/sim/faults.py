"""The named hardware faults of a simulated node, as the demo's timeline and
`rankwatch node-exporter --simulate --inject KIND@SECONDS[:GPU|NIC]` name them, mapped onto the
simulated NVML's and the fake EFA tree's own faults.

    thermal   GPU thermally throttled (92 °C, SM clock 1095 MHz)
    xid79     GPU fell off the bus, with XID 79
    dbe       a double-bit ECC error (XID 48, a row remap pending)
    lost      GPU stops answering NVML, without an XID
    efa       EFA device retransmitting (3000 packets/s) with retransmit timeouts (4/s)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

GPU_FAULTS = ("thermal", "xid79", "dbe", "lost")
NIC_FAULTS = ("efa",)
NODE_FAULTS = GPU_FAULTS + NIC_FAULTS
EFA_RETRANSMIT_RATE = 3000.0
EFA_TIMEOUT_RATE = 4.0

_SPEC = re.compile(r"(?P<kind>[a-z0-9_]+)@(?P<at>[0-9]+(?:\.[0-9]*)?)(?::(?P<target>[0-9]+))?")


@dataclass(frozen=True)
class Injection:
    kind: str
    at_s: float  # seconds after the exporter started
    target: int = 0  # GPU index (GPU faults) or EFA device index (efa)

    @property
    def on_gpu(self) -> bool:
        return self.kind in GPU_FAULTS

    def describe(self) -> str:
        return f"{self.kind} on {'GPU' if self.on_gpu else 'EFA device'} {self.target}"


def parse_injection(text: str) -> Injection:
    """``KIND@SECONDS[:INDEX]``, e.g. ``thermal@30:3`` or ``efa@0``. Raises ValueError saying
    what is wrong."""
    m = _SPEC.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r}: expected KIND@SECONDS[:GPU|NIC], e.g. thermal@30:3 or efa@0:1 "
                         f"(kinds: {', '.join(NODE_FAULTS)})")
    kind = m["kind"]
    if kind not in NODE_FAULTS:
        raise ValueError(f"{text!r}: unknown fault kind {kind!r}; expected one of {', '.join(NODE_FAULTS)}")
    return Injection(kind, float(m["at"]), int(m["target"] or 0))


def inject(nvml: Any, efa: Any, kind: str, target: int | str) -> None:
    """Start fault ``kind`` on GPU ``target`` of ``nvml`` or EFA device ``target`` of ``efa``
    (a name or an index)."""
    if kind == "thermal":
        nvml.inject(target, "thermal")
    elif kind == "xid79":
        nvml.inject(target, "fell_off_bus")
    elif kind == "lost":
        nvml.inject(target, "fell_off_bus", xid=False)
    elif kind == "dbe":
        nvml.inject(target, "dbe")
    elif kind == "efa":
        efa.inject(target, "retransmits", rate=EFA_RETRANSMIT_RATE)
        efa.inject(target, "timeouts", rate=EFA_TIMEOUT_RATE)
    else:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(NODE_FAULTS)}")


def clear(nvml: Any, efa: Any, kind: str, target: int | str) -> None:
    """End fault ``kind`` (a dbe is an event: nothing to end; its counters keep what they counted)."""
    if kind == "thermal":
        nvml.clear(target, "thermal")
    elif kind in ("xid79", "lost"):
        nvml.clear(target, "fell_off_bus")
    elif kind == "efa":
        efa.clear(target)
