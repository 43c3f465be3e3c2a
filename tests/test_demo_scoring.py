"""The demo's judge and timeline: what counts as caught, late, wrong or a false alarm."""

from __future__ import annotations

import pytest

from rankwatch.demo.scenario import DemoConfig, build_timeline, expected_incidents
from rankwatch.demo.scoring import Expect, Incident, judge
from rankwatch.errors import ConfigError
from rankwatch.events import Event


def ev(t: float, kind: str, state: str = "firing", rank: int | None = None, node: str | None = None,
       gpu: str | None = None) -> Event:
    return Event(time=t, kind=kind, state=state, run="r", rank=rank, node=node, gpu=gpu, score=5.0,
                 summary=f"{kind} at {t}")


def incidents() -> list[Incident]:
    return [
        Incident("benign", "benign", 0, 30, (), benign=True),
        Incident("thermal", "thermal", 30, 60, (Expect("straggler", rank=29),),
                 (Expect("gpu_fault", node="node-03", gpu="5"),)),
        Incident("xid79", "xid", 100, 130, (Expect("gpu_fault", node="node-25", gpu="2"), Expect("hang"))),
    ]


def test_right_kind_and_entity_is_correct_with_delay() -> None:
    v = judge(incidents(), [ev(41, "straggler", rank=29, node="node-03"),
                            ev(38, "gpu_fault", node="node-03", gpu="5"),
                            ev(55, "straggler", "resolved", rank=29),
                            ev(104, "gpu_fault", node="node-25", gpu="2"), ev(110, "hang")], grace=10)
    thermal, xid = v.results[1], v.results[2]
    assert thermal.correct and thermal.detected_at == 41 and thermal.delay == 11
    assert {e.kind for e in thermal.matched} == {"straggler", "gpu_fault"}
    assert xid.correct and xid.delay == 4
    assert v.results[0].correct and not v.false_alarms and v.all_correct


def test_wrong_rank_is_missing_and_a_false_alarm() -> None:
    v = judge(incidents(), [ev(41, "straggler", rank=28), ev(104, "gpu_fault", node="node-25", gpu="2"),
                            ev(110, "hang")], grace=10)
    assert not v.results[1].correct
    assert [x.describe() for x in v.results[1].missing] == ["straggler rank 29"]
    assert [e.rank for e in v.false_alarms] == [28]
    assert not v.all_correct


def test_partial_detection_is_not_correct() -> None:
    v = judge(incidents(), [ev(41, "straggler", rank=29), ev(104, "gpu_fault", node="node-25", gpu="2")], grace=10)
    assert not v.results[2].correct and v.results[2].detected_at == 104
    assert [x.kind for x in v.results[2].missing] == ["hang"]


def test_event_in_benign_slot_is_a_false_alarm() -> None:
    v = judge(incidents(), [ev(12, "straggler", rank=200), ev(41, "straggler", rank=29),
                            ev(104, "gpu_fault", node="node-25", gpu="2"), ev(110, "hang")], grace=10)
    assert not v.results[0].correct and [e.rank for e in v.results[0].wrong] == [200]
    assert len(v.false_alarms) == 1


def test_late_event_after_grace_is_not_credited() -> None:
    v = judge(incidents(), [ev(75, "straggler", rank=29)], grace=10)
    assert v.results[1].detected_at is None and len(v.false_alarms) == 1


def test_timeline_slots_are_ordered_and_incidents_expect_the_right_entities() -> None:
    cfg = DemoConfig()
    tl = build_timeline(cfg)
    starts = [s[2] for s in tl.slots]
    assert starts == sorted(starts) and tl.slots[-1][3] <= tl.total_seconds
    # every slot ends where the next begins: recovery between incidents
    assert all(a[3] == b[2] for a, b in zip(tl.slots, tl.slots[1:], strict=False))
    inc = {i.name: i for i in expected_incidents(cfg, tl, 1000.0)}
    assert set(inc) == {"benign", "thermal", "efa", "dataloader", "xid79"}
    thermal = next(f for f in tl.faults if f.kind == "thermal")
    assert inc["thermal"].required[0].rank == thermal.node * 8 + thermal.local_rank
    assert inc["xid79"].required[1].kind == "hang"
    nodes = {f.node for f in tl.faults if f.node is not None}
    assert len(nodes) == 4  # each incident on its own node
    # the full demo fits in 5 minutes with start-up and report
    assert tl.total_seconds < 270


def test_small_cluster_timeline_stays_in_range() -> None:
    cfg = DemoConfig(nodes=4, gpus_per_node=4, tp=4, pp=2)
    cfg.validate()
    tl = build_timeline(cfg)
    for f in tl.faults:
        if f.node is not None:
            assert 0 <= f.node < 4
        if f.local_rank is not None:
            assert 0 <= f.local_rank < 4
    assert cfg.dp == 2 and cfg.node_address(3) == "127.66.0.4"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"nodes": 3, "gpus_per_node": 8, "tp": 8, "pp": 4}, "not divisible"),
    ({"nodes": 0}, "--nodes"),
    ({"window": 3.0, "scrape_interval": 2.0}, "--window"),
])
def test_bad_config_is_a_clear_error(kwargs, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        DemoConfig(**kwargs).validate()


def test_address_prefix_must_be_loopback() -> None:
    with pytest.raises(ConfigError, match="address-prefix"):
        DemoConfig(address_prefix="10.0").validate()
