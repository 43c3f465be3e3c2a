"""The probe never lets a bad value into a counter, and never raises into the training loop:
NaN, infinite or negative times and negative or fractional token counts are rejected and
counted in rankwatch_probe_errors_total; an impossible port from the environment costs the
endpoint, not the job."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import Probe, promserver
from rankwatch.exporters.identity import RankIdentity

IDENT = RankIdentity(rank=3, local_rank=3, world_size=8, local_world_size=8, node="node-a")
Values = dict[tuple[str, str | None], float]


def scrape(probe: Probe) -> Values:
    """Counters as Prometheus sees them, over HTTP: (sample name, section) → value."""
    r = requests.get(probe.url, timeout=30)
    assert r.status_code == 200
    return {(s.name, s.labels.get("section")): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


@pytest.fixture
def probe():
    p = Probe(run="input", port=promserver.free_port(), identity=IDENT, wandb_run=None)
    yield p
    p.close()


def test_nan_times_and_negative_tokens_are_rejected_and_counted(probe: Probe) -> None:
    probe.record_step(1.5, sections={"forward": 1.0}, tokens=100)
    before = scrape(probe)
    probe.record_step(float("nan"), sections={"forward": float("nan")}, tokens=-100)  # the call
    after = scrape(probe)
    for key in [("rankwatch_steps_total", None), ("rankwatch_step_seconds_total", None),
                ("rankwatch_tokens_total", None), ("rankwatch_section_seconds_total", "forward"),
                ("rankwatch_section_count_total", "forward")]:
        assert after[key] == before[key], key
    assert after[("rankwatch_probe_errors_total", None)] == before[("rankwatch_probe_errors_total", None)] + 3
    probe.record_step(2.0, sections={"forward": 1.5}, tokens=50)  # and recording goes on
    later = scrape(probe)
    assert later[("rankwatch_step_seconds_total", None)] == 3.5
    assert later[("rankwatch_section_seconds_total", "forward")] == 2.5
    assert later[("rankwatch_tokens_total", None)] == 150


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, -math.inf, "1.5s", None, True],
                         ids=repr)
def test_a_bad_step_time_drops_the_step(probe: Probe, bad: object) -> None:
    probe.record_step(bad, sections={"forward": 0.5}, tokens=10)  # type: ignore[arg-type]
    t = probe.totals()
    assert (t.steps, t.step_seconds, t.tokens, t.sections) == (0, 0.0, 0, {})
    assert t.errors == 1


@pytest.mark.parametrize("bad", [-100, 1.5, float("nan"), float("inf"), "many", -0.0 - 1], ids=repr)
def test_a_bad_token_count_costs_only_the_tokens(probe: Probe, bad: object) -> None:
    with probe.step(tokens=bad):  # type: ignore[arg-type]
        with probe.section("forward"):
            pass
    t = probe.totals()
    assert t.steps == 1 and t.tokens == 0 and t.sections["forward"][1] == 1
    assert t.errors == 1


def test_whole_numbers_of_any_numeric_type_are_tokens(probe: Probe) -> None:
    probe.record_step(1.0, tokens=np.int64(7))
    probe.record_step(1.0, tokens=8.0)
    probe.record_step(1.0, tokens=0)
    assert probe.totals().tokens == 15 and probe.totals().errors == 0


def test_bad_step_number_end_time_and_section(probe: Probe) -> None:
    probe.record_step(1.0, step=float("nan"), end_time=float("nan"))
    probe.record_section("comm", -2.0)
    probe.record_section("comm", float("inf"))
    t = probe.totals()
    assert t.steps == 1 and t.step == 1  # the step counts; its number falls back to the count
    assert t.last_step_time is not None and math.isfinite(t.last_step_time) and t.last_step_time > 1e9
    assert "comm" not in t.sections
    assert t.errors == 4


def test_each_kind_is_logged_once_then_only_counted(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rankwatch.probe"):
        for _ in range(50):
            probe.record_step(-1.0)
    assert probe.totals().errors == 50
    assert len([r for r in caplog.records if "step-seconds" in r.getMessage()]) == 1


_anything = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6), st.none(),
                      st.text(max_size=3), st.booleans())


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(_anything, st.dictionaries(st.sampled_from(["forward", "backward", "comm"]), _anything,
                                                     max_size=3), _anything), max_size=12))
def test_counters_only_rise_whatever_is_recorded(calls: list[tuple[object, dict[str, object], object]]) -> None:
    """Property: for any sequence of record_step calls, no call raises and every counter stays
    finite and never goes down."""
    p = Probe(run="prop", port=0, identity=IDENT, wandb_run=None)
    try:
        prev = p.totals()
        for seconds, sections, tokens in calls:
            p.record_step(seconds, sections=sections, tokens=tokens)  # type: ignore[arg-type]
            t = p.totals()
            assert t.steps >= prev.steps and t.tokens >= prev.tokens and t.errors >= prev.errors
            assert math.isfinite(t.step_seconds) and t.step_seconds >= prev.step_seconds
            for name, (secs, count) in t.sections.items():
                old = prev.sections.get(name, (0.0, 0))
                assert math.isfinite(secs) and secs >= old[0] and count >= old[1]
            prev = t
    finally:
        p.close()


# ------------------------------------------------------------------ the port from the environment
@pytest.mark.parametrize("base,why", [("65535", "= 65538 is not a port"), ("9x20", "is not a port number"),
                                      ("-5", "is not a port number")])
def test_an_impossible_port_from_the_environment_costs_the_endpoint_not_the_job(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, base: str, why: str) -> None:
    monkeypatch.setenv("RANKWATCH_PROBE_BASE_PORT", base)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with caplog.at_level(logging.WARNING, logger="rankwatch.probe"):
        p = Probe(run="ports", wandb_run=None)  # must not raise
    try:
        assert p.port is None and p.url is None
        assert p.totals().errors == 1
        assert any(why in r.getMessage() and "without a metrics endpoint" in r.getMessage() for r in caplog.records)
        p.record_step(1.0, tokens=5)
        assert p.totals().steps == 1
    finally:
        p.close()


@pytest.mark.parametrize("port", [70000, -1, 9420.5, "9420"], ids=repr)
def test_an_impossible_port_argument_is_a_clear_error(port: object) -> None:
    with pytest.raises(ValueError, match=r"Probe\(port=.*\): a port is an int from 0 to 65535"):
        Probe(run="ports", port=port, identity=IDENT, wandb_run=None)  # type: ignore[arg-type]


def test_a_label_value_that_is_not_text_does_not_break_the_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node name from the environment with bytes that are not UTF-8 (os.environ hands them
    over as lone surrogates) is served with U+FFFD instead of failing every scrape."""
    ident = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node="node-\udcff")
    p = Probe(run="run-\udcfe", port=promserver.free_port(), identity=ident, wandb_run=None)
    try:
        p.record_step(1.0)
        r = requests.get(p.url, timeout=30)
        assert r.status_code == 200
        text = r.content.decode("utf-8")
        assert 'node="node-\ufffd"' in text and 'run="run-\ufffd"' in text
    finally:
        p.close()


def test_the_listen_address_can_be_narrowed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKWATCH_PROBE_ADDR", "127.0.0.1")
    p = Probe(run="addr", port=promserver.free_port(), identity=IDENT, wandb_run=None)
    try:
        assert p._httpd is not None and p._httpd.socket.getsockname()[0] == "127.0.0.1"
    finally:
        p.close()
    monkeypatch.delenv("RANKWATCH_PROBE_ADDR")
    p = Probe(run="addr", port=promserver.free_port(), identity=IDENT, wandb_run=None)
    try:
        assert p._httpd is not None and p._httpd.socket.getsockname()[0] == "0.0.0.0"  # the default
    finally:
        p.close()
