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

import logging
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

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


def label_text(value: str) -> str:
    """``value`` as text that can be a label value: undecodable bytes (os.listdir() and
    os.environ hand them over as lone surrogates) become U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (made in Python, not read)
        return value.encode("utf-8", "replace").decode("utf-8")


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


# Go's spelling of the values that repr() writes without a dot.
_SPECIAL = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


_EXACT = 2**53  # ints below it are exact floats, and str() spells their digits as repr() would


def _value_text(value: float) -> str:
    # prometheus_client's floatToGoString, inlined: most of a scrape's samples go through
    # here, and its three comparisons before repr() cost more than repr() itself.
    if type(value) is int and 0 <= value < _EXACT:
        # Counters read from sysfs: the same text without float() and repr()'s shortest-digits
        # search, a third of this function's cost on an EFA scrape.
        s = str(value)
        if len(s) <= 6:
            return s + ".0"
        return f"{(s[0] + '.' + s[1:]).rstrip('0.')}e+{len(s) - 1:02d}"
    d = float(value)
    s = repr(d)
    dot = s.find(".")
    if dot > 6 and d > 0:
        # Go switches to exponents sooner than Python.
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    if dot < 0:
        return _SPECIAL.get(s, s)
    return s


class Renderer:
    """Renders families, keeping the text of each label set between scrapes.

    Label sets repeat from scrape to scrape (the same GPUs, devices and ports), so their
    rendered text is kept, per renderer: one per exporter, so that many exporters in one
    process (the demo runs 16 simulated nodes per worker) do not evict each other. Bounded,
    so that churning label values cannot grow it forever.
    """

    def __init__(self, max_label_sets: int = 50_000) -> None:
        self._labels: dict[tuple[tuple[str, str], ...], str] = {}
        self._max = max_label_sets
        self._warned = False

    def _labels_text(self, labels: dict[str, str]) -> str:
        key = tuple(labels.items())
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) >= self._max:
                self._labels.clear()
            text = ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in key)
            self._labels[key] = text
        return text

    def render(self, families: Iterable[Metric]) -> bytes:
        """Render metric families as Prometheus text format 0.0.4."""
        out: list[str] = []
        append = out.append
        labels_text = self._labels_text
        # Collectors share one label dict between the samples of a device or GPU (an EFA port
        # has 22 counters): within one render, the dict's id finds its text without building
        # and hashing a tuple again. Safe because every sample, so every dict, stays alive
        # until the render ends.
        by_id: dict[int, str] = {}
        families = list(families)
        for family in families:
            name = _header_name(family)
            append(f"# HELP {name} {_escape_help(family.documentation)}\n"
                   f"# TYPE {name} {_TYPE_WORD.get(family.type, 'untyped')}\n")
            for sample in family.samples:
                value = _value_text(sample.value)
                if sample.timestamp is not None:
                    value = f"{value} {int(float(sample.timestamp) * 1000):d}"
                labels = sample.labels
                if labels:
                    text = by_id.get(id(labels))
                    if text is None:
                        text = by_id[id(labels)] = labels_text(labels)
                    append(f"{sample.name}{{{text}}} {value}\n")
                else:
                    append(f"{sample.name} {value}\n")
        text = "".join(out)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # A string that is not text (a file name os.listdir() decoded with surrogates)
            # reached a label or HELP: collectors check their names, so this is a bug, and it
            # must cost that one character, not every series of the scrape.
            if not self._warned:
                self._warned = True
                log.error("exposition: a label value or HELP text is not UTF-8 text (%s); its bad "
                          "characters are served as '?'", exc.reason)
            return text.encode("utf-8", "replace")


_DEFAULT = Renderer()


def render(families: Iterable[Metric]) -> bytes:
    """Render metric families as Prometheus text format 0.0.4 (with a process-wide cache)."""
    return _DEFAULT.render(families)
