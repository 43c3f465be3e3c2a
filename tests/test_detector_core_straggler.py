"""Straggler detection on simulated jobs: the slowed rank is named with its evidence, once per
episode, after persistence and with hysteresis; benign noise raises nothing."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.model import RankObs, Snapshot
from rankwatch.sim.scenario import Scenario, simulate, snapshots
from rankwatch.sim.training import QUIET, Fault, Layout, Noise

LAYOUT = Layout(tp=2, pp=2, dp=4)  # 16 ranks, 8 per pipeline stage
T0 = 1_750_000_000.0


def scenario(name: str, faults=(), noise: Noise | None = None, duration: float = 480.0, **kw) -> Scenario:
    return Scenario(name, layout=LAYOUT, nodes=4, gpus_per_node=4, duration_s=duration, seed=11,
                    noise=noise or Noise(), faults=list(faults), **kw)


def run(sc: Scenario, cfg: DetectorConfig | None = None, core: DetectorCore | None = None):
    core = core or DetectorCore(cfg)
    events = []
    for snap in snapshots(simulate(sc), core.config.interval_s, core.config.window_s):
        events += core.evaluate(snap)
    return events, core


def test_slowed_rank_fires_once_with_evidence_and_resolves_once():
    sc = scenario("slow", [Fault("slowdown", rank=6, start_s=150, end_s=330, magnitude=0.2)])
    events, core = run(sc)
    strag = [e for e in events if e.kind == "straggler"]
    assert [(e.state, e.rank) for e in strag] == [("firing", 6), ("resolved", 6)]
    fire, res = strag
    assert fire.episode == res.episode and fire.since == fire.time
    # persistence: 3 evaluations after the first fully slowed window, not before
    assert 150 + 2 * 15 <= fire.time - T0 <= 150 + 4 * 15
    assert 330 < res.time - T0 <= 330 + 3 * 15  # hysteresis: 2 clean evaluations
    ev = fire.evidence
    assert ev["cause"] == "compute" and 0.15 < ev["compute_slowdown"] < 0.25
    assert ev["peer_group"].endswith("pp=0") and ev["peer_group_size"] == 8
    assert ev["waits_least"] is True  # everyone else waits for it in collectives
    assert 0.1 < ev["est_job_speedup"] < 0.25
    pct = round(ev["compute_slowdown"] * 100)
    assert "Rank 6" in fire.summary and f"{pct} % slower" in fire.summary and "faster" in fire.summary
    json.loads(fire.to_json())
    assert core.flagged == set() and core.scores[("sim-run", 6)] < 3.5


@pytest.mark.parametrize(
    "noise",
    [
        Noise(gc_prob=0.05, gc_pause=0.3),  # frequent GC pauses
        Noise(eval_every=20, eval_factor=4.0),  # eval steps
        Noise(checkpoint_every=30, checkpoint_factor=8.0),  # checkpoint steps
        Noise(seq_imbalance=0.05),  # sequence-length imbalance
        Noise(first_stage_weight=1.3, last_stage_weight=1.6),  # heavy first/last pipeline stage
        Noise(warmup_extra=3.0, warmup_s=60.0),  # long warm-up
    ],
    ids=["gc", "eval", "checkpoint", "seqlen", "stages", "warmup"],
)
def test_benign_noise_raises_nothing(noise):
    events, _ = run(scenario("benign", noise=noise, duration=600.0))
    assert events == []


def test_unknown_layout_still_compares_within_stages():
    heavy = Noise(last_stage_weight=1.3)
    assert run(scenario("nolayout", noise=heavy, pp_labels=False))[0] == []
    events, _ = run(scenario("nolayout-slow", [Fault("slowdown", rank=3, start_s=150, magnitude=0.15)],
                             noise=heavy, pp_labels=False))
    assert [(e.kind, e.state, e.rank) for e in events if e.kind == "straggler"] == [("straggler", "firing", 3)]


def test_transient_spikes_raise_nothing():
    spikes = [Fault("spike", rank=5, start_s=150 + 60 * k, end_s=165 + 60 * k, magnitude=0.5) for k in range(4)]
    assert run(scenario("spikes", spikes))[0] == []


def test_dataloader_only_straggler_names_the_dataloader():
    events, _ = run(scenario("dl", [Fault("dataloader", rank=9, start_s=150, magnitude=0.2)]))
    fire = [e for e in events if e.kind == "straggler"]
    assert len(fire) == 1 and fire[0].rank == 9 and fire[0].state == "firing"
    assert fire[0].evidence["cause"] == "dataloader" and "dataloader" in fire[0].summary


def test_five_percent_slowdown_is_found():
    events, _ = run(scenario("slow5", [Fault("slowdown", rank=12, start_s=150, magnitude=0.05)]))
    assert [(e.kind, e.rank) for e in events] == [("straggler", 12)]


def _snap(t: float, values: dict[int, float], pp: dict[int, int] | None = None,
          overrides: dict[int, dict] | None = None) -> Snapshot:
    ranks = []
    for r, c in values.items():
        kw = {"up": True, "steps_rate": 1.0, "step_seconds": 1.2,
              "sections": {"forward": c / 3, "backward": 2 * c / 3, "comm": 1.2 - c}} | (overrides or {}).get(r, {})
        ranks.append(RankObs(run="r", rank=r, node=f"n{r}", pp=(pp or {}).get(r, 0), **kw))
    return Snapshot(time=t, window_s=15.0, ranks=ranks)


def _feed(core, snaps):
    out = []
    for s in snaps:
        out += core.evaluate(s)
    return out


def test_groups_of_one_and_two_and_ranks_without_data():
    cfg = DetectorConfig(warmup_s=0.0)
    # pp 0 has two ranks (0 slow by 30 %), pp 1 has one rank (no peers), rank 3 has no data
    core = DetectorCore(cfg)
    vals = {0: 1.3, 1: 1.0, 2: 2.0, 3: 1.0}
    pp = {0: 0, 1: 0, 2: 1, 3: 1}
    empty = {3: {"sections": {}, "steps_rate": 0.0}}
    events = _feed(core, [_snap(T0 + 15 * k, vals, pp, empty) for k in range(5)])
    assert [(e.kind, e.rank) for e in events] == [("straggler", 0)]
    assert events[0].evidence["peer_group_size"] == 2
    # the same group of two with a 5 % gap: below the small-group margin, nothing
    core = DetectorCore(cfg)
    assert _feed(core, [_snap(T0 + 15 * k, {0: 1.05, 1: 1.0}) for k in range(6)]) == []


def test_down_or_missing_ranks_are_never_stragglers():
    cfg = DetectorConfig(warmup_s=0.0)
    core = DetectorCore(cfg)
    vals = {r: 1.0 for r in range(8)}
    vals[7] = 3.0  # looks slow, but its endpoint is down: stale numbers are no evidence
    events = _feed(core, [_snap(T0 + 15 * k, vals, overrides={7: {"up": False}}) for k in range(6)])
    assert events == []
    # the probe queries failed this cycle: nothing is scored, nothing fires
    snaps = []
    for k in range(6):
        s = _snap(T0 + 15 * k, {**vals, 7: 3.0})
        s.errors.append("rankwatch_section_seconds_total: timeout")
        snaps.append(s)
    assert _feed(DetectorCore(cfg), snaps) == []


def test_state_round_trip_neither_loses_nor_repeats_an_alert():
    cfg = DetectorConfig(warmup_s=0.0)
    vals = {r: 1.0 + 0.001 * r for r in range(8)}
    slow = {**vals, 2: 1.3}
    core = DetectorCore(cfg)
    fired = _feed(core, [_snap(T0 + 15 * k, slow) for k in range(4)])
    assert [(e.state, e.rank) for e in fired] == [("firing", 2)]
    state = json.loads(json.dumps(core.export_state()))
    restarted = DetectorCore(cfg)
    restarted.import_state(state)
    assert restarted.flagged == {("r", 2)}
    again = _feed(restarted, [_snap(T0 + 15 * k, slow) for k in range(4, 6)])
    assert again == []  # no second firing after a restart
    res = _feed(restarted, [_snap(T0 + 15 * k, vals) for k in range(6, 9)])
    assert [(e.state, e.episode) for e in res] == [("resolved", fired[0].episode)]
    with pytest.raises(ValueError):
        DetectorCore(cfg).import_state({"version": 99})


def test_quiet_job_scores_stay_low():
    events, core = run(scenario("quiet", noise=QUIET))
    assert events == [] and max(core.scores.values()) < 3.5 and len(core.scores) == LAYOUT.world


def test_config_thresholds_are_honoured():
    sc = scenario("slow10", [Fault("slowdown", rank=6, start_s=150, magnitude=0.1)])
    strict = dataclasses.replace(DetectorConfig(), min_slowdown=0.15)
    assert run(sc, strict)[0] == []
    base = DetectorConfig()
    late = dataclasses.replace(base, cusum_min_duration_s=tuple(3 * d for d in base.cusum_min_duration_s))
    high = dataclasses.replace(base, cusum_thresholds_s=(8.0, 8.0, 8.0))
    e_default = run(sc)[0][0]
    e_late = run(sc, late)[0][0]
    e_high = run(sc, high)[0][0]
    assert e_default.rank == e_late.rank == e_high.rank == 6
    # the small chart must now rise for 135 s instead of 45 s before it may fire
    assert e_late.time - e_default.time >= 6 * 15
    # a 10 % straggler adds (10 % - 3 %) x 15 s = 1 s of evidence per window to the small chart
    assert e_high.time - e_default.time >= 5 * 15


def test_chart_memory_never_flags_a_rank_that_is_not_slower_now():
    import numpy as np

    from rankwatch.detectors.straggler import RankTable, evidence_width, score_ranks

    cfg = DetectorConfig(warmup_s=0.0)
    # rank 0 was slow for a long time (its charts are far over their thresholds), now it is
    # 1 % *faster* than its peers
    vals = {r: 1.0 + 0.001 * r for r in range(16)}
    vals[0] = 0.99
    snap = _snap(T0, vals)
    # every chart and every count of rising evaluations far over what fires, noise memory 1 %
    prev = RankTable(evidence_width(cfg))
    ranks = np.arange(16)
    one = np.array([100.0] * 6 + [0.01])
    prev.put(["r"], np.zeros(16, np.int64), ranks, np.where(ranks[:, None] == 0, np.tile(one, 2), np.nan))
    sc = score_ranks(snap.ranks, cfg, 15.0, evidence_prev=prev)
    assert sc.evidence[0, :3].min() > 90 and sc.rel_compute[0] < 0  # the memory alone is high
    assert not sc.flagged.any()


def test_a_group_with_most_peers_down_gives_no_verdict():
    cfg = DetectorConfig(warmup_s=0.0)
    vals = {r: 1.0 + 0.001 * (r % 7) for r in range(64)}
    vals[5] = 1.3  # 30 % slower than every answering peer

    def feed(answering: int, k0: int = 0, n: int = 6):
        down = {r: {"up": False} for r in range(answering, 64)}
        return _feed(core, [_snap(T0 + 15 * (k0 + k), vals, overrides=down) for k in range(n)])

    core = DetectorCore(cfg)
    assert feed(25) == []  # 25 of 64 answer: under the default quorum of half the group
    core = DetectorCore(cfg)
    fired = feed(40)  # 40 of 64 answer: a verdict, and rank 5 is named
    assert [(e.state, e.rank) for e in fired] == [("firing", 5)]
    # the group collapses while the episode is open: no verdict, so no early "resolved" either
    assert feed(25, 6, 6) == []
    assert core.flagged == {("r", 5)}
    core = DetectorCore(dataclasses.replace(cfg, min_answering_frac=0.7))
    assert feed(40) == []  # the quorum is configurable


def test_episode_resolves_after_resolve_windows_not_when_the_slow_signal_has_decayed():
    # a noisy group (peers 2 % either side of the median): after a long 30 % slowdown, rank 0
    # is back within the noise (3.5 % above the median, under the 4 % minimum, z about 1); its
    # smoothed signal takes about 8 windows to decay, resolution must take resolve_windows
    peers = {r: 1.0 + (0.02 if r % 2 else -0.02) for r in range(1, 15)} | {15: 1.0}
    slow, cured = {0: 1.3, **peers}, {0: 1.045, **peers}
    for resolve in (2, 4):
        cfg = DetectorConfig(warmup_s=0.0, resolve_windows=resolve)
        core = DetectorCore(cfg)
        fired = _feed(core, [_snap(T0 + 15 * k, slow) for k in range(20)])
        assert [(e.state, e.rank) for e in fired] == [("firing", 0)]
        res = _feed(core, [_snap(T0 + 15 * (20 + k), cured) for k in range(12)])
        assert [(e.state, e.rank) for e in res] == [("resolved", 0)]
        assert res[0].time == T0 + 15 * (20 + resolve - 1)


def test_rank_slow_from_the_first_step_without_layout_labels_is_found():
    # rank 3 (first stage, 8 % heavier) is 11 % slower from t = 0: its own long-run time sits
    # right at the last stage's (20 % heavier), so clustering by time alone puts it there
    slow = [Fault("slowdown", rank=3, start_s=0.0, magnitude=0.11)]
    events, _ = run(scenario("nolayout-slow-from-start", slow, pp_labels=False, duration=600.0))
    strag = [(e.kind, e.state, e.rank) for e in events if e.kind == "straggler"]
    assert strag == [("straggler", "firing", 3)]
    fire = next(e for e in events if e.kind == "straggler")
    assert "cluster" in fire.evidence["peer_group"] and 0.08 < fire.evidence["compute_slowdown"] < 0.14
    # the same job without the slow rank: the heavier stages raise nothing
    assert run(scenario("nolayout-healthy", pp_labels=False, duration=600.0))[0] == []


def _interleaved(t: float, slow: dict[int, float]) -> Snapshot:
    """16 ranks without layout labels whose pipeline stage is rank % 4 (interleaved), stages
    8 %, 0, 0 and 20 % heavier, 0.3 % per-rank noise."""
    rng = np.random.default_rng(int(t))
    weight = {0: 1.08, 1: 1.0, 2: 1.0, 3: 1.2}
    ranks = []
    for r in range(16):
        c = weight[r % 4] * slow.get(r, 1.0) * (1 + rng.normal(0, 0.003))
        ranks.append(RankObs(run="il", rank=r, node=f"n{r // 4}", up=True, steps_rate=1.0, step_seconds=1.5,
                             sections={"forward": c / 3, "backward": 2 * c / 3, "comm": 1.5 - c}))
    return Snapshot(time=t, window_s=15.0, ranks=ranks)


def test_interleaved_stages_without_labels_warn_once_and_raise_nothing(caplog):
    core = DetectorCore(DetectorConfig(warmup_s=0.0))
    # rank 5 (stage 1) is 8 % slower from the start: indistinguishable from stage 0 here
    with caplog.at_level("WARNING", logger="rankwatch.detectors.core"):
        events = _feed(core, [_interleaved(T0 + 15 * k, {5: 1.08}) for k in range(30)])
    assert events == []
    warnings = [r.getMessage() for r in caplog.records if "layout labels" in r.getMessage()]
    assert len(warnings) == 1
    assert "run il" in warnings[0] and "RANKWATCH_PP_SIZE" in warnings[0] and "pp=" in warnings[0]
    # a rank that slows down later is still found against its own stage's cluster
    later = _feed(core, [_interleaved(T0 + 15 * k, {5: 1.08, 6: 1.3}) for k in range(30, 40)])
    assert [(e.state, e.rank) for e in later] == [("firing", 6)]


@pytest.mark.parametrize("offset", [0.0, 4.0, 7.5, 11.0])
def test_spikes_once_a_minute_at_any_offset_raise_nothing(offset):
    # +50 % for 15 s, once a minute, five times: straddling the window grid or not
    spikes = [Fault("spike", rank=5, start_s=150 + offset + 60 * k, end_s=165 + offset + 60 * k, magnitude=0.5)
              for k in range(5)]
    assert run(scenario("spikes-offset", spikes, scrape_s=15.0, duration=540.0))[0] == []


def test_a_bigger_slowdown_fires_sooner():
    # onset off the 15 s evaluation grid; scraped every 15 s
    delays = {}
    for pct in (5, 20, 50):
        sc = scenario(f"slow{pct}", [Fault("slowdown", rank=9, start_s=157.3, magnitude=pct / 100)], scrape_s=15.0)
        fired = [e for e in run(sc)[0] if e.kind == "straggler" and e.state == "firing"]
        assert [e.rank for e in fired] == [9]
        delays[pct] = fired[0].time - T0 - 157.3
    assert delays[50] < delays[20] < delays[5]
    assert delays[50] <= 30 and delays[20] <= 60 and delays[5] <= 600


def test_saved_charts_of_another_chart_configuration_start_afresh():
    cfg = DetectorConfig(warmup_s=0.0)
    vals = {r: 1.0 + 0.001 * r for r in range(8)}
    slow = {**vals, 2: 1.3}
    core = DetectorCore(cfg)
    _feed(core, [_snap(T0 + 15 * k, slow) for k in range(2)])  # evidence builds, nothing fires yet
    state = json.loads(json.dumps(core.export_state()))
    other = dataclasses.replace(cfg, cusum_slowdowns=(0.1, 0.3), cusum_thresholds_s=(0.0, 4.5),
                                cusum_min_duration_s=(45.0, 15.0))
    restarted = DetectorCore(other)
    restarted.import_state(state)  # no error: the old charts are simply not used
    assert restarted.evidence.data == {}
    fired = _feed(restarted, [_snap(T0 + 15 * k, slow) for k in range(2, 8)])
    assert [(e.state, e.rank) for e in fired] == [("firing", 2)]
    same = DetectorCore(cfg)
    same.import_state(state)
    assert set(same.evidence.data) == {"r"}
