"""The probe's recording, exposition, serving and failure behaviour (CPU path)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rankwatch import Probe, promserver
from rankwatch.exporters import probe as probe_mod
from rankwatch.exporters.identity import RankIdentity

IDENT = RankIdentity(rank=5, local_rank=1, world_size=8, local_world_size=4, node="node-a",
                     gpu=1, gpu_uuid="GPU-1111", pp=1, tp=1, dp=0, cp=0)


def samples(probe: Probe) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(probe.registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(probe: Probe, name: str, **labels: str) -> float | None:
    base = {"run": probe.run, "rank": str(probe.identity.rank), "local_rank": str(probe.identity.local_rank),
            "node": probe.identity.node}
    return samples(probe).get((name, tuple(sorted({**base, **labels}.items()))))


@pytest.fixture
def probe():
    p = Probe(run="unit", port=0, identity=IDENT, wandb_run=None)
    yield p
    p.close()


def test_step_and_sections_are_exported_with_the_contract_names(probe: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [50.0]  # the probe's section clock, advanced by the test
    monkeypatch.setattr(probe_mod, "_perf", lambda: clock[0])
    before = time.time()
    for i in range(3):
        with probe.step(tokens=512, step=100 + i):
            with probe.section("forward"):
                clock[0] += 0.02
            with probe.section("comm"):
                pass
            clock[0] += 0.005  # outside any section
    after = time.time()
    assert value(probe, "rankwatch_steps_total") == 3
    assert value(probe, "rankwatch_tokens_total") == 3 * 512
    assert value(probe, "rankwatch_step") == 102
    assert value(probe, "rankwatch_section_count_total", section="forward") == 3
    assert value(probe, "rankwatch_section_seconds_total", section="forward") == pytest.approx(0.06)
    assert value(probe, "rankwatch_step_seconds_total") == pytest.approx(0.075)
    assert value(probe, "rankwatch_section_seconds_total", section="comm") == 0
    assert before <= value(probe, "rankwatch_last_step_timestamp_seconds") <= after  # wall clock, Unix seconds
    info = [k for k in samples(probe) if k[0] == "rankwatch_rank_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["world_size"] == "8" and labels["gpu"] == "1" and labels["gpu_uuid"] == "GPU-1111"
    assert (labels["pp"], labels["tp"], labels["dp"], labels["cp"]) == ("1", "1", "0", "0")
    # Bounded label set: the four series labels (+section), never `job`, nothing per step.
    for name, lbls in samples(probe):
        keys = {k for k, _ in lbls}
        assert "job" not in keys
        if name != "rankwatch_rank_info":
            assert keys <= {"run", "rank", "local_rank", "node", "section"}, (name, keys)


def test_exposition_passes_promtool_lint(probe: Probe) -> None:
    with probe.step(tokens=1):
        with probe.section("forward"):
            pass
    res = promserver.promtool("check", "metrics", input_text=generate_latest(probe.registry).decode())
    assert res.returncode == 0, res.stdout + res.stderr


def test_heartbeat_absent_before_first_step_and_record_step_sets_it(probe: Probe) -> None:
    assert value(probe, "rankwatch_steps_total") == 0
    assert value(probe, "rankwatch_last_step_timestamp_seconds") is None
    probe.record_step(2.5, {"forward": 1.0, "backward": 1.2, "comm": 0.2}, tokens=4096, step=77,
                      end_time=1_700_000_000.0)
    probe.record_step(2.5, {"forward": 1.0, "backward": 1.2, "comm": 0.2}, tokens=4096, step=78,
                      end_time=1_700_000_002.5)
    assert value(probe, "rankwatch_last_step_timestamp_seconds") == 1_700_000_002.5
    assert value(probe, "rankwatch_step") == 78
    assert value(probe, "rankwatch_step_seconds_total") == 5.0
    assert value(probe, "rankwatch_section_seconds_total", section="backward") == pytest.approx(2.4)
    assert value(probe, "rankwatch_section_count_total", section="comm") == 2


def test_exceptions_inside_step_or_section_propagate_unchanged_and_record_nothing(probe: Probe) -> None:
    with pytest.raises(KeyError):
        with probe.step(tokens=10):
            with probe.section("forward"):
                raise KeyError("user bug")
    assert value(probe, "rankwatch_steps_total") == 0
    assert value(probe, "rankwatch_section_count_total", section="forward") is None
    assert probe.errors == 0


def test_misuse_is_logged_once_counted_and_never_raised(probe: Probe, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rankwatch.probe"):
        probe.end_section("forward")
        probe.end_section("forward")
        probe.end_step()
        with probe.section(""):
            pass
        with probe.section(["not", "hashable"]):  # type: ignore[arg-type]
            pass
        probe.begin_section({"x": 1})  # type: ignore[arg-type]
        probe.record_section("forward", "not a number")  # type: ignore[arg-type]
    assert probe.errors == 7
    assert value(probe, "rankwatch_probe_errors_total") == 7
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("end_section" in m for m in msgs) == 1  # once per kind
    # Balanced use still works afterwards.
    probe.begin_step()
    probe.begin_section("forward")
    probe.end_section("forward")
    probe.end_step(tokens=3)
    assert value(probe, "rankwatch_steps_total") == 1
    assert value(probe, "rankwatch_section_count_total", section="forward") == 1


def test_section_names_are_bounded() -> None:
    p = Probe(run="unit", port=0, identity=IDENT, wandb_run=None, max_sections=3)
    try:
        for i in range(10):
            with p.section(f"layer{i}"):
                pass
        names = {dict(k[1]).get("section") for k in samples(p) if k[0] == "rankwatch_section_count_total"}
        assert names == {"layer0", "layer1", "layer2"}
        assert p.errors == 7
    finally:
        p.close()


def test_nested_sections_record_inclusive_time(probe: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [50.0]
    monkeypatch.setattr(probe_mod, "_perf", lambda: clock[0])
    with probe.section("backward"):
        clock[0] += 0.01
        with probe.section("comm"):
            clock[0] += 0.02
    assert value(probe, "rankwatch_section_seconds_total", section="comm") == pytest.approx(0.02)
    assert value(probe, "rankwatch_section_seconds_total", section="backward") == pytest.approx(0.03)


def test_serves_on_base_port_plus_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    base = promserver.free_port()
    while True:  # need base+2 free as well
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 2))
                break
            except OSError:
                base = promserver.free_port()
    monkeypatch.setenv("RANKWATCH_PROBE_BASE_PORT", str(base))
    ident = RankIdentity(rank=2, local_rank=2, world_size=4, local_world_size=4, node="n")
    p = Probe(run="served", addr="127.0.0.1", identity=ident, wandb_run=None)
    try:
        assert p.port == base + 2
        with p.step(tokens=7):
            pass
        r = requests.get(f"http://127.0.0.1:{base + 2}/metrics", timeout=5)
        assert r.status_code == 200
        assert 'rankwatch_tokens_total{local_rank="2",node="n",rank="2",run="served"} 7.0' in r.text
        # Only the probe's series: no process_/python_ collectors of the default registry.
        assert "process_cpu_seconds_total" not in r.text and "python_gc" not in r.text
    finally:
        p.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{base + 2}/metrics", timeout=2)


def test_port_in_use_warns_and_keeps_recording(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="rankwatch.probe"):
            p = Probe(run="busy", port=port, addr="127.0.0.1", identity=IDENT, wandb_run=None)
        try:
            assert p.port is None
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0] and "recording continues" in warnings[0]
            with p.step(tokens=1):
                pass
            assert p.totals().steps == 1 and p.errors == 1
        finally:
            p.close()


def test_port_zero_does_not_serve_and_bad_arguments_fail_at_construction() -> None:
    p = Probe(run="quiet", port=0, identity=IDENT, wandb_run=None)
    assert p.port is None and p.url is None
    p.close()
    p.close()  # idempotent
    with pytest.raises(ValueError, match="run"):
        Probe(run="", port=0, identity=IDENT)


def test_many_probes_in_one_process_are_independent() -> None:
    probes = [Probe(run="sim", port=0, wandb_run=None,
                    identity=RankIdentity(rank=r, local_rank=r % 8, world_size=16, local_world_size=8,
                                          node=f"n{r // 8}")) for r in range(16)]
    try:
        for r, p in enumerate(probes):
            p.record_step(1.0, {"forward": 0.1 * (r + 1)}, tokens=10)
        for r, p in enumerate(probes):
            assert value(p, "rankwatch_section_seconds_total", section="forward") == pytest.approx(0.1 * (r + 1))
            assert value(p, "rankwatch_steps_total") == 1
    finally:
        for p in probes:
            p.close()


def test_scrapes_during_recording_see_consistent_monotonic_counters() -> None:
    p = Probe(run="race", port=0, addr="127.0.0.1", identity=IDENT, wandb_run=None)
    p.close()  # no server needed: scrape through the registry from another thread
    seen: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        base = {"run": "race", "rank": "5", "local_rank": "1", "node": "node-a"}
        return name, tuple(sorted({**base, **labels}.items()))

    def scraper() -> None:
        while not stop.is_set():
            s = samples(p)  # one scrape: one consistent snapshot
            seen.append((s.get(key("rankwatch_steps_total"), 0.0),
                         s.get(key("rankwatch_section_count_total", section="forward"), 0.0),
                         s.get(key("rankwatch_step_seconds_total"), 0.0)))

    th = threading.Thread(target=scraper)
    th.start()
    try:
        for _ in range(3000):
            with p.step(tokens=1):
                with p.section("forward"):
                    pass
    finally:
        stop.set()
        th.join()
    assert len(seen) > 5
    for (s0, f0, t0), (s1, f1, t1) in zip(seen, seen[1:], strict=False):
        assert s1 >= s0 and f1 >= f0 and t1 >= t0
    for steps, fwd, _ in seen:
        assert fwd - steps in (0.0, 1.0)  # a scrape may fall between a section and its step's end
    assert p.totals().steps == 3000 and p.errors == 0
