"""Prometheus text exposition (format 0.0.4) that keeps upstream names and label order.

``prometheus_client.generate_latest`` cannot serve a dcgm-exporter drop-in: it writes the
``# HELP``/``# TYPE`` lines of every counter as ``<name>_total`` (dcgm-exporter's counters,
e.g. ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION``, have no suffix, so Prometheus would see a
TYPE line for a family that has no samples) and it sorts labels alphabetically, where
dcgm-exporter writes ``gpu, UUID, pci_bus_id, device, modelName, Hostname, …``. This
renderer writes each family's header under the name its samples carry and the labels in the
order the collector inserted them. Its output parses with
``prometheus_client.parser.text_string_to_metric_families`` and Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TYPE_WORD = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _header_name(family: Metric) -> str:
    # A counter's header goes under the name its samples use: `<name>_total` for our own
    # counters, the bare upstream name for dcgm-exporter's.
    if family.type == "counter" and family.samples and family.samples[0].name == family.name + "_total":
        return family.name + "_total"
    if family.type == "info":
        return family.name + "_info"
    return family.name


# Label sets repeat from scrape to scrape (the same GPUs, devices and ports), so their
# rendered text is kept; bounded so that churning label values cannot grow it forever.
_LABEL_CACHE: dict[tuple[tuple[str, str], ...], str] = {}
_LABEL_CACHE_MAX = 50_000


def _labels_text(labels: dict[str, str]) -> str:
    key = tuple(labels.items())
    text = _LABEL_CACHE.get(key)
    if text is None:
        if len(_LABEL_CACHE) >= _LABEL_CACHE_MAX:
            _LABEL_CACHE.clear()
        text = ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in key)
        _LABEL_CACHE[key] = text
    return text


def render(families: Iterable[Metric]) -> bytes:
    """Render metric families as Prometheus text format 0.0.4."""
    out: list[str] = []
    for family in families:
        name = _header_name(family)
        out.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
        out.append(f"# TYPE {name} {_TYPE_WORD.get(family.type, 'untyped')}\n")
        for sample in family.samples:
            if sample.labels:
                line = f"{sample.name}{{{_labels_text(sample.labels)}}} {floatToGoString(sample.value)}"
            else:
                line = f"{sample.name} {floatToGoString(sample.value)}"
            if sample.timestamp is not None:
                line += f" {int(float(sample.timestamp) * 1000):d}"
            out.append(line + "\n")
    return "".join(out).encode("utf-8")
