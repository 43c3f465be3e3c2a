"""The simulated training job: synchronous semantics, layout, faults, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from rankwatch.sim.training import QUIET, Fault, Layout, Noise, TrainingJob


def test_layout_and_torchrun_placement():
    lay = Layout(tp=8, pp=4, dp=8)
    assert lay.world == 256
    c = lay.coords()
    assert c["tp"][:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0] and c["dp"][8] == 1 and c["pp"][64] == 1
    job = TrainingJob(lay, nodes=32, gpus_per_node=8)
    assert job.node_of(0) == "node-00" and job.node_of(255) == "node-31" and job.rank_of("node-03", 5) == 29
    with pytest.raises(ValueError, match="do not fit"):
        TrainingJob(lay, nodes=4, gpus_per_node=8)


def test_synchronous_steps_comm_absorbs_the_slowest_rank():
    job = TrainingJob(Layout(tp=2, pp=2, dp=2), nodes=1, gpus_per_node=8, base_step_s=1.0, noise=QUIET, seed=1)
    job.add_fault(Fault("slowdown", rank=3, start_s=0, magnitude=0.5))
    recs = job.advance(20.0)
    assert recs and all(r.end_s <= 20.0 for r in recs)
    r = recs[-1]
    own = sum(v for k, v in r.sections.items() if k != "comm")
    total = own + r.sections["comm"]
    assert np.allclose(total, r.end_s - r.start_s)  # every rank's step is the same length
    assert np.argmax(own) == 3 and np.argmin(r.sections["comm"]) == 3  # straggler waits least
    assert own[3] / own[0] == pytest.approx((0.02 + 0.9 * 1.5) / (0.02 + 0.9), rel=1e-9)


def test_noise_is_benign_by_construction_and_stage_weights_apply():
    job = TrainingJob(Layout(tp=1, pp=4, dp=2), nodes=1, gpus_per_node=8, noise=Noise(eval_every=5, checkpoint_every=7,
                                                                                          warmup_extra=0.0), seed=2)
    recs = job.advance(30.0)
    evals = [r for r in recs if "eval" in r.sections]
    ckpts = [r for r in recs if "checkpoint" in r.sections]
    assert [r.step % 5 for r in evals] == [0] * len(evals) and evals
    assert [r.step % 7 for r in ckpts] == [0] * len(ckpts) and ckpts
    fwd = np.mean([r.sections["forward"] for r in recs], axis=0)
    pp = job.coords["pp"]
    assert fwd[pp == 3].mean() > fwd[pp == 1].mean() * 1.1  # heavier last stage


def test_advance_in_pieces_is_deterministic():
    def steps(cuts):
        job = TrainingJob(Layout(tp=2, pp=2, dp=2), nodes=1, gpus_per_node=8, seed=7)
        out = []
        for c in cuts:
            out += job.advance(c)
        return [(r.step, round(r.end_s, 9)) for r in out]

    assert steps([60.0]) == steps([7.3, 7.4, 31.0, 60.0])


def test_xid79_hangs_the_job_after_the_running_step_and_drives_hardware_faults():
    job = TrainingJob(Layout(tp=2, pp=2, dp=2), nodes=1, gpus_per_node=8, noise=QUIET)
    job.add_fault(Fault("xid79", node=0, gpu=3, start_s=10.0))
    job.add_fault(Fault("efa", node="node-00", start_s=0.0, end_s=5.0, magnitude=0.5))
    before = job.advance(9.0)
    # the step that started before the XID (8.24 s) completes; none starts from t = 10 s on
    after = job.advance(100.0)
    assert [r.step for r in after] == [len(before) + 1] and after[0].start_s < 10.0 <= after[0].end_s
    assert job.advance(200.0) == []
    hw = job.hardware_faults_at(12.0)
    assert [(h.kind, h.node, h.gpu) for h in hw] == [("xid79", "node-00", 3)]
    assert [h.kind for h in job.hardware_faults_at(1.0)] == ["efa"]
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("meteor")
    with pytest.raises(ValueError, match="needs a node"):
        job.add_fault(Fault("thermal", rank=1))


def test_efa_fault_slows_collectives_for_everyone():
    def mean_comm(faults):
        job = TrainingJob(Layout(tp=2, pp=1, dp=4), nodes=1, gpus_per_node=8, noise=QUIET)
        for f in faults:
            job.add_fault(f)
        return np.mean([r.sections["comm"] for r in job.advance(20.0)])

    assert mean_comm([Fault("efa", node=0, magnitude=1.0)]) == pytest.approx(2 * mean_comm([]), rel=1e-6)
