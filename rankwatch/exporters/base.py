"""The small interface every node-exporter collector implements.

A collector builds fresh metric families on every call to ``collect`` (no background
polling, no state shared between scrapes except what the collector owns, such as the XID
listener's counters). ``name`` is the label value the node daemon uses for its
per-collector self-metrics (scrape duration and success).

Serve the families with ``rankwatch.exporters.exposition.render``, not
``prometheus_client.generate_latest``: the latter renames the HELP/TYPE lines of counters to
``<name>_total`` (dcgm-exporter's counters have no suffix) and sorts labels, where
dcgm-exporter's order is ``gpu, UUID, pci_bus_id, device, modelName, Hostname, …``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from prometheus_client.metrics_core import Metric


@runtime_checkable
class Collector(Protocol):
    """What the node daemon needs from a collector."""

    name: str

    def collect(self) -> Iterable[Metric]:
        """Return the metric families of one scrape, built afresh for this call."""
        ...

    def close(self) -> None:
        """Release resources (threads, library handles). Safe to call more than once."""
        ...
