"""Property-based tests (hypothesis) for what the node side reads from outside: EFA sysfs trees
with arbitrary device, port and file names and file contents, and arbitrary label values and
HELP text through the exposition renderer and the probe. Whatever the input, a scrape is
UTF-8 text that prometheus_client's parser and promtool accept, and what could be read is
exported with the value in the file."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import Probe, promserver
from rankwatch.exporters.efa import EfaCollector, valid_device_name
from rankwatch.exporters.exposition import Renderer, label_text
from rankwatch.exporters.identity import RankIdentity
from rankwatch.sim.sysfs import FakeEfaSysfs

_NAME_OK = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LINE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# File names the kernel could never write, and some it does: any bytes but '/' and NUL.
_fs_name = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.text(min_size=1, max_size=12).map(os.fsencode),
    st.sampled_from([b"tx_bytes", b"rx_drops", b"lifespan", b"info", b"2", b"\xb2", "²".encode(), b"01"]),
).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
_content = st.one_of(
    st.integers(0, 2**64 - 1).map(lambda n: f"{n}\n".encode()),
    st.binary(max_size=40),
    st.sampled_from([b"N/A (no PMA)\n", b"-1\n", b"", b"\n", b"1e9\n", b"\xff\xfe", "٣\n".encode()]),
)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def wire_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _LINE.fullmatch(line)
            assert m, line
            out[(m.group(1), frozenset((k, _unescape(v)) for k, v in _LABEL.findall(m.group(2) or "")))] = \
                float(m.group(3))
    return out


def assert_valid_exposition(body: bytes) -> str:
    text = body.decode("utf-8")  # strict: no byte that is not UTF-8
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family appears twice"
    return text


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_fs_name, st.lists(_fs_name, max_size=2),
                          st.dictionaries(_fs_name, _content, max_size=4)),
                min_size=1, max_size=3))
def test_efa_reader_survives_any_names_and_contents(devices: list[tuple[bytes, list[bytes], dict[bytes, bytes]]]) -> None:
    names = [d[0] for d in devices]
    assume(len(set(names)) == len(names))
    with tempfile.TemporaryDirectory() as tmp:
        sim = FakeEfaSysfs(Path(tmp) / "sys", devices=len(devices), seed=3)
        assume(not set(names) & {os.fsencode(n) for n in sim.devices})
        expected: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        odd_devices = 0
        for i, (name, ports, files) in enumerate(devices):
            device = sim.rename_device(i, name)
            hw = sim.device_path(device) / "ports" / "1" / "hw_counters"
            for fname, content in files.items():
                path = hw / os.fsdecode(fname)
                if path.is_dir():
                    continue
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
                os.write(fd, content)
                os.close(fd)
            for port in ports:
                if not (sim.device_path(device) / "ports" / os.fsdecode(port)).exists():
                    sim.add_port(device, port)
            if not valid_device_name(device):
                odd_devices += 1
                continue
            for port in ["1", *(os.fsdecode(p) for p in ports)]:
                if not re.fullmatch(r"[0-9]+", port):
                    continue
                for f in os.listdir(sim.device_path(device) / "ports" / port / "hw_counters"):
                    data = (sim.device_path(device) / "ports" / port / "hw_counters" / f).read_bytes()[:128].strip()
                    if _NAME_OK.fullmatch(f) and f != "info" and data.isdigit():
                        expected[(f"node_amazonefa_{f}", frozenset({("device", device), ("port", port)}))] = \
                            float(int(data))
        c = EfaCollector(sim.root, timeout=30)
        try:
            text = assert_valid_exposition(Renderer().render(c.collect()))
        finally:
            c.close()
        got = wire_samples(text)
        for key, value in expected.items():
            assert got.get(key) == value, key
        assert got[("rankwatch_efa_invalid_device_names", frozenset())] == odd_devices


# ------------------------------------------------------------------ label values and HELP
_any_text = st.one_of(st.text(), st.text().map(lambda s: s + "\udcff"),
                      st.text(alphabet=st.sampled_from('\\"\n\r\t{}=,# \x00\x7f\u2028\ufeffé'), max_size=12))


@settings(deadline=None, max_examples=300)
@given(st.lists(st.tuples(_any_text, _any_text), min_size=1, max_size=8), _any_text)
def test_any_label_value_and_help_renders_to_parseable_text(values: list[tuple[str, str]], help_text: str) -> None:
    gauge = GaugeMetricFamily("rw_prop", help_text, labels=["a", "b", "i"])
    counter = CounterMetricFamily("rw_prop_events", help_text, labels=["a"])
    for i, (a, b) in enumerate(values):
        gauge.add_metric([a, b, str(i)], float(i))
        counter.add_metric([f"{a}{i}"], float(i))
    text = assert_valid_exposition(Renderer().render([gauge, counter]))
    (g, c) = text_string_to_metric_families(text)  # HELP is ours, not outside input: it only has to parse
    for i, (a, b) in enumerate(values):
        sample = g.samples[i]
        # what was text comes back as it was; what was not (a lone surrogate) as '?'
        assert sample.labels == {"a": a.encode("utf-8", "replace").decode(), "b": b.encode("utf-8", "replace").decode(),
                                 "i": str(i)}
    assert len(c.samples) == len(values)


@settings(deadline=None, max_examples=25)
@given(st.lists(_any_text, min_size=1, max_size=10))
def test_promtool_accepts_any_label_value(values: list[str]) -> None:
    gauge = GaugeMetricFamily("rw_prop", "Label values from anywhere.", labels=["value", "i"])
    for i, v in enumerate(values):
        gauge.add_metric([v, str(i)], 1.0)
    res = promserver.promtool("check", "metrics", input_text=Renderer().render([gauge]).decode("utf-8"))
    assert "error" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


@settings(deadline=None, max_examples=60)
@given(run=_any_text.filter(bool), node=_any_text, section=_any_text.filter(bool))
def test_probe_labels_from_anywhere_render_to_parseable_text(run: str, node: str, section: str) -> None:
    ident = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node=node)
    p = Probe(run=run, port=0, identity=ident, wandb_run=None)
    try:
        p.record_step(1.0, sections={section: 0.5})
        text = assert_valid_exposition(generate_latest(p.registry))
        assert any(s.labels.get("run") == label_text(run) for f in text_string_to_metric_families(text)
                   for s in f.samples)
    finally:
        p.close()


@pytest.mark.parametrize("name", ["info", "lifespan"])
def test_a_counter_file_named_like_an_own_family_is_not_a_second_family(tmp_path: Path, name: str) -> None:
    """Found by the property test above: a file named `info` in hw_counters would make a
    second node_amazonefa_info family (counter, other labels) and break the scrape."""
    sim = FakeEfaSysfs(tmp_path / "sys", devices=1, seed=1)
    sim.add_file(0, name, "5\n")
    c = EfaCollector(sim.root)
    try:
        assert_valid_exposition(Renderer().render(c.collect()))
    finally:
        c.close()


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.integers(0, 2**53 - 1), st.integers(0, 10**7)))
def test_a_counter_read_as_an_int_renders_as_its_float_would(n: int) -> None:
    """The renderer's int shortcut (EFA counters) writes exactly what the float path writes."""
    from rankwatch.exporters.exposition import _value_text

    assert _value_text(n) == _value_text(float(n))
