"""The demo's pacing: a slot of the timeline lasts its scripted length and then until the
detector has seen what the slot is for; the workers learn each slot's start before it begins.
Pure logic: every time below is data (seconds after t0), no clock is read."""

from __future__ import annotations

from rankwatch.demo.cluster import ScheduleFile, eval_times, schedule_job, write_schedule
from rankwatch.demo.cluster import build_job as build_cluster_job
from rankwatch.demo.pacing import Pacer, open_episodes
from rankwatch.demo.scenario import DemoConfig, build_timeline
from rankwatch.events import Event

T0 = 1_800_000_000.0
CFG = DemoConfig(nodes=4, gpus_per_node=4, tp=4, pp=2, warmup_seconds=10, benign_seconds=10, incident_seconds=20,
                 recovery_seconds=10, tail_seconds=2, eval_interval=3, window=3, scrape_interval=1)


def pacer() -> Pacer:
    return Pacer(CFG, build_timeline(CFG), T0, lag_s=5.0, patience_s=30.0)


def ev(t: float, kind: str, state: str = "firing", **kw) -> Event:
    return Event(time=T0 + t, kind=kind, state=state, run="r", rank=kw.pop("rank", None), node=kw.pop("node", None),
                 gpu=kw.pop("gpu", None), score=1.0, summary=kind, episode=kw.pop("episode", f"{kind}-{t}"), **kw)


def test_an_idle_run_keeps_the_scripted_slots() -> None:
    p = pacer()
    # warm-up ends at its scripted length, decided a lead before, once the detector keeps up
    assert not p.advance(5.0, [], evaluated=1.0)
    assert p.advance(9.0, [], evaluated=7.0) and p.starts == [0.0, 10.0]
    assert p.played().slots[0][2:] == (0.0, 10.0) and p.held == {}


def test_an_incident_lasts_until_the_detector_names_it() -> None:
    p = pacer()
    p.starts = [0.0, 10.0, 20.0]  # thermal began at 20 s
    tl = p.played()
    thermal = next(f for f in tl.faults if f.name == "thermal")
    assert thermal.duration is None  # running: open-ended for the workers
    rank = CFG.rank_of(thermal.node, thermal.local_rank)
    # past its 20 s and the detector keeps up, but nothing named the rank yet: held
    assert not p.advance(45.0, [ev(30, "straggler", rank=rank + 1)], evaluated=42.0)
    assert p.held["thermal"] == f"the detector to name it: straggler rank {rank}"
    # an event from before the incident does not count
    assert not p.advance(46.0, [ev(15, "straggler", rank=rank)], evaluated=43.0)
    assert p.advance(47.0, [ev(44, "straggler", rank=rank)], evaluated=44.0)
    assert p.starts[-1] == 48.0  # a lead after the decision
    assert next(f for f in p.played().faults if f.name == "thermal").end == 48.0


def test_a_recovery_lasts_until_the_job_is_back_to_normal() -> None:
    p = pacer()
    p.starts = [0.0, 10.0, 20.0, 48.0]  # recover-thermal began at 48 s
    firing = [ev(44, "straggler", rank=1, episode="s1"), ev(40, "gpu_fault", node="node-00", gpu="1", episode="g1")]
    assert not p.advance(70.0, firing, evaluated=66.0)
    assert p.held["recover-thermal"] == "open episodes to resolve: straggler"
    # a GPU's own fault may stay open (a GPU off the bus fails its health check until reset)
    resolved = [*firing, ev(60, "straggler", "resolved", rank=1, episode="s1")]
    assert [e.episode for e in open_episodes(resolved)] == []
    assert p.advance(71.0, resolved, evaluated=66.0)


def test_a_slot_waits_for_the_detector_to_catch_up() -> None:
    p = pacer()
    assert not p.advance(30.0, [], evaluated=None)  # no evaluation yet
    assert not p.advance(30.0, [], evaluated=4.0)  # 6 s behind the warm-up's end: more than lag_s
    assert p.held["warmup"] == "the detector's evaluations to catch up"
    assert p.advance(31.0, [], evaluated=5.0)


def test_a_slot_gives_up_once_the_detector_has_evaluated_well_past_it() -> None:
    p = pacer()
    p.starts = [0.0, 10.0, 20.0]
    assert not p.advance(65.0, [], evaluated=40.0 + 29.0)
    assert p.advance(71.0, [], evaluated=40.0 + 30.0)  # patience_s of data past the scripted end
    assert p.held["thermal"].startswith("gave up after 51 s waiting for the detector to name it")


def test_the_last_slot_ends_the_run() -> None:
    p = pacer()
    tl = p.timeline
    p.starts = [s[2] for s in tl.slots]  # every slot begun at its scripted time
    last = len(tl.slots) - 1
    end = tl.slots[last][2] + tl.nominal_seconds(last)
    assert not p.advance(end - 0.5, [], evaluated=end - 3)  # no lead for the end
    assert p.advance(end + 0.5, [], evaluated=end - 3) and p.end == end + 0.5
    assert p.played().total_seconds == end + 0.5 and all(f.end is not None for f in p.played().faults)


def test_workers_follow_the_published_schedule(tmp_path) -> None:
    tl = build_timeline(CFG)
    path = tmp_path / "schedule.json"
    reader = ScheduleFile(path)
    assert reader.read() is None
    write_schedule(path, [0.0, 10.0, 20.0])
    starts = reader.read()
    assert starts == [0.0, 10.0, 20.0] and reader.read() is None  # unchanged: nothing new
    job = build_cluster_job(CFG)
    schedule_job(job, CFG, tl, starts)
    [fault] = job.faults
    assert (fault.kind, fault.start_s, fault.end_s) == ("thermal", 20.0, None)
    assert eval_times(tl, starts) == [15.0]  # the middle of the benign slot's scripted length
    write_schedule(path, [0.0, 10.0, 20.0, 47.0])
    schedule_job(job, CFG, tl, reader.read())
    [fault] = job.faults
    assert fault.end_s == 47.0 and eval_times(tl, [0.0, 10.0, 20.0, 47.0]) == [15.0, 52.0]


def test_evaluation_steps_run_once_each_however_the_job_is_advanced() -> None:
    tl = build_timeline(CFG)
    starts = [0.0, 10.0, 20.0, 30.0]
    evals = []
    for cuts in ([60.0], [7.3, 15.01, 15.2, 31.0, 60.0]):
        job = build_cluster_job(CFG)
        schedule_job(job, CFG, tl, starts)
        recs = [r for c in cuts for r in job.advance(c)]
        evals.append([r.step for r in recs if "eval" in r.sections])
    assert evals[0] == evals[1] and len(evals[0]) == 2  # benign (15 s) and recover-thermal (35 s)
