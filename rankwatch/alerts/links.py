"""Links in notifications (Grafana filtered to the node, W&B run, runbook), from str.format
templates in the [links] table."""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import quote

from rankwatch.errors import ConfigError
from rankwatch.events import Event

TEMPLATE_FIELDS = ("run", "rank", "node", "gpu", "nic", "kind", "episode", "alert", "from_ms", "to_ms")

# Detector event kind → the Prometheus-style alert name used by Alertmanager and the runbooks.
ALERT_NAMES = {
    "straggler": "RankwatchStraggler",
    "gpu_fault": "RankwatchGpuFault",
    "network": "RankwatchNetworkDegraded",
    "hang": "RankwatchHang",
    "throughput_drop": "RankwatchThroughputDrop",
    "data_gap": "RankwatchDataGap",
}


def alert_name(kind: str) -> str:
    return ALERT_NAMES.get(kind, "Rankwatch" + "".join(p.capitalize() for p in kind.split("_")))


def check_template(template: str, where: str) -> None:
    """Reject a template that names unknown fields or does not parse, at config time."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: bad template: {exc}") from None
    for _, name, _, _ in parsed:
        if name is not None and name not in TEMPLATE_FIELDS:
            raise ConfigError(f"{where}: unknown field {{{name}}}; known: {', '.join(TEMPLATE_FIELDS)}")


def render(template: str | None, event: Event, *, now: float | None = None, window_s: float = 3600.0) -> str | None:
    if not template:
        return None
    since = event.since if event.since is not None else event.time
    end = max(now if now is not None else event.time, event.time)
    values: dict[str, Any] = {
        "run": event.run or "", "rank": "" if event.rank is None else event.rank, "node": event.node or "",
        "gpu": event.gpu or "", "nic": event.nic or "", "kind": event.kind, "episode": event.episode,
        "alert": alert_name(event.kind),
        "from_ms": int((since - window_s) * 1000), "to_ms": int((end + 300) * 1000),
    }
    safe = {k: quote(str(v), safe="") for k, v in values.items()}
    return template.format(**safe)
